"""The training run: setup, the loop over optimizer steps, evaluation, checkpoints, and how it stops.

    for step in range(start, max_steps):
        lr = schedule(step)                                    # warmup + cosine, in optimizer steps
        batches = this process's share of step's random windows
        loss, grad_norm = train_step(...)                      # accumulate, unscale, clip, AdamW
        stop on a non-finite loss (before the update, so no NaN reaches the weights or a checkpoint)
        every log_every: metrics.jsonl, TensorBoard, the progress bar
        every eval_every: validation loss / perplexity / accuracy on fixed windows, a sample, `best`
        every checkpoint_every (default: with each evaluation): `last`
        on Ctrl-C (or SIGTERM): finish the step, write `last`, return

A run stops in one of four ways: it reaches max_steps (final evaluation, `last`, `best`); Ctrl-C (writes
`last`, returns `interrupted`; the CLI exits 130); a non-finite loss (raises NanogemmaError naming the
last good checkpoint, which is left untouched); or an error (nothing written after the last checkpoint).
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from ..errors import NanogemmaError
from ..files import OutputLock, clean_orphans
from ..lora import adapter_state, is_adapter_key
from . import build, tokenizer_files
from . import checkpoint as ckpt
from .config import TrainConfig, decay_end, lora_config
from .data import Dataset, PackedSampler, Packing, WindowSampler, open_dataset, validation_offsets, windows
from .distributed import World, any_flag, barrier, setup, teardown, wrap
from .loss import LanguageModelLoss
from .monitor import Monitor, peak_flops, train_flops_per_token
from .schedule import WarmupCosine
from .step import EvalResult, StepResult, evaluate, make_optimizer, train_step

LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TrainResult:
    run_dir: Path
    step: int  # optimizer steps done
    tokens: int  # training tokens consumed, all processes
    losses: list[float] = field(default_factory=list)  # the training loss of each step run by this call
    val_loss: float | None = None  # at the last evaluation
    best_val_loss: float | None = None
    interrupted: bool = False
    seconds: float = 0.0  # time spent in training steps by this call
    tokens_per_s: float = 0.0


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the current step; a second Ctrl-C stops at once."""

    def __init__(self, on_first) -> None:
        self.requested = False
        self.on_first = on_first
        self.saved: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.on_first()

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)


