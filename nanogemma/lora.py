"""LoRA: a frozen model plus small trained low-rank corrections, swapped in from outside like quantize.py's kernels.

Fine-tuning every weight of a model needs, per parameter, the weight, its gradient and two AdamW moments:
16 bytes in float32. LoRA (Hu et al., 2021) freezes the model and learns, for a chosen projection W (out x in),
a correction of rank r:

    y = W x + (alpha / r) · B (A x),        A: (r, in), random;   B: (out, r), zero

Only A and B train: r · (in + out) numbers instead of out · in (for the 270M model's projections at r = 8,
about 1% of them). B starts at zero, so the adapted model starts *exactly* as the frozen one. alpha / r
scales the correction so that changing r does not change the effective learning rate much; dropout, if any,
is applied to the correction's input only.

The frozen weights need no gradient and no optimizer state, so they may also be stored in less precision
(`base_dtype`): bfloat16 (half the bytes) or int8 rows with one float scale each (a quarter; the QLoRA idea
with quantize.py's per-row rounding). Their products run in the activations' dtype through `FrozenLinear`,
whose backward recomputes the float weight from the stored one instead of keeping a float copy per layer.
The embedding (also the tied output head) stays as it is.

**The seam.** `apply_lora(model, cfg)` replaces a block's `nn.Linear` projections by `LoRALinear` modules that
wrap them; model.py knows nothing of it. `merge_lora` folds B·A into the weights and leaves a plain `Gemma`
(what export and fast inference want); `strip_lora` puts the frozen projections back (a float32 base exactly).

**PEFT.** Adapters go out (`save_peft`) and come in (`read_adapter`) as the folders of Hugging Face's peft
library: `adapter_config.json` + `adapter_model.safetensors`, under the names peft gives transformers'
`Gemma3ForCausalLM`. Both store A as (r, in) and B as (out, r), as here, and scale by alpha / r (or
alpha / sqrt(r) with rsLoRA): only names change.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import NanogemmaError
from .files import atomic_path, readable
from .model import Gemma
from .quantize import quantize_rows

# target name -> (the block's sub-module, the projection's attribute) in model.py
TARGETS = {"q": ("attn", "wq"), "k": ("attn", "wk"), "v": ("attn", "wv"), "o": ("attn", "wo"),
           "gate": ("mlp", "gate"), "up": ("mlp", "up"), "down": ("mlp", "down")}
# target name -> the module's name in transformers' Gemma 3 decoder layer (peft's target_modules)
HF_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
BASE_DTYPES = ("float32", "bfloat16", "int8")
ADAPTER_SUFFIXES = (".lora_A", ".lora_B")
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_PEFT_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.((?:self_attn|mlp)\.\w+)\.lora_([AB])\.weight$")
HF_NAMES = {"gemma3-270m": "google/gemma-3-270m"}  # what peft's base_model_name_or_path says for a preset


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = tuple(TARGETS)
    base_dtype: str = "float32"
    rslora: bool = False  # scale by alpha / sqrt(rank) (peft's use_rslora): only adapters read from peft use it

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def validate(self) -> LoRAConfig:
        if self.rank < 1:
            raise NanogemmaError(f"LoRA rank must be at least 1, got {self.rank}")
        if not (0.0 <= self.dropout < 1.0):
            raise NanogemmaError(f"LoRA dropout must lie in [0, 1), got {self.dropout}")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise NanogemmaError(f"LoRA alpha must be a positive number, got {self.alpha}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise NanogemmaError(f"unknown LoRA target '{unknown[0] if unknown else ''}'; choose among "
                                 f"{','.join(TARGETS)} (comma-separated)")
        if self.base_dtype not in BASE_DTYPES:
            raise NanogemmaError(f"LoRA base dtype must be one of {', '.join(BASE_DTYPES)}, got '{self.base_dtype}'")
        return self

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: dict) -> LoRAConfig:
        known = {k: d[k] for k in ("rank", "alpha", "dropout", "base_dtype", "rslora") if k in d}
        return cls(targets=tuple(d.get("targets", TARGETS)), **known)


def parse_targets(text: str) -> tuple[str, ...]:
    """'q,v' -> ('q', 'v'), in the model's order; 'all' means every projection."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if names == ["all"]:
        return tuple(TARGETS)
    LoRAConfig(targets=tuple(names)).validate()
    return tuple(t for t in TARGETS if t in names)


