"""Training settings: one dataclass, named presets, a TOML file and `--key=value` overrides.

A run's settings are resolved in layers, each overriding the one before:

    the dataclass defaults  <  the preset (`preset = "small"`)  <  the TOML file (`--config`)  <  flags

With `--resume`, the run folder's saved `train.toml` takes the place of the first three layers, so a
resumed run continues with exactly the settings it started with unless a flag says otherwise.

Every field of `TrainConfig` is a setting: its name is the TOML key and, with dashes, the flag
(`max_steps` / `--max-steps`); its `help` metadata is the flag's help. Nothing else lists the settings,
so `nanogemma train --help`, the TOML reader and the saved `train.toml` cannot drift apart.

The model's shape comes from `model` (a shape preset: `tiny`, `small`, or the name of a Gemma 3 size),
optionally edited by the shape settings (`hidden_size`, `num_layers`, ...). Its vocabulary is always the
dataset's, rounded up to `vocab_multiple`. With `init_from`, shape and vocabulary come from that model.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import PRESETS, GemmaConfig, get_preset
from ..errors import NanogemmaError
from ..flags import DEVICE, SEED_MAX

SCRATCH = "scratch"
SETTINGS = "train.toml"  # a run folder's resolved settings


def _s(help: str, **kw: Any) -> Any:
    """A setting's default and its help text, kept side by side."""
    return field(metadata={"help": help}, **kw)


