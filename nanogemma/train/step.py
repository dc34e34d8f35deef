"""One optimizer step and one evaluation: the numerical core of training, kept apart from the bookkeeping.

**Precision.** The weights, their gradients and AdamW's moments are always float32 (the "master" copy):
AdamW's updates are often ~1e-3 of a weight, which bfloat16's 8-bit mantissa would round away. Speed comes
from autocast, which runs the matmuls in bfloat16 (or float16) and keeps numerically delicate ops (norms,
softmax, the loss) in float32.

float16 has a narrow exponent range, so small gradients underflow to zero. A gradient scaler multiplies the
loss by S (e.g. 65,536) before backward and divides the gradients by S before the step, skipping the step
and lowering S when they overflow. The division must come *before* clipping: clipping still-scaled
gradients to norm 1 would shrink them by S, i.e. make every update 65,536 times too small.

**Accumulation.** The step's loss is the mean over `grad_accum` micro-batches (and over processes), so
each micro-batch's loss is divided by `grad_accum` before backward: the summed gradient is then the
gradient of the mean, the same as one batch `grad_accum` times larger.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .distributed import World, all_mean, all_sum, no_sync
from .loss import LanguageModelLoss, lm_loss


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (projections, embedding) only: norm weights are offsets from 1 (Gemma's
    (1 + w) form), and decaying them would pull every norm toward the identity for no reason."""
    decay, plain = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else plain).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float,
                   device: torch.device) -> torch.optim.AdamW:
    """torch's AdamW, fused (one kernel for all parameters) where this build supports it on the device."""
    groups = param_groups(model, weight_decay)
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    except (RuntimeError, ValueError):  # older builds or devices without the fused kernel
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=device.type != "cpu" or None)


@dataclass
class StepResult:
    loss: float  # mean over the step's micro-batches and processes
    grad_norm: float  # before clipping (after unscaling, with float16)
    skipped: bool  # the gradient scaler found inf/nan gradients and skipped the update


def train_step(model: nn.Module, params: list[torch.Tensor], optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler | None, batches: list[tuple[torch.Tensor, torch.Tensor]],
               lr: float, grad_clip: float, world: World, dtype: torch.dtype, loss_fn=lm_loss) -> StepResult:
    """Accumulate gradients over `batches`, clip, and step. Returns before stepping if the loss is not finite.

    The non-finite check comes before the update on purpose: a NaN loss means NaN gradients, and stepping
    would write NaN into every weight (and into the next checkpoint).
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    n = len(batches)
    total = torch.zeros((), device=world.device)
    for i, batch in enumerate(batches):  # (inputs, targets) or, packed, (inputs, targets, positions)
        with no_sync(model, last=i == n - 1), autocast(world.device, dtype):
            loss = loss_fn(model, *batch)
        scaled = loss / n
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        total += loss.detach()
    mean_loss = all_mean(total / n, world).item()
    if not math.isfinite(mean_loss):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(mean_loss, float("nan"), True)
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor holding the global norm
        norm = norm.full_tensor()
    skipped = False
    if scaler is not None:
        before = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        skipped = scaler.get_scale() < before
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(mean_loss, float(norm), skipped)


@dataclass
class EvalResult:
    loss: float
    perplexity: float
    accuracy: float
    tokens: int


@torch.no_grad()
def evaluate(model: nn.Module, val: np.ndarray, offsets: np.ndarray, seq_len: int, batch_size: int,
             world: World, dtype: torch.dtype, windows_fn, loss_fn: LanguageModelLoss) -> EvalResult:
    """Loss, perplexity and next-token accuracy over the fixed validation windows `offsets` (over the
    targets that are not -100), with `loss_fn`'s head (fused: a chunk of logits at a time).

    The windows are shared out among the processes and the sums (not the means) are all-reduced, so the
    result is the same for any number of processes.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=world.device)  # loss sum, correct, tokens
    mine = offsets[world.rank::world.size]
    # FSDP2 processes must run the same number of forwards (each one gathers weights): pad with no-ops.
    batches = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    rounds = -(-len(offsets[0::world.size]) // batch_size)
    for r in range(rounds):
        chunk = batches[r] if r < len(batches) else offsets[:1]
        x, y, *pos = windows_fn(val, chunk, seq_len, world.device)  # packed data: positions too
        with autocast(world.device, dtype):
            batch_sums = loss_fn.sums(model, x, y, *pos)
        if r < len(batches):
            sums += batch_sums
    sums = all_sum(sums, world)
    model.train(was_training)
    loss = (sums[0] / sums[2]).item()
    return EvalResult(loss, math.exp(min(loss, 700.0)), (sums[1] / sums[2]).item(), int(sums[2].item()))
