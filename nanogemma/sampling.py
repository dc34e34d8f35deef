"""Turning next-token logits into a token.

The steps, in the order they apply (the order most tools use, so settings carry over):

1. **Repetition penalty** r (CTRL-style): every token already in the sequence has its logit pushed towards
   "less likely" — divided by r if positive, *multiplied* by r if negative. Dividing a negative logit would
   raise it, i.e. reward repetition; that is the classic bug this rule avoids.
2. **Greedy** if temperature is 0: the argmax, whatever the filters below say.
3. **Temperature** T: logits / T. Below 1 sharpens the distribution, above 1 flattens it.
4. **Filters**, each setting logits outside it to -inf:
   top-k keeps the k largest; top-p (nucleus) keeps the smallest set of most likely tokens whose probability
   reaches p; min-p keeps tokens whose probability is at least min_p times the most likely one's.
5. **Draw** from the softmax with a `torch.Generator`: the same seed gives the same tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .decoding import SamplingParams


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """logits (B, V); seen (B, V) bool, True for tokens already in the row's sequence."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None,
                  min_p: float | None = None) -> Tensor:
    """Set to -inf every logit outside the top-k, the top-p nucleus and the min-p floor. logits: (B, V)."""
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p; the first always stays.
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if min_p is not None and min_p > 0.0:
        # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p): no softmax needed.
        floor = logits.max(-1, keepdim=True).values + torch.log(torch.tensor(min_p))
        logits = logits.masked_fill(logits < floor, float("-inf"))
    return logits


def sample(logits: Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None, min_p: float | None = None) -> Tensor:
    """logits (B, V) -> token ids (B,). Temperature 0 is greedy (argmax), whatever the filters say."""
    logits = logits.float()
    if temperature <= 0.0:
        return logits.argmax(-1)
    probs = filter_logits(logits / temperature, top_k, top_p, min_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class Sampler:
    """Sampling with state: the seeded generator and, for the repetition penalty, which tokens each row has seen."""

    def __init__(self, params: SamplingParams, batch: int, vocab_size: int, device: torch.device | str = "cpu"):
        self.params = params.validate()
        self.generator = torch.Generator(device=device)
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()
        self.seen = (torch.zeros(batch, vocab_size, dtype=torch.bool, device=device)
                     if params.repetition_penalty != 1.0 else None)

    def observe(self, rows: list[list[int]] | Tensor) -> None:
        """Record tokens (prompt or generated) for the repetition penalty: a list per row, or a (B,) tensor."""
        if self.seen is None:
            return
        if isinstance(rows, Tensor):
            self.seen.scatter_(1, rows.view(-1, 1).to(self.seen.device), True)
            return
        for b, ids in enumerate(rows):
            if ids:
                self.seen[b, torch.tensor(ids, device=self.seen.device)] = True

    def __call__(self, logits: Tensor) -> Tensor:
        """logits (B, V) -> next tokens (B,); the chosen tokens are recorded as seen."""
        p = self.params
        logits = logits.float()
        if self.seen is not None:
            logits = apply_repetition_penalty(logits, self.seen, p.repetition_penalty)
        tokens = sample(logits, p.temperature, p.top_k, p.top_p, self.generator, p.min_p)
        self.observe(tokens)
        return tokens
