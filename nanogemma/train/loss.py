"""The training loss, with Gemma's output head fused into the cross-entropy.

Gemma's vocabulary is large (262,144 ids; 50,257 for GPT-2 data), so the last step of the model — hidden
states (N tokens × d) times the head (V × d) — makes the biggest tensor of the whole step: N × V logits.
For 2,048 tokens of Gemma that is 2.1 GB in float32, and the usual `cross_entropy(logits, targets)`
writes two more of that size (log-softmax, then its gradient). Those passes over memory, not the matmul,
dominate a small model's step.

`fused_linear_cross_entropy` never holds more than a group of rows of logits. For each group it computes
the logits, the loss, and right away the gradient of the loss with respect to the logits — softmax minus
the one-hot target, over N, written over the logits a cache-sized chunk of rows at a time — and from it
the gradients of the hidden states (p · W) and of the head (pᵀ · h). The group's logits are then dropped.
Backward has nothing left to do but scale the two stored gradients by the incoming one. The arithmetic is
the same three matmuls as the plain path; what goes away is the memory: one group instead of three
N × V tensors (a group is 256 rows in float32, 2,048 in bfloat16: `_head_plan` says why), and one
exponential per logit.

To get the hidden states, `TrainingGemma` (a `Gemma` whose `logits()` can stop after the final norm,
switched by `features_only`) is what training builds. Its parameters and checkpoints are exactly Gemma's.
Under FSDP2 the head's weight exists whole only inside the model's forward, so there the plain path is used.

**Masked targets.** A target of -100 (`data.IGNORE`: a prompt token of chat data, padding) is skipped by
both paths, and the loss is the mean over the others, as `cross_entropy(ignore_index=-100)` defines it.
The fused path drops those rows before the head, so the head's cost is paid only for trained tokens — in
instruction data most tokens are prompt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model import Gemma

CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}  # logits per chunk: ~16 MB on CPU (cache), 256 MB on GPU
MIN_ROWS = 256  # see the chunk rule in fused_linear_cross_entropy (measured in docs/BENCHMARKS.md)
GROUP_BYTES = 1 << 30  # lower-precision logits the fused loss may hold at once (see _group_rows)


class TrainingGemma(Gemma):
    """Gemma whose forward returns the final-normed hidden states instead of logits while `features_only`."""

    features_only: bool = False

    def logits(self, x: Tensor) -> Tensor:
        return self.final_norm(x) if self.features_only else super().logits(x)

    def head_weight(self) -> Tensor:
        return self.lm_head.weight  # the embedding table when tied

    @classmethod
    def from_model(cls, model: Gemma) -> TrainingGemma:
        """The same parameters (shared, not copied) in a TrainingGemma."""
        with torch.device("meta"):
            out = cls(model.config)
        out.load_state_dict(model.state_dict(), assign=True)
        out.reset_rope()
        return out.train(model.training)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, w: Tensor, y: Tensor, compute_dtype: torch.dtype, chunk: int, group: int) -> Tensor:
        n = h.shape[0]
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = None  # float32, from the first group's product on
        wc = w.to(compute_dtype)
        total = torch.zeros((), dtype=torch.float64, device=h.device)
        for g in range(0, n, group):
            hg, yg = h[g:g + group].to(compute_dtype), y[g:g + group]
            logits = hg @ wc.t()  # (rows, V) in the matmul dtype; overwritten below by the loss's gradient
            for s in range(0, len(yg), chunk):
                part, yc = logits[s:s + chunk], yg[s:s + chunk]
                rows = torch.arange(len(yc), device=h.device)
                # In float32 the chunk itself (`float()` of a float32 tensor is the tensor), worked on in
                # place: no second copy of the logits. In a lower precision, a float32 copy of one chunk.
                x = part.float()
                target = x[rows, yc]
                top = x.amax(dim=-1, keepdim=True)
                x.sub_(top).exp_()  # the chunk's logits become exp(logit - max)
                z = x.sum(dim=-1, keepdim=True)
                total += (z.log() + top).squeeze(1).sub(target).sum().double()
                if grad_h is None and not ctx.needs_input_grad[1]:
                    continue
                x.mul_(1.0 / (z * n))  # softmax / n: the mean's gradient ...
                x[rows, yc] -= 1.0 / n  # ... minus the one-hot target, over the logits
                if x is not part:
                    part.copy_(x)
            if grad_h is not None:
                grad_h[g:g + group] = (logits @ wc).to(h.dtype)
            if ctx.needs_input_grad[1]:
                if grad_w is None:
                    grad_w = (logits.t() @ hg).float()
                elif logits.dtype == grad_w.dtype:
                    grad_w.addmm_(logits.t(), hg)  # accumulate inside the matmul: no extra pass over V × d
                else:
                    grad_w += logits.t() @ hg  # a lower-precision product, added in float32
            del logits  # now, not when the next group's replace them: one group of logits alive, not two
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = w.dtype
        return (total / n).float()

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = None if grad_h is None else grad_h * grad.to(grad_h.dtype)
        gw = None if grad_w is None else (grad_w * grad).to(ctx.w_dtype)
        return gh, gw, None, None, None, None


def fused_linear_cross_entropy(h: Tensor, w: Tensor, y: Tensor) -> Tensor:
    """mean(cross_entropy(h @ wᵀ, y)) for h (N, d), w (V, d), y (N,), without materialising the N × V logits.

    Targets below 0 are ignored (the mean is over the others), as in `cross_entropy`.

    Under autocast the matmuls run in the autocast dtype and the softmax in float32, as autocast would do.
    """
    keep = y >= 0
    if not bool(keep.all()):  # ignored targets (-100): no logits at all for their rows
        h, y = h[keep], y[keep]
    dev = h.device.type
    dtype, group, chunk = _head_plan(dev, w.shape[0])
    with torch.autocast(dev, enabled=False):
        return _FusedLinearCrossEntropy.apply(h, w, y, dtype, chunk, group)


def _head_plan(dev: str, vocab: int) -> tuple[torch.dtype, int, int]:
    """(matmul dtype, group rows, chunk rows) for applying the head a group of rows at a time.

    The dtype is autocast's when it is on. A *group* is the rows of one head matmul, whose logits are held
    at once; in a lower precision its softmax runs a *chunk* of rows at a time in float32, chunks small
    enough to stay in cache (CHUNK_ELEMENTS), as the softmax makes several passes over them.

    Groups have at least MIN_ROWS rows, the inner dimension of the head-gradient matmul: each group reads
    and rewrites the whole V × d gradient (671 MB for Gemma's head), so with few rows per group that
    traffic, not the matmul, sets the pace. In float32 the gradient is accumulated inside the matmul
    (`addmm_`); a bfloat16 product cannot be, and adding it costs another pass over the gradient, so in a
    lower precision a group is as many rows as GROUP_BYTES of logits hold (2,048 rows of Gemma's
    vocabulary in bfloat16: one pass for a 2,048-token batch). Either is a fraction of the plain path's
    memory, which holds three float32 N × V tensors (2.1 GB each for 2,048 Gemma tokens)."""
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else torch.float32
    chunk = max(1, CHUNK_ELEMENTS.get(dev, 1 << 24) // vocab)
    if dtype == torch.float32:  # the group's logits are float32 already: one chunk per group
        group = max(MIN_ROWS, chunk)
        return dtype, group, group
    return dtype, max(chunk, GROUP_BYTES // (vocab * dtype.itemsize) // chunk * chunk), chunk


@torch.no_grad()
def linear_cross_entropy_sums(h: Tensor, w: Tensor, y: Tensor) -> Tensor:
    """[loss sum, correct argmax, counted targets] (float64) of the logits h @ wᵀ against y, a group of rows
    at a time: what evaluation needs, without the N × V logits (for a validation batch of 2,048 Gemma
    tokens those are 2.1 GB, and cross_entropy's log-softmax would add another). Targets below 0 are
    skipped; the matmul runs in the autocast dtype, as in the fused loss."""
    keep = y >= 0
    h, y = h[keep], y[keep]
    dev = h.device.type
    dtype, group, chunk = _head_plan(dev, w.shape[0])
    sums = torch.zeros(3, dtype=torch.float64, device=h.device)
    wc = w.to(dtype)
    with torch.autocast(dev, enabled=False):
        for g in range(0, h.shape[0], group):
            logits = h[g:g + group].to(dtype) @ wc.t()
            for s in range(g, min(g + group, h.shape[0]), chunk):
                part, yc = logits[s - g:s - g + chunk].float(), y[s:s + chunk]
                sums[0] += F.cross_entropy(part, yc, reduction="sum").double()
                sums[1] += (part.argmax(-1) == yc).sum()
            del logits, part  # before the next group's are made: one group alive at a time
    sums[2] = h.shape[0]
    return sums


def lm_loss(model: nn.Module, inputs: Tensor, targets: Tensor, positions: Tensor | None = None) -> Tensor:
    """The plain path: logits (float32, from the model), then the mean next-token cross-entropy in nats
    over the targets that are not -100. `positions` restart at each packed document (see model.py)."""
    logits = model(inputs, positions)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


class LanguageModelLoss:
    """`loss(model_call, inputs, targets)` for training `raw`, which `model_call` runs (itself, DDP, compiled).

    With `fused`, the call returns hidden states and the head is applied by the fused cross-entropy.
    """

    def __init__(self, raw: TrainingGemma, fused: bool) -> None:
        self.raw, self.fused = raw, fused

    def __call__(self, model: nn.Module, inputs: Tensor, targets: Tensor, positions: Tensor | None = None) -> Tensor:
        if not self.fused:
            return lm_loss(model, inputs, targets, positions)
        return fused_linear_cross_entropy(self._features(model, inputs, positions), self.raw.head_weight(),
                                          targets.reshape(-1))

    def _features(self, model: nn.Module, inputs: Tensor, positions: Tensor | None) -> Tensor:
        """The final-normed hidden states (N, d) from `model` (which runs `raw`), not its logits."""
        self.raw.features_only = True
        try:
            h = model(inputs, positions)
        finally:
            self.raw.features_only = False
        return h.reshape(-1, h.size(-1))

    def sums(self, model: nn.Module, inputs: Tensor, targets: Tensor, positions: Tensor | None = None) -> Tensor:
        """Evaluation's [loss sum, correct, targets] for one batch (no gradients), the head applied in chunks
        when fused."""
        y = targets.reshape(-1)
        if not self.fused:
            logits = model(inputs, positions)
            flat = logits.float().reshape(-1, logits.size(-1))
            keep = y >= 0  # -100: not a target (prompt tokens of chat data, padding)
            return torch.stack([F.cross_entropy(flat, y, reduction="sum").double(),
                                ((flat.argmax(-1) == y) & keep).sum().double(), keep.sum().double()])
        return linear_cross_entropy_sums(self._features(model, inputs, positions), self.raw.head_weight(), y)
