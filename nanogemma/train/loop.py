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

import functools
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from ..errors import NanogemmaError
from . import build, tokenizer_files
from . import checkpoint as ckpt
from .config import TrainConfig
from .data import Dataset, WindowSampler, open_dataset, validation_offsets, windows
from .distributed import World, any_flag, barrier, setup, teardown, wrap
from .loss import LanguageModelLoss
from .monitor import Monitor, peak_flops, train_flops_per_token
from .schedule import WarmupCosine
from .step import evaluate, make_optimizer, train_step

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


def evaluate_and_checkpoint(run, result: TrainResult) -> None:
    """After an optimizer step: evaluate every `eval_every` steps and at the end, and write `last` (and
    `best`) when due. Shared by the PyTorch `Run` and the JAX one, which offer the same
    `cfg`, `step`, `evaluate()`, `save()` and `save_best()`.
    """
    cfg = run.cfg
    final = run.step == cfg.max_steps
    saved = False
    if final or (cfg.eval_every and run.step % cfg.eval_every == 0):
        val_loss, best = run.evaluate()
        result.val_loss = val_loss
        every = cfg.checkpoint_every
        if best or final or not every or run.step % every == 0:
            run.save("last", val_loss)
            saved = True
            if best:
                run.save_best(val_loss)
    if not saved and cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0:
        run.save("last")