@dataclass
class TrainConfig:
    # ---- what to train on, where to write
    data: str = _s("prepared data folder (made by `nanogemma prepare`)", default="")
    out_dir: str = _s("run folder for checkpoints, logs and the final model; '' means runs/<data folder "
                      "name>", default="")
    preset: str = _s("named bundle of settings applied before the file and flags: tiny, small, gemma3-270m, "
                     "finetune, sft", default="small")
    init_from: str = _s("'scratch' for random weights, or a model to continue training: gemma3-270m, a Hugging Face "
                        "repository id, a .gguf, "
                        "a Hugging Face folder or a nanogemma run folder", default=SCRATCH)
    resume: bool = _s("continue the run in out_dir from its last checkpoint, exactly", default=False)
    # ---- the model (ignored with init_from: the loaded model has its own shape)
    model: str = _s("model shape: tiny, small, or a Gemma 3 size such as gemma3-270m (vocabulary: the data's)",
                    default="small")
    hidden_size: int | None = _s("override the shape's hidden size", default=None)
    intermediate_size: int | None = _s("override the shape's MLP width", default=None)
    num_layers: int | None = _s("override the shape's depth (layers follow Gemma's 5 sliding : 1 global)",
                                default=None)
    num_heads: int | None = _s("override the shape's query heads", default=None)
    num_kv_heads: int | None = _s("override the shape's key/value heads", default=None)
    head_dim: int | None = _s("override the shape's head width", default=None)
    sliding_window: int | None = _s("override the shape's sliding-window length", default=None)
    tie_embeddings: bool | None = _s("tie the output head to the embedding as Gemma does (every shape "
                                     "preset is tied); false gives a separate lm_head", default=None)
    vocab_multiple: int = _s("round the vocabulary up to a multiple of this (faster matmuls on GPUs)", default=64)
    init_std: float = _s("standard deviation of the random initial weights", default=0.02)
    train_embeddings: bool = _s("train the embedding table (and the output head tied to it); false freezes it, "
                                "which fine-tuning on little data can afford: a third less optimizer work on the "
                                "270M model, and no head gradient", default=True)
    loss_mask: bool = _s("chat data: train only on the model's replies (the data's loss mask); false trains on "
                         "every token of the packed conversations", default=True)
    # ---- optimisation
    seq_len: int = _s("tokens per training window", default=256)
    batch_size: int = _s("windows per micro-batch, per process", default=16)
    grad_accum: int = _s("micro-batches per optimizer step, per process", default=1)
    max_steps: int = _s("optimizer steps to train for (the cosine decay ends here unless decay_steps says "
                        "otherwise)", default=1000)
    decay_steps: int | None = _s("the step where the cosine decay reaches min_lr (default: max_steps; a "
                                 "--resume with another max_steps keeps the run's own decay end unless this "
                                 "is given)", default=None)
    lr: float = _s("peak learning rate, reached after warmup", default=1e-3)
    min_lr: float = _s("learning rate at the end of the cosine decay", default=1e-4)
    warmup_steps: int = _s("optimizer steps of linear warmup from 0 to lr", default=100)
    weight_decay: float = _s("AdamW weight decay, applied to matrices only (not to norms)", default=0.1)
    beta1: float = _s("AdamW beta1", default=0.9)
    beta2: float = _s("AdamW beta2", default=0.95)
    eps: float = _s("AdamW epsilon", default=1e-8)
    grad_clip: float = _s("clip the global gradient norm to this (0: no clipping; the norm is logged anyway)",
                          default=1.0)
    seed: int = _s("seed of the initial weights and of the data sampler", default=0)
    verify_data: bool = _s("check the data files' SHA-256 against meta.json before training (reads every "
                           "byte; sizes, types and ids are always checked)", default=False)
    # ---- hardware and precision
    device: str = _s("auto (cuda if available, else cpu), cpu, cuda or cuda:N", default="auto")
    dtype: str = _s("autocast dtype over float32 weights: auto (bfloat16 on a GPU that has it, else float32), "
                    "float32, bfloat16, or float16 (with a gradient scaler)", default="auto")
    threads: int = _s("CPU threads for PyTorch's intra-op parallelism (0: PyTorch's default; on a busy shared "
                      "machine 1 can be several times faster than 2)", default=0)
    compile: bool = _s("torch.compile the model (slow start, faster steps)", default=False)
    fsdp: bool = _s("under torchrun, shard weights, gradients and optimizer state with FSDP2 instead of "
                    "replicating them with DDP", default=False)
    activation_checkpointing: bool = _s("recompute each transformer block's activations in backward instead of "
                                        "keeping them from forward: only each block's input is kept, for the "
                                        "price of one more forward of every block per step (less memory, "
                                        "slower steps; the same numbers)", default=False)
    # ---- LoRA (nanogemma/lora.py): freeze the --init-from model, train low-rank adapters only
    lora_rank: int = _s("rank of the LoRA adapters; 0 trains every weight, N > 0 freezes the model and trains "
                        "adapters only (checkpoints then hold just them, and name the base)", default=0)
    lora_alpha: float = _s("LoRA scale numerator: the correction is multiplied by alpha / rank", default=16.0)
    lora_dropout: float = _s("dropout on the adapters' input, in [0, 1)", default=0.0)
    lora_targets: str = _s("projections given adapters, comma-separated among q,k,v,o,gate,up,down (or all)",
                           default="q,k,v,o,gate,up,down")
    lora_base_dtype: str = _s("storage of the frozen projections: float32, bfloat16 (half the memory) or int8 "
                              "(a quarter; QLoRA-like)", default="float32")
    # ---- evaluation, logging, checkpoints
    eval_every: int = _s("evaluate every N optimizer steps, and at the end (0: only at the end)", default=100)
    eval_batches: int = _s("fixed validation micro-batches per evaluation (the same ones every time)",
                           default=8)
    checkpoint_every: int = _s("write the 'last' checkpoint every N steps (0: at each evaluation), and always "
                               "at the end and on Ctrl-C", default=0)
    log_every: int = _s("log training metrics every N optimizer steps", default=10)
    sample_tokens: int = _s("tokens of text sampled at each evaluation (0: none)", default=48)
    sample_prompt: str = _s("prompt of the sample (default: the start of a document)", default="")
    sample_temperature: float = _s("sampling temperature of the sample (0: greedy)", default=0.8)
    progress: bool = _s("show a progress bar", default=True)
    tensorboard: bool = _s("also write TensorBoard logs to out_dir/tensorboard, if tensorboard is installed",
                           default=True)
    peak_tflops: float = _s("the device's peak TFLOP/s for the MFU estimate (0: look the GPU up in a table)",
                            default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
# Settings that describe the run rather than the training trajectory: changing them on --resume is expected.
RUN_ONLY = {"resume", "verify_data", "decay_steps", "progress", "threads", "tensorboard", "log_every", "eval_every", "checkpoint_every", "max_steps",
            "sample_tokens", "sample_prompt", "sample_temperature", "peak_tflops", "compile", "activation_checkpointing", "data", "out_dir"}

# A model that learns the synthetic story grammar in minutes on a laptop CPU: about 1.6M parameters
# outside the embedding, both layer types (three sliding, one global), multi-query attention like the 270M.
SMALL = GemmaConfig(
    vocab_size=512, hidden_size=128, intermediate_size=512, num_layers=4, num_heads=4, num_kv_heads=1,
    head_dim=32, sliding_window=64, max_seq_len=1024, query_pre_attn_scalar=32.0,
    layer_types=("sliding", "sliding", "sliding", "global"),
)


def model_shapes() -> dict[str, GemmaConfig]:
    """Shape presets for `model`: tiny, small and every Gemma 3 size (vocabularies are replaced by the data's)."""
    return {"tiny": get_preset("tiny"), "small": dataclasses.replace(SMALL),
            **{k: get_preset(k) for k in PRESETS if k != "tiny"}}


PRESETS_TRAIN: dict[str, dict[str, Any]] = {
    # Seconds on a CPU: for tests and smoke runs.
    "tiny": dict(model="tiny", seq_len=64, batch_size=8, max_steps=100, lr=3e-3, min_lr=3e-4, warmup_steps=10,
                 eval_every=20, eval_batches=2, log_every=5, sample_tokens=16),
    # Minutes on a CPU: learns the synthetic corpus to near its entropy floor (docs/TRAINING.md).
    "small": dict(model="small", seq_len=256, batch_size=16, max_steps=600, lr=3e-3, min_lr=1e-4,
                  warmup_steps=30, eval_every=100, eval_batches=8, log_every=10),
    # The official 270M shape, from scratch, with the dataset's vocabulary: a GPU job.
    "gemma3-270m": dict(model="gemma3-270m", seq_len=1024, batch_size=8, grad_accum=8, max_steps=20_000,
                        lr=6e-4, min_lr=6e-5, warmup_steps=500, eval_every=500, eval_batches=20,
                        log_every=10, dtype="auto"),
    # Continue training the official 270M weights (data prepared with --tokenizer gemma).
    "finetune": dict(init_from="gemma3-270m", seq_len=512, batch_size=4, grad_accum=4, max_steps=500,
                     lr=2e-5, min_lr=2e-6, warmup_steps=20, weight_decay=0.0, eval_every=50, eval_batches=8,
                     log_every=5),
    # Supervised fine-tuning of the official 270M weights on chat data (`nanogemma prepare` on conversations,
    # --tokenizer gemma): whole conversations packed, loss on the replies only, the embedding frozen (a
    # small instruction set cannot teach 262k embeddings much, and freezing them saves a third of the step);
    # the blocks recompute their activations in backward: kept from forward, the 18 blocks' activations
    # would dominate the step's memory, with LoRA too (the adapters cut the optimizer's state, not them).
    "sft": dict(init_from="gemma3-270m", seq_len=512, batch_size=4, grad_accum=1, max_steps=200, lr=1e-4,
                min_lr=1e-5, warmup_steps=10, weight_decay=0.0, train_embeddings=False, loss_mask=True,
                activation_checkpointing=True, eval_every=50, eval_batches=4, log_every=5, sample_tokens=0),
}


# ------------------------------------------------------------------------------------------ values


def _field_type(name: str) -> tuple[type, bool]:
    """(base type, whether None is allowed) of a setting, from its annotation."""
    hint = typing.get_type_hints(TrainConfig)[name]
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        base = next(a for a in args if a is not type(None))
        return base, True
    return hint, False


def parse_value(name: str, value: Any) -> Any:
    """A setting's value from TOML (already typed) or from the command line (a string), checked."""
    base, optional = _field_type(name)
    if isinstance(value, str) and optional and value.lower() in ("none", "null", ""):
        return None
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                try:  # 1e4 is a fine way to write ten thousand steps
                    f = float(value)
                    if f.is_integer():
                        return int(f)
                except ValueError:
                    pass
    elif base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif base is str:
        if isinstance(value, str):
            return value
    kind = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}[base]
    raise NanogemmaError(f"setting {name} wants {kind}{' or none' if optional else ''}, got {value!r}")