# ------------------------------------------------------------------------------------- the modules


class _FrozenMatmul(torch.autograd.Function):
    """x @ (w · scale)ᵀ for a frozen w stored in a small dtype; backward gives x its gradient only.

    Autograd would keep the float copy of w made in forward until backward: one per layer, the whole model's
    worth in float. Saving the stored w instead and converting it again in backward keeps only one float
    copy alive at a time. The product runs in the autocast dtype when autocast is on, else in x's.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, scale: Tensor | None) -> Tensor:
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        ctx.save_for_backward(w, scale)
        ctx.dtype, ctx.x_dtype = dtype, x.dtype
        with torch.autocast(dev, enabled=False):
            y = F.linear(x.to(dtype), w.to(dtype))
            return y if scale is None else y * scale.to(dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        w, scale = ctx.saved_tensors
        g = grad.to(ctx.dtype)
        if scale is not None:
            g = g * scale.to(ctx.dtype)
        return (g @ w.to(ctx.dtype)).to(ctx.x_dtype), None, None


class FrozenLinear(nn.Module):
    """A frozen bias-free linear layer whose weight is stored in bfloat16, or as int8 rows with float32 scales
    (`w[o, :] ~= q[o, :] · scale[o]`, quantize.py's rounding). Frozen parameters, not buffers: DDP then
    copies them once at start, not at every forward."""

    def __init__(self, weight: Tensor, dtype: str):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        if dtype == "int8":
            q, scale = quantize_rows(weight.detach())
            self.weight = nn.Parameter(q, requires_grad=False)
            self.scale = nn.Parameter(scale, requires_grad=False)
        elif dtype == "bfloat16":
            self.weight = nn.Parameter(weight.detach().to(torch.bfloat16), requires_grad=False)
            self.scale = None
        else:
            raise NanogemmaError(f"a frozen weight is stored in bfloat16 or int8, not {dtype}")

    def dequantized(self) -> Tensor:
        """The float32 weight (out, in) the stored numbers stand for."""
        w = self.weight.float()
        return w if self.scale is None else w * self.scale.float()[:, None]

    def extra_repr(self) -> str:
        kind = "int8" if self.scale is not None else str(self.weight.dtype).removeprefix("torch.")
        return f"in_features={self.in_features}, out_features={self.out_features}, stored={kind}"

    def forward(self, x: Tensor) -> Tensor:
        return _FrozenMatmul.apply(x, self.weight, self.scale)


class MaskDropout(nn.Dropout):
    """`nn.Dropout` that keeps, for backward, the mask of kept values (one byte each) instead of a float copy.

    On a CPU, `F.dropout` multiplies by a float noise tensor and saves it for backward: with the dropped copy
    that A's product saves, eight bytes per input value and projection. `native_dropout` draws the same
    mask from the same generator and gives the same values (the CUDA kernel F.dropout uses), but saves the
    mask as booleans: five bytes instead of eight."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        return torch.native_dropout(x, self.p, True)[0]


class LoRALinear(nn.Module):
    """`base(x) + (alpha / r) · B(A(dropout(x)))`: a frozen projection and its trained low-rank correction."""

    def __init__(self, base: nn.Module, rank: int, scaling: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.base = base
        self.out_features, self.in_features = base.out_features, base.in_features
        self.rank, self.scaling = rank, scaling
        device = base.weight.device
        # A as nn.Linear's default (Kaiming-uniform with a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))), as peft does;
        # B zero, so the correction starts at exactly nothing.
        bound = 1.0 / math.sqrt(self.in_features)
        a = (torch.rand(rank, self.in_features, generator=generator) * 2 - 1) * bound
        self.lora_A = nn.Parameter(a.to(device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))
        # Without dropout (the default) A's product takes x itself, which autograd then saves once for every
        # adapter on it (q, k and v share it), not a copy per projection.
        self.dropout = MaskDropout(dropout) if dropout > 0 else nn.Identity()

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}"

    def delta(self) -> Tensor:
        """The correction as a weight, (alpha / r) · B A, computed in float64 (out, in)."""
        return self.scaling * (self.lora_B.double() @ self.lora_A.double())

    def forward(self, x: Tensor) -> Tensor:
        # peft's order of operations: B(A(dropout(x))) · scaling, added to the frozen product.
        return self.base(x) + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling


def _projections(model: Gemma):
    """(layer index, target, parent module, attribute) of every projection LoRA may wrap."""
    for i, block in enumerate(model.layers):
        for target, (part, attr) in TARGETS.items():
            parent = getattr(block, part)
            if not hasattr(parent, attr):  # fused (quantize.py): q/k/v or gate/up are one product there
                raise NanogemmaError(f"layers.{i}.{part} is a {type(parent).__name__} with fused projections: "
                                     "add LoRA before packing or quantizing the model")
            yield i, target, parent, attr


def apply_lora(model: Gemma, cfg: LoRAConfig, seed: int = 0) -> Gemma:
    """Freeze `model` and wrap its `cfg.targets` projections in `LoRALinear`, in place; returns the model.

    Every block projection, targeted or not, is stored in `cfg.base_dtype`; everything else (embedding,
    norms) stays as it is, frozen. A is drawn from `seed`, in the model's order, so a run is reproducible.
    """
    cfg.validate()
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    for i, target, parent, attr in _projections(model):
        lin = getattr(parent, attr)
        if not isinstance(lin, nn.Linear):
            raise NanogemmaError(f"layers.{i}.{TARGETS[target][0]}.{attr} is a {type(lin).__name__}, not a plain "
                                 "linear layer: add LoRA before packing, quantizing or adding another adapter")
        base = lin if cfg.base_dtype == "float32" else FrozenLinear(lin.weight, cfg.base_dtype)
        if target in cfg.targets:
            base = LoRALinear(base, cfg.rank, cfg.scaling, cfg.dropout, gen)
        setattr(parent, attr, base)
    return model


def _plain(module: nn.Module, weight: Tensor) -> nn.Linear:
    lin = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
    lin.weight = nn.Parameter(weight)
    return lin


def merge_lora(model: Gemma) -> Gemma:
    """Fold every adapter into its weight, W + (alpha / r) · B A, in place: a plain `Gemma` again.

    The sum is formed in float64 and rounded once to the model's dtype (float32 for a bfloat16 or int8
    base, whose float value is the dequantized one): the merged weight is the nearest float32 to the exact
    one, and the logits differ from the unmerged model's only by float32 rounding.
    """
    for _, _, parent, attr in _projections(model):
        m = getattr(parent, attr)
        if isinstance(m, LoRALinear):
            base = m.base
            w = base.dequantized() if isinstance(base, FrozenLinear) else base.weight
            dtype = torch.float32 if isinstance(base, FrozenLinear) else w.dtype
            with torch.no_grad():
                setattr(parent, attr, _plain(m, (w.double() + m.delta().to(w.device)).to(dtype)))
        elif isinstance(m, FrozenLinear):
            setattr(parent, attr, _plain(m, m.dequantized()))
    return _unfreeze(model)


def strip_lora(model: Gemma) -> Gemma:
    """Drop every adapter, in place: the frozen projections come back (a float32 base exactly as it was;
    a bfloat16 or int8 one as its float32 value)."""
    for _, _, parent, attr in _projections(model):
        m = getattr(parent, attr)
        if isinstance(m, LoRALinear):
            m = m.base
            setattr(parent, attr, m)
        if isinstance(m, FrozenLinear):
            setattr(parent, attr, _plain(m, m.dequantized()))
    return _unfreeze(model)


def _unfreeze(model: Gemma) -> Gemma:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# ------------------------------------------------------------------------------------ adapter state


def is_adapter_key(name: str) -> bool:
    return name.endswith(ADAPTER_SUFFIXES)


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors, by name (`layers.3.attn.wq.lora_A`, ...): all a LoRA checkpoint needs to hold."""
    return {k: p for k, p in model.named_parameters() if is_adapter_key(k)}


def load_adapter_state(model: nn.Module, state: dict[str, Tensor], source: str = "adapter") -> None:
    """Copy `state` into the model's adapters, strictly: the same names and shapes, every one."""
    mine = adapter_state(model)
    missing, extra = sorted(set(mine) - set(state)), sorted(set(state) - set(mine))
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which this model's adapters do not"
        raise NanogemmaError(f"{source} {what} ({len(missing)} missing, {len(extra)} unexpected): it was made "
                             "for other targets or another model")
    with torch.no_grad():
        for k, p in mine.items():
            if tuple(state[k].shape) != tuple(p.shape):
                raise NanogemmaError(f"{source}: {k} has shape {tuple(state[k].shape)}, this model wants "
                                     f"{tuple(p.shape)}: the adapter was made for another model")
            p.copy_(state[k])


def config_from_state(state: dict[str, Tensor], base: LoRAConfig) -> LoRAConfig:
    """`base` with the targets the tensors cover and the rank they have (checked to be one rank, all layers)."""
    found: dict[str, set[int]] = {}
    ranks = set()
    for k, v in state.items():
        parts = k.split(".")  # layers.I.part.attr.lora_X
        target = next((t for t, pa in TARGETS.items() if tuple(parts[2:4]) == pa), None)
        if len(parts) != 5 or parts[0] != "layers" or target is None or not is_adapter_key(k):
            raise NanogemmaError(f"adapter tensor {k} is not a LoRA weight of a Gemma projection")
        found.setdefault(target, set()).add(int(parts[1]))
        ranks.add(v.shape[0] if parts[4] == "lora_A" else v.shape[1])
    if len(ranks) != 1:
        raise NanogemmaError(f"adapter tensors have several ranks ({sorted(ranks)}); nanogemma supports one")
    layers = set().union(*found.values()) if found else set()
    if any(v != layers for v in found.values()) or layers != set(range(len(layers))):
        raise NanogemmaError("the adapter covers some layers or projections and not others; nanogemma supports "
                             "adapters on the same projections of every layer")
    return LoRAConfig(ranks.pop(), base.alpha, base.dropout, tuple(t for t in TARGETS if t in found),
                      base.base_dtype, base.rslora)


def merged_state(base: dict[str, Tensor], adapters: dict[str, Tensor], cfg: LoRAConfig) -> dict[str, Tensor]:
    """A plain state dict: `base` with every adapter folded into its weight (float64 sum, rounded to float32)."""
    out = dict(base)
    for k in adapters:
        if k.endswith(".lora_A"):
            name = k.removesuffix(".lora_A")
            a, b = adapters[k].double(), adapters[name + ".lora_B"].double()
            w = base[name + ".weight"]
            out[name + ".weight"] = (w.double() + cfg.scaling * (b @ a)).to(torch.float32)
    return out


# --------------------------------------------------------------------------------- files: ours, peft


def _hf_name(name: str) -> str:
    """`layers.3.attn.wq.lora_A` -> peft's `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`."""
    _, i, part, attr, ab = name.split(".")
    target = next(t for t, pa in TARGETS.items() if pa == (part, attr))
    return f"base_model.model.model.layers.{i}.{HF_MODULES[target]}.{ab}.weight"


def peft_config(cfg: LoRAConfig, base_model: str) -> dict:
    """The adapter_config.json peft writes for this adapter on transformers' Gemma3ForCausalLM."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": HF_NAMES.get(base_model, base_model),
            "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "use_rslora": cfg.rslora,
            "target_modules": sorted(HF_MODULES[t].split(".")[1] for t in cfg.targets), "bias": "none",
            "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
            "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}}


def save_peft(out_dir: str | Path, cfg: LoRAConfig, state: dict[str, Tensor], base_model: str,
              overwrite: bool = False) -> Path:
    """Write a peft adapter folder (assembled under a temporary name, then renamed: complete or absent)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise NanogemmaError(f"{out_dir} exists and is not empty; pass --overwrite or choose another folder")
    tensors = {_hf_name(k): v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir, folder=True) as tmp:  # complete or absent, even on a full disk
        save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(peft_config(cfg, base_model), indent=2) + "\n", encoding="utf-8")
        readable(tmp)
    return out_dir