class Run:
    """The state of one training process. `train()` below is the whole lifecycle."""

    def __init__(self, cfg: TrainConfig, world: World) -> None:
        self.cfg, self.world = cfg, world
        self.run_dir = Path(cfg.out_dir)
        resume_from = build.check_run_dir(self.run_dir, cfg.resume)
        self.data: Dataset = open_dataset(cfg.data, cfg.seq_len)
        self.dtype = build.resolve_dtype(cfg.dtype, world.device)
        mcfg, state, self.source = build.initial_model(cfg, self.data, resume_from)
        if self.data.vocab_size > mcfg.vocab_size:
            raise NanogemmaError(f"{self.data.folder} has {self.data.vocab_size:,} token ids but the checkpoint's "
                                 f"model knows {mcfg.vocab_size:,}: resume with the run's own data")
        self.mcfg = mcfg
        self.model = build.make_model(mcfg, state, cfg, world.device)
        del state
        self.wrapped = wrap(self.model, world, cfg.fsdp)
        self.forward = torch.compile(self.wrapped) if cfg.compile else self.wrapped
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps,
                                        world.device)
        self.scaler = torch.amp.GradScaler(world.device.type) if self.dtype == torch.float16 else None
        self.schedule = WarmupCosine(cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps)
        self.sampler = WindowSampler(len(self.data.train), cfg.seq_len, cfg.seed)
        bos = self.data.bos_id
        self.val_offsets = validation_offsets(self.data.val, cfg.seq_len, cfg.eval_batches * cfg.batch_size,
                                              self.data.eot_id if bos is None else bos)
        self.windows = functools.partial(windows, bos_id=bos)
        self.step = self.tokens = 0
        self.best_val: float | None = None
        self.last_saved: tuple[int, Path] | None = None
        if resume_from is not None:
            self._restore(resume_from)
        self.tokens_per_step = world.size * cfg.grad_accum * cfg.batch_size * cfg.seq_len
        self.flops_per_token = train_flops_per_token(mcfg, cfg.seq_len)
        self.peak = peak_flops(world.device, self.dtype, cfg.peak_tflops)

    # ------------------------------------------------------------------------------------ checkpoints
    def _options(self) -> StateDictOptions:
        return StateDictOptions(full_state_dict=True, cpu_offload=True)

    def _restore(self, folder: Path) -> None:
        state = ckpt.load_trainer_state(folder)
        self.schedule.check_resumable(state["schedule"])
        self.sampler.check_resumable(state["sampler"])
        opts = StateDictOptions(full_state_dict=self.world.distributed)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=opts)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        build.set_rng_state(state["rng"])
        self.step, self.tokens, self.best_val = state["step"], state["tokens"], state["best_val"]
        self.last_saved = (self.step, folder)

    def save(self, name: str = "last", val_loss: float | None = None) -> Path | None:
        """Write checkpoint `name` (every process takes part in gathering; the main one writes)."""
        weights = get_model_state_dict(self.model, options=self._options())
        optim = get_optimizer_state_dict(self.model, self.optimizer, options=self._options())
        folder = None
        if self.world.main:
            trainer = {"version": ckpt.VERSION, "step": self.step, "tokens": self.tokens, "optimizer": optim,
                       "schedule": self.schedule.state_dict(), "sampler": self.sampler.state_dict(self.step),
                       "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                       "rng": build.rng_state(), "best_val": self.best_val, "world_size": self.world.size}
            meta = ckpt.model_meta(self.mcfg.to_dict(), self.cfg, self.data.describe(), self.step, self.tokens,
                                   val_loss, name)
            folder = ckpt.save_checkpoint(self.run_dir, name, weights, trainer, meta)
            if name == "best" or ckpt.find_checkpoint(self.run_dir, "best") is None:
                ckpt.publish(self.run_dir, folder)  # RUN_DIR itself loads as the best model so far
        barrier(self.world)
        self.last_saved = (self.step, self.run_dir / "last")
        return folder

    # ------------------------------------------------------------------------------------- evaluation
    def sample(self) -> str | None:
        """A short text from the model, the same seed each time, so samples show the model changing."""
        cfg = self.cfg
        if cfg.sample_tokens == 0 or cfg.fsdp:
            return None  # sharded weights: generation would need every process in lockstep
        from ..generation import generate_ids

        tok = self.data.tokenizer
        start = tok.eot_id if tok.bos_id is None else tok.bos_id  # what precedes a document in the data
        ids = [start] + tok.encode(cfg.sample_prompt)
        ids = ids[-(self.mcfg.max_seq_len - 1):]
        new = list(generate_ids(self.model, ids, cfg.sample_tokens, temperature=cfg.sample_temperature,
                                seed=cfg.seed, stop_ids={tok.eot_id}))
        self.model.train()
        return cfg.sample_prompt + tok.decode(new)

    def evaluate(self) -> tuple[float, str | None]:
        cfg = self.cfg
        r = evaluate(self.forward, self.data.val, self.val_offsets, cfg.seq_len, cfg.batch_size, self.world,
                     self.dtype, self.windows)
        text = self.sample() if self.world.main else None
        self.monitor.record("eval", self.step, val_loss=r.loss, val_ppl=r.perplexity, val_acc=r.accuracy,
                            val_tokens=r.tokens, sample=text)
        self.monitor.say(f"step {self.step}: val loss {r.loss:.4f}, perplexity {r.perplexity:.2f}, "
                         f"accuracy {r.accuracy:.1%}" + (f" | {text!r}" if text else ""))
        improved = self.best_val is None or r.loss < self.best_val
        if improved:
            self.best_val = r.loss
        return r.loss, ("best" if improved else None)

    # ------------------------------------------------------------------------------------------- loop
    def batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        cfg, w = self.cfg, self.world
        offsets = self.sampler.offsets(step, w.size * cfg.grad_accum * cfg.batch_size)
        offsets = offsets.reshape(w.size * cfg.grad_accum, cfg.batch_size)
        mine = offsets[w.rank * cfg.grad_accum:(w.rank + 1) * cfg.grad_accum]
        return [self.windows(self.data.train, row, cfg.seq_len, w.device) for row in mine]

    def run(self, monitor: Monitor, stop: StopRequest, loss_fn: LossFn | None = None) -> TrainResult:
        cfg = self.cfg
        # The head fused into the loss, except under FSDP2, where the head's weight is whole only inside forward.
        loss_fn = loss_fn or LanguageModelLoss(self.model, fused=not cfg.fsdp)
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
            r = train_step(self.forward, self.params, self.optimizer, self.scaler, self.batches(self.step), lr,
                           cfg.grad_clip, self.world, self.dtype, loss_fn)
            if self.world.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            if not math.isfinite(r.loss):
                self._stop_non_finite(r.loss, lr)
            self.step += 1
            self.tokens += self.tokens_per_step
            result.losses.append(r.loss)
            result.seconds += dt
            window_time += dt
            window_tokens += self.tokens_per_step
            tps = window_tokens / max(window_time, 1e-9)
            monitor.advance(1, loss=f"{r.loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                mfu = tps * self.flops_per_token / self.peak if self.peak else None
                monitor.record("train", self.step, loss=r.loss, lr=lr, grad_norm=r.grad_norm, tokens=self.tokens,
                               tokens_per_s=tps, mfu=mfu, skipped=r.skipped, time=round(result.seconds, 3))
                window_time, window_tokens = 0.0, 0
            evaluate_and_checkpoint(self, result)
        result.step, result.tokens, result.best_val_loss = self.step, self.tokens, self.best_val
        result.tokens_per_s = len(result.losses) * self.tokens_per_step / max(result.seconds, 1e-9)
        return result

    def save_best(self, val_loss: float) -> None:
        """`best` = the `last` just written: hard links, no second write of the weights or optimizer."""
        if self.world.main:
            folder = ckpt.clone_checkpoint(self.run_dir, "last", "best", {"checkpoint": "best",
                                                                           "val_loss": val_loss})
            ckpt.publish(self.run_dir, folder)
        barrier(self.world)

    def _stop_non_finite(self, loss: float, lr: float) -> None:
        self.monitor.record("stop", self.step + 1, reason=f"loss {loss}", lr=lr)
        if self.last_saved is None:
            where = "no checkpoint was written yet"
        else:
            where = f"the last good checkpoint is {self.last_saved[1]} (step {self.last_saved[0]}), left untouched"
        raise NanogemmaError(
            f"the training loss became {loss} at step {self.step + 1} (lr {lr:.3g}); the run stopped before "
            f"updating the weights and {where}. Lower --lr or raise --warmup-steps"
            + (", or use --dtype bfloat16 instead of float16" if self.dtype == torch.float16 else "")
            + ", then restart (or --resume)")


def train(cfg: TrainConfig, loss_fn: LossFn | None = None) -> TrainResult:
    """Run training as `cfg` says (under torchrun: as one of its processes). See the module docstring.

    `loss_fn(model, inputs, targets)` replaces the next-token cross-entropy (tests use it to inject faults).
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    world = setup(cfg.device)
    monitor = None
    try:
        run = Run(cfg, world)
        run_dir = run.run_dir
        if world.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.save_settings(run_dir, cfg)
            if not (run_dir / "tokenizer.json").is_file():
                tokenizer_files.write(run_dir, run.data.tokenizer)
            if cfg.resume:
                ckpt.trim_metrics(run_dir, run.step)
        barrier(world)
        monitor = Monitor(run_dir, world.main, cfg.max_steps, run.step, cfg.progress, cfg.tensorboard)
        logs = "metrics.jsonl" + (" + tensorboard/" if monitor.tb else "")
        if monitor.tb_missing:
            logs += " (pip install tensorboard for TensorBoard logs)"
        monitor.say(f"{_banner(run)}; logs: {logs}")
        with StopRequest(lambda: monitor.say("stopping after this step and saving a checkpoint "
                                             "(Ctrl-C again to stop at once)")) as stop:
            return run.run(monitor, stop, loss_fn)
    finally:
        if monitor is not None:
            monitor.close()
        teardown(world)


def _banner(run: Run) -> str:
    c, m = run.cfg, run.mcfg
    what = f"resuming at step {run.step}" if c.resume else f"weights: {run.source}"
    n = sum(p.numel() for p in run.model.parameters())
    procs = f", {run.world.size} processes ({'FSDP2' if c.fsdp else 'DDP'})" if run.world.distributed else ""
    return (f"training {n / 1e6:.2f}M parameters (d={m.hidden_size}, {m.num_layers} layers, vocab {m.vocab_size:,}"
            f"{', untied head' if not m.tie_embeddings else ''}) on {run.data.folder}, {what}; "
            f"{run.world.device} {str(run.dtype).removeprefix('torch.')}{procs}; {run.tokens_per_step:,} tokens "
            f"per step; writing to {run.run_dir}")
