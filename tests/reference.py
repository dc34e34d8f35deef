"""Float64 references, and the rule for comparing two greedy runs that use different kernels.

Two float32 computations of the same model that sum in different orders (a batch and a lone row, a cached
and an uncached pass, oneDNN and XLA, AVX2 and AVX-512 kernels) agree only to float32's rounding noise.
Greedy decoding turns that noise into a different token only where the two best logits are closer than
the noise: a tie. Whether a given CPU meets such a tie in a test is luck, so a test that compares two such
runs token for token asserts only what holds everywhere: the runs are identical, or they part at a step
where the reference (float64, same weights, same prefix) shows the two candidates tied to within the
measured float32 error of that step. Everything after the parting point is a different text and not compared.

Where a path is identical by construction (same kernels, same shapes, same order), tests compare bit for bit
and do not use this module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch

# How many times float32's measured error at a step two candidates may be apart and still count as tied:
# each of the two runs carries up to that error, in either direction, on each of the two logits.
TIE_FACTOR = 4.0
# Below this many float32 steps (ulps) of the largest logit, an error is float32 rounding whatever the
# summation order: two implementations may each sit anywhere under it (an 18-layer network rounds at every
# product and sum; a wrong mask, window or RoPE base is off by orders of magnitude more).
FLOAT32_FLOOR_ULPS = 64


def float32_floor(exact) -> float:
    """FLOAT32_FLOOR_ULPS steps of float32 at the largest |logit| of the exact (float64) logits."""
    import numpy as np

    return float(FLOAT32_FLOOR_ULPS * np.finfo(np.float32).eps * np.abs(np.asarray(exact)).max())


@contextmanager
def in_float64(model: torch.nn.Module):
    """The model in float64 for the duration (float32 -> float64 -> float32 is exact: the model is unchanged)."""
    dtype = next(model.parameters()).dtype
    model.double()
    try:
        yield model
    finally:
        model.to(dtype)


@torch.no_grad()
def last_logits(model, prefix: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 logits, float64 logits) after `prefix`, both uncached, from the same (float32) model."""
    ids = torch.tensor([list(prefix)])
    f32 = model(ids, last_only=True)[0, -1].double()
    with in_float64(model):
        f64 = model(ids, last_only=True)[0, -1]
    return f32, f64


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first index where two token lists differ (a length difference counts), or None."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def assert_same_greedy(model, prompt: Sequence[int], a: Sequence[int], b: Sequence[int],
                       logits: Callable[[Sequence[int]], tuple[torch.Tensor, torch.Tensor]] | None = None,
                       what: str = "") -> None:
    """Two greedy continuations of `prompt` by `model` are equal, or part only at a float32 tie.

    `logits(prefix)` gives (the path's logits, the exact reference) after a prefix; by default the model's
    uncached float32 and float64 logits. A run that stops early (a stop token) must stop where the other does.
    """
    i = first_difference(a, b)
    if i is None:
        return
    assert i < min(len(a), len(b)), f"{what}: one run stopped at token {i}, the other went on"
    got, exact = (logits or (lambda p: last_logits(model, p)))(list(prompt) + list(a[:i]))
    noise = float((got - exact).abs().max())
    gap = abs(float(exact[a[i]] - exact[b[i]]))
    assert gap <= TIE_FACTOR * noise, (
        f"{what}: the runs part at token {i} ({a[i]} vs {b[i]}) where the exact logits are {gap:.3g} apart, "
        f"more than {TIE_FACTOR} x the float32 error there ({noise:.3g}): not a tie")