def _unknown(name: str) -> NanogemmaError:
    close = difflib.get_close_matches(name, FIELDS, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return NanogemmaError(f"unknown training setting '{name}'{hint}; `nanogemma train --help` lists them all")


def apply(cfg: TrainConfig, changes: dict[str, Any], source: str) -> TrainConfig:
    """`cfg` with `changes` (setting -> value, from a file or flags) applied and type-checked."""
    out = {}
    for key, value in changes.items():
        name = key.replace("-", "_")
        if name not in FIELDS:
            raise _unknown(name)
        try:
            out[name] = parse_value(name, value)
        except NanogemmaError as e:
            raise NanogemmaError(f"{source}: {e}") from None
    return cfg.replace(**out)


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file of settings. Tables ([model], [optim], ...) only group keys: their names are ignored."""
    from ..files import read_text

    path = Path(path)
    text = read_text(path, "config file")  # missing, not a regular file, not UTF-8: one line each
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise NanogemmaError(f"{path} is not valid TOML ({e}); fix the file") from None
    flat: dict[str, Any] = {}

    def walk(d: dict[str, Any]) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v)
            elif k in flat:
                raise NanogemmaError(f"{path}: setting '{k}' is given twice")
            else:
                flat[k] = v

    walk(data)
    return flat


def to_toml(cfg: TrainConfig) -> str:
    """The settings as TOML that `read_toml` reads back to the same values (None-valued settings omitted)."""
    lines = ["# Resolved settings of this run (nanogemma train). Feed back with --config.", ""]
    for name, value in cfg.to_dict().items():
        if value is None:
            lines.append(f"# {name} = (from the model shape)")
        elif isinstance(value, bool):
            lines.append(f"{name} = {'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            lines.append(f"{name} = {value!r}")
        else:
            lines.append(f"{name} = {_toml_string(value)}")
    return "\n".join(lines) + "\n"


def _toml_string(s: str) -> str:
    out = s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{out}"'


def saved_config(run_dir: Path) -> TrainConfig:
    """The settings a run was started with (its train.toml), for --resume."""
    path = run_dir / SETTINGS
    if not path.is_file():
        raise NanogemmaError(f"{run_dir} has no {SETTINGS}: it is not a nanogemma training run; "
                             "start a new run without --resume")
    return apply(TrainConfig(), read_toml(path), str(path))


def resolve(flags: dict[str, Any], config_file: str | Path | None = None) -> TrainConfig:
    """The settings of a run from its layers (see the module docstring). `flags`: only those given."""
    file = read_toml(config_file) if config_file else {}
    resume = parse_value("resume", flags.get("resume", file.get("resume", False)))
    if resume:
        out_dir = flags.get("out_dir") or file.get("out_dir")
        if not out_dir:
            raise NanogemmaError("--resume needs the run folder: pass --out-dir RUN_DIR")
        base = saved_config(Path(out_dir))
        cfg = check(apply(apply(base, file, str(config_file)), {**flags, "resume": True}, "flags"))
        # The checkpoint's model is what continues: a shape setting that differs would be recorded in
        # train.toml without being in effect, so it is refused.
        fixed = [k for k in RESUME_FIXED if getattr(cfg, k) != getattr(base, k)]
        if fixed:
            k = fixed[0]
            raise NanogemmaError(f"--resume continues the run's own model, whose {k} is {getattr(base, k)!r} "
                                 f"(asked: {getattr(cfg, k)!r}); drop --{k.replace('_', '-')}, or start a new run "
                                 "in another --out-dir (--init-from RUN_DIR starts one from this run's weights)")
        cfg = _resume_schedule(base, cfg, "decay_steps" in flags or "decay_steps" in file)
        changed = [k for k in FIELDS if k not in RUN_ONLY and getattr(cfg, k) != getattr(base, k)]
        if changed:
            print(f"nanogemma: warning: resuming with changed {', '.join(changed)}: the run will not continue "
                  "exactly as it would have", file=sys.stderr)
        return cfg
    preset = flags.get("preset", file.get("preset", TrainConfig.preset))
    if preset not in PRESETS_TRAIN:
        raise NanogemmaError(f"unknown preset '{preset}'; choose from: {', '.join(PRESETS_TRAIN)}")
    cfg = apply(TrainConfig(preset=preset), PRESETS_TRAIN[preset], f"preset {preset}")
    cfg = apply(cfg, file, str(config_file))
    return check(apply(cfg, flags, "flags"))


RESUME_FIXED = ("model", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                "sliding_window", "tie_embeddings", "vocab_multiple", "init_from", "init_std")


def decay_end(cfg: TrainConfig) -> int:
    """The step where the cosine decay reaches min_lr."""
    return cfg.max_steps if cfg.decay_steps is None else cfg.decay_steps


def _resume_schedule(base: TrainConfig, cfg: TrainConfig, asked: bool) -> TrainConfig:
    """A resumed run keeps its learning-rate curve; it changes only when --decay-steps asks, said in one line."""
    old, new = decay_end(base), decay_end(cfg)
    if not asked:
        if cfg.max_steps != base.max_steps:
            print(f"nanogemma: resuming to step {cfg.max_steps} (was {base.max_steps}); the learning rate keeps "
                  f"its decay to step {old} (--decay-steps N moves it)", file=sys.stderr)
        return cfg.replace(decay_steps=None if old == cfg.max_steps else old)
    if new != old:
        print(f"nanogemma: resuming with the decay end moved from step {old} to {new} (--decay-steps): the "
              "learning rate follows the new curve from the resume step on", file=sys.stderr)
    return cfg


def check(cfg: TrainConfig) -> TrainConfig:
    """Reject settings that cannot work, with what to do instead; fill in derived defaults."""
    if not cfg.data:
        raise NanogemmaError("no data: pass --data FOLDER (a folder made by `nanogemma prepare`)")
    if not cfg.out_dir:
        cfg = cfg.replace(out_dir=str(Path("runs") / Path(cfg.data.rstrip("/")).name))
    positive = ["seq_len", "batch_size", "grad_accum", "max_steps", "eval_batches", "log_every", "vocab_multiple"]
    for name in positive:
        if getattr(cfg, name) < 1:
            raise NanogemmaError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    for name in ["warmup_steps", "eval_every", "checkpoint_every", "sample_tokens", "grad_clip", "weight_decay",
                 "min_lr", "sample_temperature", "peak_tflops", "threads"]:
        if getattr(cfg, name) < 0:
            raise NanogemmaError(f"{name} must not be negative, got {getattr(cfg, name)}")
    for name in FIELDS:  # nan or inf passes every comparison below: refuse it first
        value = getattr(cfg, name)
        if isinstance(value, float) and not math.isfinite(value):
            raise NanogemmaError(f"{name} must be a finite number, got {value}")
    if not 0 <= cfg.seed <= SEED_MAX:
        raise NanogemmaError(f"seed must lie in [0, 2**64 - 1], got {cfg.seed}")
    if not cfg.eps > 0:
        raise NanogemmaError(f"eps must be positive (AdamW divides by sqrt(v) + eps), got {cfg.eps}")
    if not cfg.init_std > 0:
        raise NanogemmaError(f"init_std must be positive, got {cfg.init_std}")
    if cfg.decay_steps is not None and cfg.decay_steps < 1:
        raise NanogemmaError(f"decay_steps must be at least 1, got {cfg.decay_steps}")
    if cfg.device != "auto" and not DEVICE.fullmatch(cfg.device):
        raise NanogemmaError(f"unknown device {cfg.device!r}; use auto, cpu, cuda or cuda:N")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise NanogemmaError(f"lr must be a positive number, got {cfg.lr}")
    if cfg.min_lr > cfg.lr:
        raise NanogemmaError(f"min_lr ({cfg.min_lr}) is above lr ({cfg.lr}); the decay goes from lr down to min_lr")
    if not (0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1):
        raise NanogemmaError("beta1 and beta2 must lie in [0, 1)")
    if cfg.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise NanogemmaError(f"dtype must be auto, float32, bfloat16 or float16, got '{cfg.dtype}'")
    if cfg.lora_rank < 0:
        raise NanogemmaError(f"lora_rank must not be negative, got {cfg.lora_rank}")
    if cfg.lora_rank:
        if cfg.init_from == SCRATCH:
            raise NanogemmaError("LoRA adapts a trained model: pass --init-from MODEL (e.g. gemma3-270m) with "
                                 "--lora-rank, or drop --lora-rank to train from scratch")
        lora_config(cfg)  # checks the other LoRA settings
        if Path(cfg.init_from).exists():  # checkpoints name the base: by a path that holds from any folder
            cfg = cfg.replace(init_from=str(Path(cfg.init_from).resolve()))
    if cfg.init_from == SCRATCH and cfg.model not in model_shapes():
        raise NanogemmaError(f"unknown model shape '{cfg.model}'; choose from: {', '.join(model_shapes())}")
    return cfg


def lora_config(cfg: TrainConfig):
    """The run's `lora.LoRAConfig`, checked, or None when it trains every weight."""
    if not cfg.lora_rank:
        return None
    from ..lora import LoRAConfig, parse_targets  # torch: imported only by LoRA runs, not by --help

    return LoRAConfig(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, parse_targets(cfg.lora_targets),
                      cfg.lora_base_dtype).validate()


def model_config(cfg: TrainConfig, vocab_size: int) -> GemmaConfig:
    """The GemmaConfig of a from-scratch run: the shape preset, the shape overrides, the data's vocabulary."""
    shape = model_shapes()[cfg.model]
    changes: dict[str, Any] = {}
    for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                 "sliding_window", "tie_embeddings"):
        if getattr(cfg, name) is not None:
            changes[name] = getattr(cfg, name)
    if "head_dim" in changes:
        changes["query_pre_attn_scalar"] = float(changes["head_dim"])  # Gemma scales scores by 1/sqrt(head_dim)
    m = cfg.vocab_multiple
    changes["vocab_size"] = -(-vocab_size // m) * m
    changes["max_seq_len"] = max(shape.max_seq_len, cfg.seq_len)
    try:
        return shape.replace(**changes)
    except ValueError as e:
        raise NanogemmaError(f"model shape: {e}") from None


def flag_help(name: str) -> str:
    """The --help line of a setting: its help text and the value a run without flags uses, which for the
    settings the default preset sets is the preset's (and says so), not the dataclass default."""
    f = FIELDS[name]
    preset = FIELDS["preset"].default
    from_preset = name in PRESETS_TRAIN[preset]
    default = PRESETS_TRAIN[preset][name] if from_preset else f.default
    shown = "from the shape" if default is None else ("''" if default == "" else str(default).lower()
                                                       if isinstance(default, bool) else default)
    return f"{f.metadata['help']} (default: {shown}{f', from preset {preset}' if from_preset else ''})"


def preset_table() -> str:
    """The presets, for --help: what each one changes."""
    rows = []
    for name, values in PRESETS_TRAIN.items():
        rows.append(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
    return "\n".join(rows)