def _ours_from_peft(key: str) -> str:
    m = _PEFT_KEY.match(key)
    target = next((t for t, hf in HF_MODULES.items() if m and hf == m.group(2)), None)
    if target is None:
        raise NanogemmaError(f"adapter tensor {key} is not a LoRA weight of a Gemma 3 projection "
                             "(peft names for Gemma3ForCausalLM: base_model.model.model.layers.N.self_attn.q_proj...)")
    part, attr = TARGETS[target]
    return f"layers.{m.group(1)}.{part}.{attr}.lora_{m.group(3)}"


def read_peft(folder: str | Path) -> tuple[LoRAConfig, dict[str, Tensor], str]:
    """A peft LoRA folder -> (config, adapter tensors under nanogemma names, the base model it names)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        conf = json.loads((folder / PEFT_CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise NanogemmaError(f"{folder / PEFT_CONFIG} cannot be read ({e})") from None
    if conf.get("peft_type") != "LORA":
        raise NanogemmaError(f"{folder} is a {conf.get('peft_type')} adapter; nanogemma reads LoRA adapters only")
    unsupported = [k for k in ("use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "modules_to_save",
                               "lora_bias", "layer_replication", "trainable_token_indices", "target_parameters")
                   if conf.get(k)] + ([] if conf.get("bias", "none") == "none" else ["bias"])
    if unsupported:
        raise NanogemmaError(f"{folder} uses peft's {unsupported[0]}, which nanogemma does not support")
    weights = folder / PEFT_WEIGHTS
    if not weights.is_file():
        raise NanogemmaError(f"{folder} has no {PEFT_WEIGHTS} (a .bin adapter? save it with safetensors)")
    state = {_ours_from_peft(k): v.float() for k, v in load_file(str(weights)).items()}
    base = LoRAConfig(rank=int(conf.get("r", 8)), alpha=float(conf.get("lora_alpha", 8)),
                      rslora=bool(conf.get("use_rslora", False)))
    return config_from_state(state, base), state, str(conf.get("base_model_name_or_path") or "")


def read_run_adapter(folder: str | Path) -> tuple[LoRAConfig, dict[str, Tensor], str] | None:
    """A nanogemma LoRA run (or one of its checkpoints) -> (config, adapter tensors, its base model), or None
    for a folder that is not one. Its nanogemma.json's `lora` holds the config and the base (--init-from)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta_path = folder / "nanogemma.json"
    if not meta_path.is_file():
        return None
    try:
        lora = json.loads(meta_path.read_text(encoding="utf-8")).get("lora")
    except (OSError, json.JSONDecodeError) as e:
        raise NanogemmaError(f"{meta_path} cannot be read ({e})") from None
    if not lora:
        return None
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise NanogemmaError(f"{weights} is missing")
    return LoRAConfig.from_dict(lora), load_file(str(weights)), lora["base"]


