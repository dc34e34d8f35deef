"""The learning-rate schedule: linear warmup, then cosine decay to `min_lr`, counted in optimizer steps.

    lr(s) = lr · (s + 1) / warmup                                    for s < warmup
    lr(s) = min_lr + ½ (lr − min_lr) (1 + cos(π · (s − warmup) / (max_steps − warmup)))   afterwards

`s` is the index of the optimizer step about to be taken (0 for the first). Counting optimizer steps, not
micro-batches, is the point: with gradient accumulation a micro-step counter would make the warmup end
`grad_accum` times too early and the decay finish long before the run. The first step already gets
lr/warmup rather than 0, so no step is wasted. Past `max_steps` the rate stays at `min_lr`.

The schedule is a pure function of the step, so its "state" in a checkpoint is just its settings and the
step: `state_dict` records them and `load_state_dict` refuses a checkpoint made with another schedule.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..errors import NanogemmaError


@dataclass(frozen=True)
class WarmupCosine:
    lr: float
    min_lr: float
    warmup_steps: int
    max_steps: int

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = self.max_steps - self.warmup_steps
        if span <= 0 or step >= self.max_steps:
            return self.min_lr
        progress = (step - self.warmup_steps) / span
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))

    def state_dict(self) -> dict:
        return asdict(self)

    def check_resumable(self, saved: dict) -> None:
        """Resuming with another peak, floor or warmup would not continue the same run: say so."""
        mine = self.state_dict()
        diff = [k for k in ("lr", "min_lr", "warmup_steps") if saved.get(k) != mine[k]]
        if diff:
            k = diff[0]
            raise NanogemmaError(f"the checkpoint's schedule has {k}={saved.get(k)}, these settings {k}={mine[k]}; "
                                 f"resume with the run's own settings (drop --{k.replace('_', '-')})")
