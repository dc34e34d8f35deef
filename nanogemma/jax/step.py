"""One training step and one evaluation in JAX: the numerical core of `nanogemma train --backend jax`.

The step is the PyTorch one (`nanogemma/train/step.py`) written as a single jitted function:

    for each of the step's micro-batches (lax.scan):    grads += ∇loss_i / n
    loss  = mean of the micro-batch losses (mean next-token cross-entropy, nats)
    norm  = global gradient norm;  grads *= min(1, clip / (norm + 1e-6))       (torch's clip_grad_norm_)
    AdamW (optax): Adam direction + weight decay on matrices only, times the step's learning rate
    a non-finite loss keeps the old weights and optimizer state (the caller then stops the run)

* **Accumulation** adds each micro-batch's gradient divided by n, so the sum is the gradient of the mean
  loss — the same as one batch n times larger — and the logged loss is that mean
  (not the sum, and not the last micro-batch's).
* **The learning rate** is an argument of the step, computed on the host by the very `WarmupCosine`
  object the PyTorch loop uses (`optax.inject_hyperparams` makes it a runtime value, so changing it never
  recompiles).
* **Weight decay** applies to parameters with two or more dimensions (projections, embedding), not to
  norm weights, which are offsets from 1: the rule of `train.step.param_groups`.
* **Precision**: weights, gradients and moments are float32; with `compute_dtype=bfloat16` the forward
  runs on a bfloat16 copy of the weights (norms and softmax still in float32, as in the model).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..config import GemmaConfig
from .model import Params, config_key, forward, param_shapes


def lm_loss(params: Params, cfg: GemmaConfig, inputs: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy in nats (float32 logits, as `train.step.lm_loss`)."""
    logits = forward(params, cfg, inputs)
    return optax.losses.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def decay_mask(cfg: GemmaConfig) -> dict[str, bool]:
    """True for parameters that get weight decay: matrices, not norm weights."""
    return {k: len(shape) >= 2 for k, shape in param_shapes(cfg).items()}


def make_optimizer(cfg: GemmaConfig, weight_decay: float, betas: tuple[float, float],
                   eps: float) -> optax.GradientTransformation:
    """optax's AdamW with the learning rate as a runtime hyperparameter (`opt_state.hyperparams`)."""
    return optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, b1=betas[0], b2=betas[1], eps=eps,
                                                 weight_decay=weight_decay, mask=decay_mask(cfg))


class StepOut(NamedTuple):
    params: Params
    opt_state: Any
    loss: jax.Array  # mean over the step's micro-batches
    grad_norm: jax.Array  # before clipping


def clip_by_norm(grads: Params, max_norm: float) -> tuple[Params, jax.Array]:
    """(clipped grads, norm before clipping), with torch's rule: scale by max_norm / (norm + 1e-6) if < 1."""
    # As torch.nn.utils.clip_grad_norm_: the norm of the per-tensor norms.
    norm = jnp.linalg.norm(jnp.stack([jnp.linalg.norm(g.ravel()) for g in jax.tree.leaves(grads)]))
    if max_norm <= 0:
        return grads, norm
    coef = jnp.minimum(max_norm / (norm + 1e-6), 1.0)
    return jax.tree.map(lambda g: g * coef, grads), norm


def make_train_step(cfg: GemmaConfig, tx: optax.GradientTransformation, grad_clip: float,
                    compute_dtype: Any = jnp.float32) -> Callable[..., StepOut]:
    """A jitted `step(params, opt_state, inputs, targets, lr)`; inputs/targets are (micro-batches, B, T).

    Parameters and optimizer state are donated: XLA updates them in place.
    """

    def micro_loss(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
        if jnp.dtype(compute_dtype) != jnp.float32:
            params = jax.tree.map(lambda w: w.astype(compute_dtype), params)
        return lm_loss(params, cfg, x, y)

    grad_fn = jax.value_and_grad(micro_loss)

    def step(params: Params, opt_state: Any, inputs: jax.Array, targets: jax.Array, lr: jax.Array) -> StepOut:
        n = inputs.shape[0]

        def accumulate(carry, batch):
            loss_sum, grads = carry
            loss, g = grad_fn(params, *batch)
            return (loss_sum + loss, jax.tree.map(lambda a, b: a + b / n, grads, g)), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        (loss_sum, grads), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros), (inputs, targets))
        loss = loss_sum / n
        grads, norm = clip_by_norm(grads, grad_clip)
        opt_state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
        updates, new_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        # A non-finite loss means non-finite gradients: keep everything as it was.
        ok = jnp.isfinite(loss)
        keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
        return StepOut(jax.tree.map(keep, new_params, params), jax.tree.map(keep, new_state, opt_state),
                       loss, norm)

    return jax.jit(step, donate_argnums=(0, 1))


@functools.lru_cache(maxsize=4)
def _programs(key: str, weight_decay: float, betas: tuple[float, float], eps: float, grad_clip: float,
              dtype: str) -> tuple[optax.GradientTransformation, Callable[..., StepOut], Callable[..., jax.Array]]:
    cfg = GemmaConfig.from_dict(json.loads(key))
    tx = make_optimizer(cfg, weight_decay, betas, eps)
    return tx, make_train_step(cfg, tx, grad_clip, jnp.dtype(dtype)), make_eval_step(cfg, jnp.dtype(dtype))


def programs(cfg: GemmaConfig, weight_decay: float, betas: tuple[float, float], eps: float, grad_clip: float,
             dtype: Any = jnp.float32) -> tuple[optax.GradientTransformation, Callable[..., StepOut], Callable]:
    """(optimizer, jitted train step, jitted eval step), shared by every run of the same settings in a process:
    a resumed or repeated run reuses the compiled programs instead of tracing them again."""
    return _programs(config_key(cfg), weight_decay, tuple(betas), eps, grad_clip, jnp.dtype(dtype).name)


def make_eval_step(cfg: GemmaConfig, compute_dtype: Any = jnp.float32) -> Callable[..., jax.Array]:
    """A jitted `eval(params, inputs, targets)` -> [loss sum, correct predictions, tokens] (float32)."""

    def run(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
        if jnp.dtype(compute_dtype) != jnp.float32:
            params = jax.tree.map(lambda w: w.astype(compute_dtype), params)
        logits = forward(params, cfg, x)
        ce = optax.losses.softmax_cross_entropy_with_integer_labels(logits, y)
        correct = (logits.argmax(-1) == y).sum()
        return jnp.stack([ce.sum(), correct.astype(jnp.float32), jnp.float32(y.size)])

    return jax.jit(run)


def windows(tokens: np.ndarray, offsets: np.ndarray, seq_len: int,
            bos_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets), each (..., seq_len) int32, from windows of seq_len + 1 tokens at `offsets` (any shape):
    the numpy twin of `train.data.windows`, <bos> first with `bos_id`."""
    idx = offsets[..., None] + np.arange(seq_len + 1)
    w = np.asarray(tokens[idx]).astype(np.int32)  # fancy indexing reads only these tokens of the memmap
    if bos_id is not None:
        w[..., 0] = bos_id
    return w[..., :-1], w[..., 1:]
