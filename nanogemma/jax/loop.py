"""`nanogemma train --backend jax`: the PyTorch training run, with the JAX step in place of the torch one.

Everything around the step is the PyTorch trainer's own code, reused rather than rewritten, so the two
backends cannot drift apart: the settings (`train.config`), the data windows drawn per step from
(seed, step) (`train.data.WindowSampler`), the fixed validation windows, the `WarmupCosine` schedule,
the run folder and its atomic checkpoints (`train.checkpoint`), metrics.jsonl and the progress bar
(`train.monitor`), Ctrl-C handling. Two consequences:

* **Same run, either backend.** A from-scratch run takes its initial weights from `Gemma.init_weights`
  (the PyTorch initialiser, same seed), and every step sees the same windows at the same learning rate,
  so the JAX losses are the PyTorch losses up to float rounding (tests/test_jax_train.py compares them).
* **Checkpoints cross over.** A checkpoint holds `model.safetensors` (float32, nanogemma names) and a
  `trainer.pt` in the PyTorch trainer's format, optimizer included: optax's Adam moments are stored as
  torch's `exp_avg` / `exp_avg_sq` keyed by parameter name. So `nanogemma.load(RUN_DIR)` reads a JAX run,
  and either backend can `--resume` a run the other one started.

Not supported here: several processes (torchrun), FSDP, float16 (use bfloat16), `--compile` (always jitted).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..errors import NanogemmaError
from ..train import build, tokenizer_files
from ..train import checkpoint as ckpt
from ..train.config import TrainConfig
from ..train.data import Dataset, WindowSampler, open_dataset, validation_offsets
from ..train.loop import StopRequest, TrainResult, evaluate_and_checkpoint
from ..train.monitor import Monitor, train_flops_per_token
from ..train.schedule import WarmupCosine
from .load import to_params
from .model import JaxGemma
from .step import programs, windows


def _compute_dtype(name: str) -> Any:
    if name == "float16":
        raise NanogemmaError("the JAX backend trains in float32 or bfloat16, not float16: pass --dtype bfloat16")
    if name == "auto":  # bfloat16 on accelerators, float32 on CPUs (where bfloat16 is usually slower)
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


# ------------------------------------------------------------------------------ optimizer state <-> torch


def optimizer_to_torch(opt_state: Any, params: dict[str, Any], cfg: TrainConfig, lr: float) -> dict[str, Any]:
    """optax AdamW state -> the dict `torch.distributed.checkpoint.state_dict.get_optimizer_state_dict` makes."""
    import torch

    t = lambda x: torch.from_numpy(np.array(x, dtype=np.float32))  # noqa: E731
    adam = _adam_state(opt_state)
    mu, nu, steps = adam.mu, adam.nu, float(np.asarray(adam.count))
    state = {k: {"step": torch.tensor(steps), "exp_avg": t(mu[k]), "exp_avg_sq": t(nu[k])} for k in params} if steps else {}
    mask = {k: np.ndim(v) >= 2 for k, v in params.items()}  # the decay rule of `train.decay_mask`
    # Implementation flags (fused, foreach, capturable) are left out: torch fills in its own defaults on load,
    # so a resumed PyTorch run picks the kernels its device supports.
    common = {"lr": lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps, "amsgrad": False, "maximize": False,
              "decoupled_weight_decay": True}
    groups = [{"weight_decay": cfg.weight_decay, **common, "params": [k for k in params if mask[k]]},
              {"weight_decay": 0.0, **common, "params": [k for k in params if not mask[k]]}]
    return {"state": state, "param_groups": groups}


def optimizer_from_torch(saved: dict[str, Any], opt_state: Any, params: dict[str, Any]) -> Any:
    """The inverse: a PyTorch (or JAX-written) trainer.pt optimizer dict -> optax state shaped like `opt_state`."""
    state = saved.get("state", {})
    if not state:
        return opt_state  # saved before the first step
    missing = [k for k in params if k not in state]
    if missing:
        raise NanogemmaError(f"the checkpoint's optimizer has no state for '{missing[0]}': it belongs to another model")
    arr = lambda k, name: jnp.asarray(state[k][name].numpy(), jnp.float32)  # noqa: E731
    steps = {int(state[k]["step"]) for k in params}
    if len(steps) != 1:
        raise NanogemmaError("the checkpoint's optimizer state has parameters at different step counts")
    n = steps.pop()
    adam = _adam_state(opt_state)
    # Two counters, two arrays: the step donates its state, and one buffer cannot be donated twice.
    adam = adam._replace(count=jnp.asarray(n, jnp.int32), mu={k: arr(k, "exp_avg") for k in params},
                         nu={k: arr(k, "exp_avg_sq") for k in params})
    inner = tuple(adam if isinstance(s, optax.ScaleByAdamState) else s for s in opt_state.inner_state)
    return opt_state._replace(count=jnp.asarray(n, jnp.int32), inner_state=inner)


def _adam_state(opt_state: Any) -> optax.ScaleByAdamState:
    """The Adam moments inside `inject_hyperparams(adamw)`'s state (count, mu, nu)."""
    found = [s for s in opt_state.inner_state if isinstance(s, optax.ScaleByAdamState)]
    if len(found) != 1:
        raise RuntimeError("unexpected optax AdamW state layout")  # an optax change, not a user error
    return found[0]