class Loop:
    """What every training run does, whichever backend computes its steps: this class is the loop.

    It owns the run folder, the data (training windows drawn from (seed, step), fixed validation windows),
    the warmup + cosine schedule, the step and token counts, evaluation and checkpoint cadence, `best`,
    the non-finite stop, the banner and the checkpoint format. A backend subclass (`Run` below for
    PyTorch, `jax.loop.JaxRun` for JAX) supplies only what differs: `build` (model and optimizer),
    `train_step`, `evaluate_windows`, `generate`, `checkpoint_state` / `restore_optimizer`, and a few
    facts for the banner.
    """

    float16 = False  # the non-finite hint suggests bfloat16 where the run uses float16
    trainer_extras: dict = {}  # backend-specific keys of trainer.pt
    model_extras: dict = {}  # backend-specific keys of nanogemma.json (a LoRA run's `lora`)

    def __init__(self, cfg: TrainConfig, world: World) -> None:
        self.cfg, self.world = cfg, world
        self.run_dir = Path(cfg.out_dir)
        # The run folder is this process's from here on (`drive` releases it): a second run into it is refused.
        self.lock = OutputLock(self.run_dir, "train") if world.main else None
        if self.lock is not None:
            self.lock.acquire()
        try:
            self._setup(cfg, world)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def _setup(self, cfg: TrainConfig, world: World) -> None:
        resume_from = build.check_run_dir(self.run_dir, cfg.resume)
        self.data: Dataset = open_dataset(cfg.data, cfg.seq_len, cfg.verify_data)
        self.dtype = self.resolve_dtype(cfg.dtype)
        mcfg, state, self.source = build.initial_model(cfg, self.data, resume_from)
        if self.data.vocab_size > mcfg.vocab_size:
            raise NanogemmaError(f"{self.data.folder} has {self.data.vocab_size:,} token ids but the checkpoint's "
                                 f"model knows {mcfg.vocab_size:,}: resume with the run's own data")
        self.mcfg = mcfg
        self.build(state)
        del state
        self.schedule = WarmupCosine(cfg.lr, cfg.min_lr, cfg.warmup_steps, decay_end(cfg))
        self.sampler = WindowSampler(len(self.data.train), cfg.seq_len, cfg.seed)
        # Gemma-tokenized data: <bos> starts every window, and validation windows start at documents' <bos>.
        self.bos_id = bos = self.data.bos_id
        if not self.data.packed:
            self.val_offsets = validation_offsets(self.data.val, cfg.seq_len, cfg.eval_batches * cfg.batch_size,
                                                  self.data.eot_id if bos is None else bos)
        else:  # chat data: whole conversations packed into rows (train/data.py); offsets are rows
            d = self.data
            train_mask = d.train_mask if cfg.loss_mask else np.ones_like(d.train_mask)
            self.packing = Packing(d.train, train_mask, bos, cfg.seq_len, cfg.seed)
            self.val_packing = Packing(d.val, d.val_mask, bos, cfg.seq_len, cfg.seed, shuffle=False)
            self.sampler = PackedSampler(self.packing)
            rows = len(self.val_packing.epoch_rows(0))
            self.val_offsets = np.arange(min(rows, cfg.eval_batches * cfg.batch_size), dtype=np.int64)
        self.step = self.tokens = 0
        self.train_seconds = 0.0  # time in training steps, over every session of the run (resumes continue it)
        self.best_val: float | None = None
        self.last_saved: tuple[int, Path] | None = None
        if resume_from is not None:
            self._restore(resume_from)
        self.tokens_per_step = world.size * cfg.grad_accum * cfg.batch_size * cfg.seq_len
        self.flops_per_token = train_flops_per_token(mcfg, cfg.seq_len)
        self.peak = self.peak_flops()

    # ------------------------------------------------------------------------- what a backend supplies
    def resolve_dtype(self, name: str):
        raise NotImplementedError

    def build(self, state: dict | None) -> None:
        """The model (from `state`, or freshly initialised when None) and its optimizer."""
        raise NotImplementedError

    def peak_flops(self) -> float | None:
        raise NotImplementedError

    def train_step(self, offsets: np.ndarray, lr: float) -> StepResult:
        """One optimizer step on the windows at `offsets` (grad_accum x batch_size, this process's share)."""
        raise NotImplementedError

    def evaluate_windows(self) -> EvalResult:
        raise NotImplementedError

    def generate(self, ids: list[int], stop_ids: set[int]) -> list[int]:
        raise NotImplementedError

    def checkpoint_state(self) -> tuple[dict, dict]:
        """(weights, optimizer state in torch's format); every process takes part."""
        raise NotImplementedError

    def restore_optimizer(self, state: dict) -> None:
        raise NotImplementedError

    def parameter_count(self) -> int:
        raise NotImplementedError

    def hardware(self) -> str:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------ checkpoints
    def _restore(self, folder: Path) -> None:
        state = ckpt.load_trainer_state(folder)
        self.schedule.check_resumable(state["schedule"])
        self.sampler.check_resumable(state["sampler"])
        self.restore_optimizer(state)
        build.set_rng_state(state["rng"])
        self.step, self.tokens, self.best_val = state["step"], state["tokens"], state["best_val"]
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.last_saved = (self.step, folder)

    def save(self, name: str = "last", val_loss: float | None = None) -> Path | None:
        """Write checkpoint `name` (every process takes part in gathering; the main one writes)."""
        weights, optim = self.checkpoint_state()
        folder = None
        if self.world.main:
            trainer = {"version": ckpt.VERSION, "step": self.step, "tokens": self.tokens, "optimizer": optim,
                       "schedule": self.schedule.state_dict(), "sampler": self.sampler.state_dict(self.step),
                       "scaler": None, "rng": build.rng_state(), "best_val": self.best_val,
                       "world_size": self.world.size, "train_seconds": self.train_seconds, **self.trainer_extras}
            meta = ckpt.model_meta(self.mcfg.to_dict(), self.cfg, self.data.describe(), self.step, self.tokens,
                                   val_loss, name) | self.model_extras
            folder = ckpt.save_checkpoint(self.run_dir, name, weights, trainer, meta)
            if name == "best" or ckpt.find_checkpoint(self.run_dir, "best") is None:
                ckpt.publish(self.run_dir, folder)  # RUN_DIR itself loads as the best model so far
        barrier(self.world)
        self.last_saved = (self.step, self.run_dir / "last")
        return folder

    def save_best(self, val_loss: float) -> None:
        """`best` = the `last` just written: hard links, no second write of the weights or optimizer."""
        if self.world.main:
            folder = ckpt.clone_checkpoint(self.run_dir, "last", "best", {"checkpoint": "best",
                                                                           "val_loss": val_loss})
            ckpt.publish(self.run_dir, folder)
        barrier(self.world)

    # ------------------------------------------------------------------------------------- evaluation
    def sample(self) -> str | None:
        """A short text from the model, the same seed each time, so samples show the model changing."""
        cfg = self.cfg
        if cfg.sample_tokens == 0 or cfg.fsdp:
            return None  # sharded weights: generation would need every process in lockstep
        tok = self.data.tokenizer
        start = tok.eot_id if tok.bos_id is None else tok.bos_id  # what precedes a document in the data
        ids = ([start] + tok.encode(cfg.sample_prompt))[-(self.mcfg.max_seq_len - 1):]
        return cfg.sample_prompt + tok.decode(self.generate(ids, {tok.eot_id}))

    def evaluate(self) -> tuple[float, str | None]:
        r = self.evaluate_windows()
        text = self.sample() if self.world.main else None
        self.monitor.record("eval", self.step, val_loss=r.loss, val_ppl=r.perplexity, val_acc=r.accuracy,
                            val_tokens=r.tokens, sample=text)
        self.monitor.say(f"step {self.step}: val loss {r.loss:.4f}, perplexity {r.perplexity:.2f}, "
                         f"accuracy {r.accuracy:.1%}" + (f" | {text!r}" if text else ""))
        improved = self.best_val is None or r.loss < self.best_val
        if improved:
            self.best_val = r.loss
        return r.loss, ("best" if improved else None)

    def evaluate_and_checkpoint(self, result: TrainResult) -> None:
        """After an optimizer step: evaluate every `eval_every` steps and at the end, and write `last` (and
        `best`) when due."""
        cfg = self.cfg
        final = self.step == cfg.max_steps
        saved = False
        if final or (cfg.eval_every and self.step % cfg.eval_every == 0):
            val_loss, best = self.evaluate()
            result.val_loss = val_loss
            every = cfg.checkpoint_every
            if best or final or not every or self.step % every == 0:
                self.save("last", val_loss)
                saved = True
                if best:
                    self.save_best(val_loss)
        if not saved and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
            self.save("last")

    # ------------------------------------------------------------------------------------------- loop
    def offsets(self, step: int) -> np.ndarray:
        """This process's windows of `step`, as (grad_accum, batch_size) offsets into the training tokens."""
        cfg, w = self.cfg, self.world
        offsets = self.sampler.offsets(step, w.size * cfg.grad_accum * cfg.batch_size)
        offsets = offsets.reshape(w.size * cfg.grad_accum, cfg.batch_size)
        return offsets[w.rank * cfg.grad_accum:(w.rank + 1) * cfg.grad_accum]

    def run(self, monitor: Monitor, stop: StopRequest) -> TrainResult:
        cfg = self.cfg
        self.monitor = monitor
        result = TrainResult(self.run_dir, self.step, self.tokens, best_val_loss=self.best_val)
        window_time, window_tokens = 0.0, 0
        while self.step < cfg.max_steps:
            if any_flag(stop.requested, self.world):
                self.save("last")
                result.interrupted = True
                break
            lr = self.schedule(self.step)
            t0 = time.perf_counter()
            r = self.train_step(self.offsets(self.step), lr)  # returns once the device is done
            dt = time.perf_counter() - t0
            if not math.isfinite(r.loss):
                self._stop_non_finite(r.loss, lr)
            self.step += 1
            self.tokens += self.tokens_per_step
            result.losses.append(r.loss)
            result.seconds += dt
            self.train_seconds += dt
            window_time += dt
            window_tokens += self.tokens_per_step
            tps = window_tokens / max(window_time, 1e-9)
            monitor.advance(1, loss=f"{r.loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                mfu = tps * self.flops_per_token / self.peak if self.peak else None
                monitor.record("train", self.step, loss=r.loss, lr=lr, grad_norm=r.grad_norm, tokens=self.tokens,
                               tokens_per_s=tps, mfu=mfu, skipped=r.skipped, time=round(self.train_seconds, 3))
                monitor.log(f"step {self.step}/{cfg.max_steps}: loss {r.loss:.4f}, lr {lr:.2e}, grad norm "
                            f"{r.grad_norm:.3g}, {tps:,.0f} tokens/s" + (f", MFU {mfu:.1%}" if mfu else ""))
                window_time, window_tokens = 0.0, 0
            self.evaluate_and_checkpoint(result)
        result.step, result.tokens, result.best_val_loss = self.step, self.tokens, self.best_val
        result.tokens_per_s = len(result.losses) * self.tokens_per_step / max(result.seconds, 1e-9)
        return result

    def _stop_non_finite(self, loss: float, lr: float) -> None:
        self.monitor.record("stop", self.step + 1, reason=f"loss {loss}", lr=lr)
        if self.last_saved is None:
            where = "no checkpoint was written yet"
        else:
            where = f"the last good checkpoint is {self.last_saved[1]} (step {self.last_saved[0]}), left untouched"
        raise NanogemmaError(
            f"the training loss became {loss} at step {self.step + 1} (lr {lr:.3g}); the run stopped before "
            f"updating the weights and {where}. Lower --lr or raise --warmup-steps"
            + (", or use --dtype bfloat16 instead of float16" if self.float16 else "")
            + ", then restart (or --resume)")

    def banner(self) -> str:
        c, m = self.cfg, self.mcfg
        what = f"resuming at step {self.step}" if c.resume else f"weights: {self.source}"
        return (f"training {self.parameter_count() / 1e6:.2f}M parameters (d={m.hidden_size}, {m.num_layers} "
                f"layers, vocab {m.vocab_size:,}{', untied head' if not m.tie_embeddings else ''}) on "
                f"{self.data.folder}, {what}; {self.hardware()}; {self.tokens_per_step:,} tokens per step; "
                f"writing to {self.run_dir}")


def drive(run: Loop) -> TrainResult:
    """The run folder, the monitor and the banner, then the loop until it stops: the same for both backends."""
    cfg, world, run_dir = run.cfg, run.world, run.run_dir
    try:
        if world.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            clean_orphans(run_dir)
            ckpt.save_settings(run_dir, cfg)
            if not cfg.resume or not (run_dir / "tokenizer.json").is_file():
                tokenizer_files.write(run_dir, run.data.tokenizer)
            ckpt.trim_metrics(run_dir, run.step)  # a restart from step 0 drops the records of the first attempt
        barrier(world)
        monitor = Monitor(run_dir, world.main, cfg.max_steps, run.step, cfg.progress, cfg.tensorboard)
    except BaseException:
        run.release()
        raise
    try:
        logs = "metrics.jsonl" + (" + tensorboard/" if monitor.tb else "")
        if monitor.tb_missing:
            logs += " (pip install tensorboard for TensorBoard logs)"
        monitor.say(f"{run.banner()}; logs: {logs}")
        with StopRequest(lambda: monitor.say("stopping after this step and saving a checkpoint "
                                             "(Ctrl-C again to stop at once)")) as stop:
            return run.run(monitor, stop)
    finally:
        monitor.close()
        run.release()


class Run(Loop):
    """The PyTorch backend: DDP / FSDP2 under torchrun, autocast, a gradient scaler for float16."""

    def __init__(self, cfg: TrainConfig, world: World, loss_fn: LossFn | None = None) -> None:
        self.loss_fn = loss_fn
        super().__init__(cfg, world)

    def resolve_dtype(self, name: str) -> torch.dtype:
        dtype = build.resolve_dtype(name, self.world.device)
        self.float16 = dtype == torch.float16
        return dtype

    def build(self, state: dict | None) -> None:
        cfg, world = self.cfg, self.world
        self.lora = lora_config(cfg)
        if self.lora is not None and self.lora.dropout > 0:
            # Dropout draws from the global generator: seeded, a run repeats from its seed (and per process,
            # so processes drop different units); a resumed run restores the generator from its checkpoint.
            torch.manual_seed(cfg.seed * 1000 + world.rank)
        self.model = build.make_model(self.mcfg, state, cfg, world.device)
        self.wrapped = wrap(self.model, world, cfg.fsdp)
        self.forward = torch.compile(self.wrapped) if cfg.compile else self.wrapped
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps,
                                        world.device)
        self.scaler = torch.amp.GradScaler(world.device.type) if self.dtype == torch.float16 else None
        # The head fused into the loss, except under FSDP2, where the head's weight is whole only inside forward.
        self.eval_loss = LanguageModelLoss(self.model, fused=not cfg.fsdp)  # evaluation: never an injected loss
        self.loss_fn = self.loss_fn or self.eval_loss

    def peak_flops(self) -> float | None:
        return peak_flops(self.world.device, self.dtype, self.cfg.peak_tflops)

    def windows(self, tokens, offsets, seq_len: int, device: torch.device):
        if self.data.packed:  # offsets are row indices of the packing (validation's, when tokens is val)
            return (self.val_packing if tokens is self.data.val else self.packing).batch(offsets, device)
        return windows(tokens, offsets, seq_len, device, bos_id=self.bos_id)

    def train_step(self, offsets: np.ndarray, lr: float) -> StepResult:
        cfg, w = self.cfg, self.world
        batches = [self.windows(self.data.train, row, cfg.seq_len, w.device) for row in offsets]
        r = train_step(self.forward, self.params, self.optimizer, self.scaler, batches, lr, cfg.grad_clip, w,
                       self.dtype, self.loss_fn)
        if w.device.type == "cuda":
            torch.cuda.synchronize()
        return r

    def evaluate_windows(self) -> EvalResult:
        cfg = self.cfg
        return evaluate(self.forward, self.data.val, self.val_offsets, cfg.seq_len, cfg.batch_size, self.world,
                        self.dtype, self.windows, self.eval_loss)

    def generate(self, ids: list[int], stop_ids: set[int]) -> list[int]:
        from ..generation import generate_ids

        cfg = self.cfg
        new = list(generate_ids(self.model, ids, cfg.sample_tokens, temperature=cfg.sample_temperature,
                                seed=cfg.seed, stop_ids=stop_ids))
        self.model.train()
        return new

    # ------------------------------------------------------------------------------------ checkpoints
    def _options(self) -> StateDictOptions:
        return StateDictOptions(full_state_dict=True, cpu_offload=True)

    @property
    def trainer_extras(self) -> dict:
        return {"scaler": self.scaler.state_dict() if self.scaler is not None else None}

    @property
    def model_extras(self) -> dict:
        # A LoRA checkpoint holds the adapters only; its metadata says how to rebuild the model around them.
        return {} if self.lora is None else {"lora": {**self.lora.to_dict(), "base": self.cfg.init_from}}

    def checkpoint_state(self) -> tuple[dict, dict]:
        if self.lora is not None and not self.cfg.fsdp:  # the adapters are whole in every process
            return adapter_state(self.model), get_optimizer_state_dict(self.model, self.optimizer,
                                                                       options=self._options())
        weights = get_model_state_dict(self.model, options=self._options())
        if self.lora is not None:
            weights = {k: v for k, v in weights.items() if is_adapter_key(k)}
        optim = get_optimizer_state_dict(self.model, self.optimizer, options=self._options())
        return weights, optim

    def restore_optimizer(self, state: dict) -> None:
        opts = StateDictOptions(full_state_dict=self.world.distributed)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=opts)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.params)  # the trained ones: with LoRA, the adapters

    def hardware(self) -> str:
        c, w = self.cfg, self.world
        procs = f", {w.size} processes ({'FSDP2' if c.fsdp else 'DDP'})" if w.distributed else ""
        lora = ""
        if self.lora is not None:
            frozen = sum(p.numel() for p in self.model.parameters() if not p.requires_grad)
            lora = (f"; LoRA rank {self.lora.rank} on {','.join(self.lora.targets)} over {frozen / 1e6:.1f}M frozen "
                    f"parameters ({self.lora.base_dtype} projections)")
        recompute = ", recomputing activations in backward" if c.activation_checkpointing else ""
        return f"{w.device} {str(self.dtype).removeprefix('torch.')}{procs}{recompute}{lora}"


def train(cfg: TrainConfig, loss_fn: LossFn | None = None) -> TrainResult:
    """Run training as `cfg` says (under torchrun: as one of its processes). See the module docstring.

    `loss_fn(model, inputs, targets)` replaces the next-token cross-entropy (tests use it to inject faults).
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    world = setup(cfg.device)
    try:
        return drive(Run(cfg, world, loss_fn))
    finally:
        teardown(world)
