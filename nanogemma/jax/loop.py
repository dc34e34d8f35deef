"""`nanogemma train --backend jax`: the shared training loop (`train.loop.Loop`) with the JAX step.

Everything around the step is the one loop both backends run, so the two cannot drift apart: the
settings (`train.config`), the data windows drawn per step from (seed, step) (`train.data.WindowSampler`,
<bos> at window starts on Gemma-tokenized data), the fixed validation windows, the `WarmupCosine`
schedule, evaluation and checkpoint cadence, the run folder and its atomic checkpoints
(`train.checkpoint`), metrics.jsonl and the progress bar (`train.monitor`), the non-finite stop, Ctrl-C.
This file supplies only the step, the evaluation, sampling and the optimizer state's conversion. Two consequences:

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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..errors import NanogemmaError
from ..train.config import TrainConfig
from ..train.distributed import World
from ..train.loop import Loop, TrainResult, drive
from ..train.step import EvalResult, StepResult
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


class JaxRun(Loop):
    """The JAX backend of the shared `train.loop.Loop`: one process, a jitted step, optax AdamW."""

    trainer_extras = {"scaler": None, "backend": "jax"}

    def __init__(self, cfg: TrainConfig) -> None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 or cfg.fsdp:
            raise NanogemmaError("the JAX backend trains in one process: drop torchrun / --fsdp, or use --backend torch")
        if cfg.activation_checkpointing:
            raise NanogemmaError("the JAX backend keeps every activation: drop --activation-checkpointing, or use "
                                 "--backend torch")
        super().__init__(cfg, World())

    def resolve_dtype(self, name: str) -> Any:
        return _compute_dtype(name)

    def build(self, state: dict | None) -> None:
        cfg, mcfg = self.cfg, self.mcfg
        if self.data.packed:
            raise NanogemmaError(f"{self.data.folder} is chat data (packed conversations, loss masks): train it "
                                 "with the PyTorch backend (drop --backend jax)")
        if state is None:  # PyTorch's initialiser, so both backends start from the same weights
            from ..model import Gemma

            state = Gemma(mcfg).init_weights(std=cfg.init_std, seed=cfg.seed).state_dict()
        self.params = to_params(mcfg, state, jnp.float32, source=self.source)
        self.tx, self._train_step, self._eval_step = programs(mcfg, cfg.weight_decay, (cfg.beta1, cfg.beta2),
                                                              cfg.eps, cfg.grad_clip, self.dtype)
        self.opt_state = self.tx.init(self.params)

    def peak_flops(self) -> float | None:
        return self.cfg.peak_tflops * 1e12 if self.cfg.peak_tflops else None

    def train_step(self, offsets: np.ndarray, lr: float) -> StepResult:
        x, y = windows(self.data.train, offsets, self.cfg.seq_len, self.bos_id)
        out = self._train_step(self.params, self.opt_state, x, y, lr)
        loss, norm = float(out.loss), float(out.grad_norm)  # waits for the step
        self.params, self.opt_state = out.params, out.opt_state  # a non-finite step kept the old ones
        return StepResult(loss, norm, False)

    def evaluate_windows(self) -> EvalResult:
        cfg = self.cfg
        sums = np.zeros(3, dtype=np.float64)  # loss sum, correct, tokens
        for i in range(0, len(self.val_offsets), cfg.batch_size):
            x, y = windows(self.data.val, self.val_offsets[i:i + cfg.batch_size], cfg.seq_len, self.bos_id)
            sums += np.asarray(self._eval_step(self.params, x, y), dtype=np.float64)
        loss, acc = float(sums[0] / sums[2]), float(sums[1] / sums[2])  # Python floats: trainer.pt pickles them
        return EvalResult(loss, math.exp(min(loss, 700.0)), acc, int(sums[2]))

    def generate(self, ids: list[int], stop_ids: set[int]) -> list[int]:
        from ..decoding import SamplingParams
        from .generation import generate_ids

        params = SamplingParams(temperature=self.cfg.sample_temperature, seed=self.cfg.seed)
        return list(generate_ids(JaxGemma(self.mcfg, self.params), ids, self.cfg.sample_tokens, params, stop_ids))

    # ------------------------------------------------------------------------------------ checkpoints
    def weights(self) -> dict[str, Any]:
        import torch

        return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in self.params.items()}

    def checkpoint_state(self) -> tuple[dict, dict]:
        return self.weights(), optimizer_to_torch(self.opt_state, self.params, self.cfg, self.schedule(self.step))

    def restore_optimizer(self, state: dict) -> None:
        self.opt_state = optimizer_from_torch(state["optimizer"], self.opt_state, self.params)

    def parameter_count(self) -> int:
        return sum(int(v.size) for v in self.params.values())

    def hardware(self) -> str:
        return f"JAX {jax.default_backend()} {jnp.dtype(self.dtype).name}"


def train(cfg: TrainConfig) -> TrainResult:
    """Run training with the JAX step (see the module docstring); the twin of `nanogemma.train.train`."""
    return drive(JaxRun(cfg))