def read_adapter(folder: str | Path) -> tuple[LoRAConfig, dict[str, Tensor], str]:
    """A peft adapter folder or a nanogemma LoRA run -> (config, adapter tensors, the base model it names)."""
    folder = Path(folder)
    if (folder / PEFT_CONFIG).is_file():
        return read_peft(folder)
    found = read_run_adapter(folder) if folder.is_dir() else None
    if found is None:
        raise NanogemmaError(f"{folder} is not a LoRA adapter: expected a peft folder ({PEFT_CONFIG} + "
                             f"{PEFT_WEIGHTS}) or a run of `nanogemma train --lora-rank N`")
    return found


def add_adapter(model: Gemma, folder: str | Path, merge: bool = True) -> Gemma:
    """Put the adapter in `folder` (peft's or a nanogemma LoRA run) on `model`, in place.

    `merge` (the default, for inference) folds it into the weights: the model stays a plain `Gemma` that
    packing and int8 conversion then speed up. With `merge=False` the `LoRALinear` modules stay.
    """
    cfg, state, _ = read_adapter(folder)
    apply_lora(model, LoRAConfig(cfg.rank, cfg.alpha, 0.0, cfg.targets, "float32", cfg.rslora))
    load_adapter_state(model, state, str(folder))
    return merge_lora(model) if merge else model