# ------------------------------------------------------------------------------------------------ run


class JaxRun:
    """The state of a JAX training run: the twin of `train.loop.Run`, one process."""

    def __init__(self, cfg: TrainConfig) -> None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 or cfg.fsdp:
            raise NanogemmaError("the JAX backend trains in one process: drop torchrun / --fsdp, or use --backend torch")
        self.cfg = cfg
        self.run_dir = Path(cfg.out_dir)
        resume_from = build.check_run_dir(self.run_dir, cfg.resume)
        self.data: Dataset = open_dataset(cfg.data, cfg.seq_len)
        self.dtype = _compute_dtype(cfg.dtype)
        mcfg, state, self.source = build.initial_model(cfg, self.data, resume_from)
        if self.data.vocab_size > mcfg.vocab_size:
            raise NanogemmaError(f"{self.data.folder} has {self.data.vocab_size:,} token ids but the checkpoint's "
                                 f"model knows {mcfg.vocab_size:,}: resume with the run's own data")
        if state is None:  # PyTorch's initialiser, so both backends start from the same weights
            from ..model import Gemma

            state = Gemma(mcfg).init_weights(std=cfg.init_std, seed=cfg.seed).state_dict()
        self.mcfg = mcfg
        self.params = to_params(mcfg, state, jnp.float32, source=self.source)
        del state
        self.tx, self._train_step, self._eval_step = programs(mcfg, cfg.weight_decay, (cfg.beta1, cfg.beta2),
                                                              cfg.eps, cfg.grad_clip, self.dtype)
        self.opt_state = self.tx.init(self.params)
        self.schedule = WarmupCosine(cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps)
        self.sampler = WindowSampler(len(self.data.train), cfg.seq_len, cfg.seed)
        self.val_offsets = validation_offsets(self.data.val, cfg.seq_len, cfg.eval_batches * cfg.batch_size,
                                              self.data.eot_id)
        self.step = self.tokens = 0
        self.best_val: float | None = None
        self.last_saved: tuple[int, Path] | None = None
        if resume_from is not None:
            self._restore(resume_from)
        self.tokens_per_step = cfg.grad_accum * cfg.batch_size * cfg.seq_len
        self.flops_per_token = train_flops_per_token(mcfg, cfg.seq_len)

    # ------------------------------------------------------------------------------------ checkpoints
    def _restore(self, folder: Path) -> None:
        state = ckpt.load_trainer_state(folder)
        self.schedule.check_resumable(state["schedule"])
        self.sampler.check_resumable(state["sampler"])
        self.opt_state = optimizer_from_torch(state["optimizer"], self.opt_state, self.params)
        build.set_rng_state(state["rng"])
        self.step, self.tokens, self.best_val = state["step"], state["tokens"], state["best_val"]
        self.last_saved = (self.step, folder)

    def weights(self) -> dict[str, Any]:
        import torch

        return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in self.params.items()}

    def save(self, name: str = "last", val_loss: float | None = None) -> Path:
        trainer = {"version": ckpt.VERSION, "step": self.step, "tokens": self.tokens,
                   "optimizer": optimizer_to_torch(self.opt_state, self.params, self.cfg, self.schedule(self.step)),
                   "schedule": self.schedule.state_dict(), "sampler": self.sampler.state_dict(self.step),
                   "scaler": None, "rng": build.rng_state(), "best_val": self.best_val, "world_size": 1,
                   "backend": "jax"}
        meta = ckpt.model_meta(self.mcfg.to_dict(), self.cfg, self.data.describe(), self.step, self.tokens,
                               val_loss, name)
        folder = ckpt.save_checkpoint(self.run_dir, name, self.weights(), trainer, meta)
        if name == "best" or ckpt.find_checkpoint(self.run_dir, "best") is None:
            ckpt.publish(self.run_dir, folder)
        self.last_saved = (self.step, self.run_dir / "last")
        return folder

    def save_best(self, val_loss: float) -> None:
        folder = ckpt.clone_checkpoint(self.run_dir, "last", "best", {"checkpoint": "best", "val_loss": val_loss})
        ckpt.publish(self.run_dir, folder)

    # ------------------------------------------------------------------------------------- evaluation
    def sample(self) -> str | None:
        cfg = self.cfg
        if cfg.sample_tokens == 0:
            return None
        from ..decoding import SamplingParams
        from .generation import generate_ids

        tok = self.data.tokenizer
        start = tok.eot_id if tok.bos_id is None else tok.bos_id
        ids = ([start] + tok.encode(cfg.sample_prompt))[-(self.mcfg.max_seq_len - 1):]
        params = SamplingParams(temperature=cfg.sample_temperature, seed=cfg.seed)
        new = list(generate_ids(JaxGemma(self.mcfg, self.params), ids, cfg.sample_tokens, params, {tok.eot_id}))
        return cfg.sample_prompt + tok.decode(new)

    def evaluate(self) -> tuple[float, str | None]:
        cfg = self.cfg
        sums = np.zeros(3, dtype=np.float64)  # loss sum, correct, tokens
        for i in range(0, len(self.val_offsets), cfg.batch_size):
            x, y = windows(self.data.val, self.val_offsets[i:i + cfg.batch_size], cfg.seq_len)
            sums += np.asarray(self._eval_step(self.params, x, y), dtype=np.float64)
        loss, acc = float(sums[0] / sums[2]), float(sums[1] / sums[2])  # Python floats: trainer.pt pickles them
        ppl = math.exp(min(loss, 700.0))
        text = self.sample()
        self.monitor.record("eval", self.step, val_loss=loss, val_ppl=ppl, val_acc=acc, val_tokens=int(sums[2]),
                            sample=text)
        self.monitor.say(f"step {self.step}: val loss {loss:.4f}, perplexity {ppl:.2f}, accuracy {acc:.1%}"
                         + (f" | {text!r}" if text else ""))
        improved = self.best_val is None or loss < self.best_val
        if improved:
            self.best_val = loss
        return loss, ("best" if improved else None)

    # ------------------------------------------------------------------------------------------- loop
    def batches(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The step's windows as (grad_accum, batch_size, seq_len) inputs and targets: the PyTorch run's."""
        cfg = self.cfg
        offsets = self.sampler.offsets(step, cfg.grad_accum * cfg.batch_size).reshape(cfg.grad_accum, cfg.batch_size)
        return windows(self.data.train, offsets, cfg.seq_len)

    def run(self, monitor: Monitor, stop: StopRequest) -> TrainResult:
        cfg = self.cfg
        self.monitor = monitor
        result = TrainResult(self.run_dir, self.step, self.tokens, best_val_loss=self.best_val)
        window_time, window_tokens = 0.0, 0
        while self.step < cfg.max_steps:
            if stop.requested:
                self.save("last")
                result.interrupted = True
                break
            lr = self.schedule(self.step)
            t0 = time.perf_counter()
            x, y = self.batches(self.step)
            out = self._train_step(self.params, self.opt_state, x, y, lr)
            loss, norm = float(out.loss), float(out.grad_norm)  # waits for the step
            dt = time.perf_counter() - t0
            self.params, self.opt_state = out.params, out.opt_state
            if not math.isfinite(loss):
                self._stop_non_finite(loss, lr)
            self.step += 1
            self.tokens += self.tokens_per_step
            result.losses.append(loss)
            result.seconds += dt
            window_time += dt
            window_tokens += self.tokens_per_step
            tps = window_tokens / max(window_time, 1e-9)
            monitor.advance(1, loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                mfu = tps * self.flops_per_token / (cfg.peak_tflops * 1e12) if cfg.peak_tflops else None
                monitor.record("train", self.step, loss=loss, lr=lr, grad_norm=norm, tokens=self.tokens,
                               tokens_per_s=tps, mfu=mfu, skipped=False, time=round(result.seconds, 3))
                window_time, window_tokens = 0.0, 0
            evaluate_and_checkpoint(self, result)
        result.step, result.tokens, result.best_val_loss = self.step, self.tokens, self.best_val
        result.tokens_per_s = len(result.losses) * self.tokens_per_step / max(result.seconds, 1e-9)
        return result

    def _stop_non_finite(self, loss: float, lr: float) -> None:
        self.monitor.record("stop", self.step + 1, reason=f"loss {loss}", lr=lr)
        where = ("no checkpoint was written yet" if self.last_saved is None else
                 f"the last good checkpoint is {self.last_saved[1]} (step {self.last_saved[0]}), left untouched")
        raise NanogemmaError(f"the training loss became {loss} at step {self.step + 1} (lr {lr:.3g}); the run "
                             f"stopped before updating the weights and {where}. Lower --lr or raise "
                             "--warmup-steps, then restart (or --resume)")


def train(cfg: TrainConfig) -> TrainResult:
    """Run training with the JAX step (see the module docstring); the twin of `nanogemma.train.train`."""
    run = JaxRun(cfg)
    run_dir = run.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.save_settings(run_dir, cfg)
    if not (run_dir / "tokenizer.json").is_file():
        tokenizer_files.write(run_dir, run.data.tokenizer)
    if cfg.resume:
        ckpt.trim_metrics(run_dir, run.step)
    monitor = Monitor(run_dir, True, cfg.max_steps, run.step, cfg.progress, cfg.tensorboard)
    try:
        m = run.mcfg
        n = sum(int(v.size) for v in run.params.values())
        what = f"resuming at step {run.step}" if cfg.resume else f"weights: {run.source}"
        monitor.say(f"training {n / 1e6:.2f}M parameters (d={m.hidden_size}, {m.num_layers} layers, vocab "
                    f"{m.vocab_size:,}) on {run.data.folder}, {what}; JAX {jax.default_backend()} "
                    f"{jnp.dtype(run.dtype).name}; {run.tokens_per_step:,} tokens per step; writing to {run_dir}")
        with StopRequest(lambda: monitor.say("stopping after this step and saving a checkpoint "
                                             "(Ctrl-C again to stop at once)")) as stop:
            return run.run(monitor, stop)
    finally:
        monitor.close()
