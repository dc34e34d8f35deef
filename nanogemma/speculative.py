"""Speculative decoding with no draft model: draft with a head over common tokens (checked with the full
head), or copy drafts from the text (checked by one call through the whole model).

At batch 1 a decode step costs what its weights cost to read. In the 270M model the output head — the
262,144 x 640 embedding table — is 168M of the 268M parameters, so most of every step goes to scoring
tokens that ordinary text never uses. This decoder spends that read once per k tokens instead of once
per token, and still returns the full model's tokens:

1. **Draft**, k times: run the blocks on the last token, exactly as plain decoding does (same KV cache
   writes), then score only a subset S of the vocabulary (~37K common tokens, a seventh of the head) and
   take S's choice as the next input.
2. **Check**: the k hidden states go through the full head together — one pass over its weights for k
   tokens, which at batch 1 costs about what one token's pass does.
3. **Accept** the drafts while they equal the full model's choice. At the first difference, emit the full
   model's token instead, and take the rejected drafts back out of the cache (`KVCache.rollback`).

With greedy decoding the draft is right whenever the full model's choice lies in S, since S's logits are the
full head's for those tokens. With sampling, drafts are drawn from S's distribution and accepted with
probability min(1, p/q) — speculative sampling (Leviathan et al., 2023; Chen et al., 2023) — which gives
tokens distributed exactly as the full model's (the random stream differs from plain decoding's).

**S.** Gemma's vocabulary is numbered in BPE merge order, so low ids are frequent multi-character pieces;
single characters (',', '.', 'a') sit at the end, out of order. S starts as: the first `draft_vocab` ids,
every single-character piece below U+3000, and the prompt's tokens; every token the full model picks
outside S joins it (a name in a story is missed once, then drafted). The idea of a frequency-ranked
draft vocabulary is FR-Spec's (Zhao et al., 2025); here the draft is the model itself, so the only thing
it approximates is the head.

**Drafts from the text** (`Speculation(lookup=True)`, `--lookup`): prompt-lookup decoding (Saxena, 2023). Text
often repeats itself — a name, a phrase of the prompt, a line of code, and a small model's own loops — so the
tokens that followed the last earlier occurrence of the latest 3 (else 2) tokens are a free draft.
`LookupDecoder` feeds the last token and up to k such drafts through the model in one call (`Session.extend`:
at batch 1 the blocks' weights are read once for all k + 1 rows, not once per token), keeps the drafts while
they equal the model's choice, and emits the model's own next token after them; where the text offers no draft
it takes a plain step. Unlike the head drafts above, this saves the blocks' reads too, and it needs no draft
head (given one, `--lookup --speculate`, it drafts with it where the text has nothing to copy). The k + 1
rows' products are the same sums as one-row steps', rounded in another order (by more with `int8`, whose
activations are rounded once per call), so the output can differ from plain decoding's where two tokens tie to
within that rounding.

The check takes S's columns from the drafts' own one-row products: the numbers plain decoding computes
for those tokens, so a draft can only be overturned by a token outside S. The other columns come from the
(k, vocab) product, which can differ from plain decoding's in the last bits of float32, and by more with the
`int8` kernel, which rounds activations once per call (the k rows share one grid). The output can differ
from plain decoding's only where a token outside S ties the best token in S to within that rounding.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .decoding import DEFAULT_DRAFT_TOKENS, DEFAULT_DRAFT_VOCAB, SamplingParams
from .errors import NanogemmaError
from .model import Gemma
from .sampling import Sampler, apply_repetition_penalty, filter_logits


@dataclass
class Speculation:
    """How to speculate: S at the start (`common_token_ids`) and k, the drafts per pass over the full head;
    or, with `lookup`, k drafts copied from the text per pass through the whole model, and where the text
    has none, the head's drafts over S (none if S is empty: a plain step)."""

    common_ids: list[int]
    draft_tokens: int = DEFAULT_DRAFT_TOKENS
    lookup: bool = False  # drafts copied from the text (`LookupDecoder`); the head's over S only where it has none

    @classmethod
    def for_tokenizer(cls, tok, draft_vocab: int = DEFAULT_DRAFT_VOCAB, draft_tokens: int = DEFAULT_DRAFT_TOKENS,
                      lookup: bool = False, head: bool | None = None) -> Speculation:
        """`head` (default: not `lookup`): draft with the head over S; with `lookup` too, wherever the text
        offers nothing to copy (text that never repeats still gets the head's drafts)."""
        if draft_tokens < 1:
            raise NanogemmaError(f"--draft-tokens must be >= 1, got {draft_tokens}")
        if draft_vocab < 1:
            raise NanogemmaError(f"--draft-vocab must be >= 1, got {draft_vocab}")
        head = not lookup if head is None else head
        return cls(common_token_ids(tok, draft_vocab) if head else [], draft_tokens, lookup)

    @property
    def spare(self) -> int:
        """The columns a session must be able to take back: the drafts, and with lookup the token before them
        (which is fed in the same call)."""
        return self.draft_tokens + 1 if self.lookup else self.draft_tokens

    def decoder(self, session, params: SamplingParams, sampler: Sampler | None = None,
                draft: DraftHead | None = None) -> SpeculativeDecoder:
        """The decoding loop this speculation runs on `session` (`draft`: a head over S already built)."""
        if self.common_ids and draft is None:
            draft = DraftHead(session.model, self.common_ids)
        if self.lookup:
            return LookupDecoder(session, params, self.draft_tokens, sampler, draft)
        return SpeculativeDecoder(session, draft, params, self.draft_tokens, sampler)


def common_token_ids(tok, draft_vocab: int = DEFAULT_DRAFT_VOCAB) -> list[int]:
    """The starting S: the first `draft_vocab` ordinary pieces and every single character below U+3000."""
    ids = []
    for i, piece in enumerate(tok.pieces()):
        special = piece.startswith("<") and piece.endswith(">") and len(piece) > 2  # <unused7>, <0x0A>, ...
        if special and i not in (tok.eos_id, getattr(tok, "end_of_turn_id", None)):
            continue
        if i < draft_vocab or (len(piece) == 1 and ord(piece) < 0x3000):
            ids.append(i)
    return sorted(ids)


_BASES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class DraftHead:
    """Logits over S only, with the same kernel as the model's head: a fixed part, and the tokens added later."""

    def __init__(self, model: Gemma, ids: Sequence[int]):
        self.model = model
        self.ids = torch.tensor(sorted(set(ids)), dtype=torch.long, device=model.device)
        self.member = torch.zeros(model.config.vocab_size, dtype=torch.bool, device=model.device)
        self.member[self.ids] = True
        key = (id(model.lm_head), tuple(self.ids.tolist()))
        cached = _BASES.get(model)
        if cached is None or cached[0] != key:  # the fixed part is built once per model and S
            cached = _BASES[model] = (key, self._linear(self.ids))
        self.base = cached[1]
        self.extra_ids = torch.empty(0, dtype=torch.long, device=model.device)
        self.extra = None

    def _linear(self, ids: Tensor):
        """The head's rows for `ids`, behind the head's own kernel (so S's logits are the full head's)."""
        head = self.model.lm_head
        if hasattr(head, "rows"):  # an inference kernel (quantize.py) builds its own kind over the rows
            return head.rows(ids)
        rows = head.weight[ids]  # the plain head: a nn.Linear, or the embedding table when tied
        return lambda x: F.linear(x, rows)

    def add(self, tokens: Sequence[int]) -> None:
        """Put tokens into S (a no-op for those already there)."""
        new = [t for t in set(tokens) if not self.member[t]]
        if not new:
            return
        self.member[new] = True
        self.extra_ids = torch.cat([self.extra_ids, torch.tensor(new, device=self.extra_ids.device)])
        self.extra = self._linear(self.extra_ids)  # small: rebuilt whole rather than grown in place

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Normed hidden (1, D) -> (logits over S (1, |S|), the token id of each column)."""
        logits = self.base(x).float()
        if self.extra is None:
            return logits, self.ids
        return torch.cat([logits, self.extra(x).float()], dim=-1), torch.cat([self.ids, self.extra_ids])


class SpeculativeDecoder:
    """The decoding loop of one row, k tokens per pass over the head: `run` yields token ids.

    Like plain decoding, the last token yielded is not fed to the cache; whenever the caller stops reading
    (a stop token, a stop string, the length limit), the cache holds exactly the tokens yielded before it.
    `sampler` carries a conversation's state (seed stream, tokens seen) from turn to turn.
    """

    def __init__(self, session, draft: DraftHead, params: SamplingParams, draft_tokens: int,
                 sampler: Sampler | None = None):
        if draft_tokens < 1:
            raise NanogemmaError(f"--draft-tokens must be >= 1, got {draft_tokens}")
        if session.batch != 1 or session.cache.spare < draft_tokens:
            raise NanogemmaError("speculative decoding needs a one-row session with spare >= draft tokens")
        self.session, self.draft, self.params, self.k = session, draft, params, draft_tokens
        self.sampler = sampler or Sampler(params, 1, session.model.config.vocab_size, session.model.device)
        self.drafted = self.accepted = 0

    def _prepare(self, logits: Tensor, seen: Tensor | None) -> Tensor:
        p = self.params
        logits = logits.float()
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, p.repetition_penalty)
        return logits if p.greedy else filter_logits(logits / p.temperature, p.top_k, p.top_p, p.min_p)

    def _emit(self, out: list[int]) -> Iterator[int]:
        """Yield a pass's tokens, all but the last of which are in the cache; a caller that stops reading at
        out[j] gets out[j:-1] taken back out of the cache, so that it holds the tokens before out[j] only."""
        for j, t in enumerate(out):
            try:
                yield t
            except GeneratorExit:
                self.session.rollback(len(out) - 1 - j)
                raise

    def _pick(self, logits: Tensor) -> tuple[int, Tensor | None]:
        """-> (token index into `logits`' columns, its distribution or None when greedy)."""
        if self.params.greedy:
            return int(logits.argmax(-1)), None
        probs = logits.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self.sampler.generator)), probs

    @torch.inference_mode()
    def run(self, prompt: Sequence[int], first_logits: Tensor, max_new: int) -> Iterator[int]:
        """Tokens after `prompt`, whose next-token logits are `first_logits` (1, V); at most `max_new`."""
        sampler = self.sampler
        sampler.observe([list(prompt)])
        self.draft.add(prompt)
        last = int(sampler(first_logits))
        self.draft.add([last])
        yield last
        emitted = 1
        while emitted < max_new:
            out = self._head_pass(last, min(self.k, max_new - emitted))
            yield from self._emit(out)
            emitted += len(out)
            last = out[-1]

    def _head_pass(self, last: int, k: int) -> list[int]:
        """Draft k tokens after `last` (fed now) with the head over S, check them with the full head: -> the
        pass's tokens, all but the last in the cache (the rejected drafts are taken back out)."""
        model, sampler = self.session.model, self.sampler
        seen = None if sampler.seen is None else sampler.seen.clone()
        hidden, drafts, draft_probs, draft_logits = [], [], [], []
        token = last
        for _ in range(k):
            h = model.final_norm(self.session.step_hidden(torch.tensor([token], device=model.device)))
            hidden.append(h)
            sub_logits, sub_ids = self.draft(h)  # S is fixed within a round: the same sub_ids every time
            draft_logits.append(sub_logits)
            col, q = self._pick(self._prepare(sub_logits, None if seen is None else seen[:, sub_ids]))
            token = int(sub_ids[col])
            drafts.append(token)
            draft_probs.append(None if q is None else (q, sub_ids))
            if seen is not None:
                seen[0, token] = True
        full = model.lm_head(torch.cat(hidden)).float()  # (k, V): one pass over the head for k tokens
        # S's columns are taken from the drafts' own one-row products, so that the check and the draft
        # see the same numbers there; only the tokens outside S can overturn a draft.
        full[:, sub_ids] = torch.cat(draft_logits)
        out = []
        for j, d in enumerate(drafts):
            target = self._prepare(full[j:j + 1], sampler.seen)
            if draft_probs[j] is None:  # greedy: the full model's argmax
                t = int(target.argmax(-1))
            else:
                q, q_ids = draft_probs[j]
                q_full = torch.zeros(target.shape[-1], device=target.device)
                q_full[q_ids] = q[0]
                t = accept_or_resample(target.softmax(-1)[0], q_full, d, sampler.generator)
            out.append(t)
            sampler.observe(torch.tensor([t], device=model.device))
            if t != d:
                break
        self.drafted += k
        self.accepted += sum(t == d for t, d in zip(out, drafts, strict=False))
        self.session.rollback(k - len(out))  # fed: last + drafts[:-1]; valid: last + out[:-1]
        self.draft.add(out)
        return out


def accept_or_resample(p: Tensor, q: Tensor, draft: int, generator: torch.Generator | None = None) -> int:
    """Speculative sampling's rule: a draft drawn from q becomes a draw from p.

    Keep the draft with probability min(1, p/q); otherwise draw from the part of p that q under-covers,
    max(p - q, 0) normalised. Together: P(token x) = min(p, q)(x) + (1 - sum min(p, q)) * residual(x) = p(x).
    """
    if torch.rand((), generator=generator, device=p.device) * q[draft] <= p[draft]:
        return draft
    residual = (p - q).clamp_(min=0)
    if float(residual.sum()) <= 0:  # p == q up to rounding: any draw from p is right
        residual = p
    return int(torch.multinomial(residual, 1, generator=generator))


LOOKUP_NGRAMS = (3, 2)  # the tail lengths looked up, longest first: one token alone matches too often by chance


class TextIndex:
    """Where each n-gram of a token sequence last occurred, so that the tokens after it can be proposed."""

    def __init__(self, tokens: Sequence[int], ngrams: Sequence[int] = LOOKUP_NGRAMS):
        self.tokens: list[int] = []
        self.ngrams = tuple(ngrams)
        self.after: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token that followed it, last time
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        for t in tokens:
            i = len(self.tokens)
            for n in self.ngrams:
                if i >= n:
                    self.after[tuple(self.tokens[i - n:i])] = i
            self.tokens.append(int(t))

    def propose(self, k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the sequence's last n tokens."""
        if k < 1:
            return []
        for n in self.ngrams:
            if len(self.tokens) > n:
                start = self.after.get(tuple(self.tokens[-n:]))
                if start is not None:
                    return self.tokens[start:start + k]
        return []


class LookupDecoder(SpeculativeDecoder):
    """Prompt-lookup decoding of one row (see the module docstring): drafts copied from the text, checked
    k + 1 rows at a time by one call through the whole model; where the text has none, a pass of the head's
    drafts over S when `draft` is given, else a plain step."""

    def __init__(self, session, params: SamplingParams, draft_tokens: int, sampler: Sampler | None = None,
                 draft: DraftHead | None = None):
        super().__init__(session, draft, params, draft_tokens, sampler)
        if session.cache.spare < draft_tokens + 1:
            raise NanogemmaError("prompt-lookup decoding needs a one-row session with spare >= draft tokens + 1")
        self.passes = 0  # calls that checked drafts

    @torch.inference_mode()
    def run(self, prompt: Sequence[int], first_logits: Tensor, max_new: int) -> Iterator[int]:
        """Tokens after `prompt` (the text to draft from: in a chat, the whole conversation so far), whose
        next-token logits are `first_logits` (1, V); at most `max_new`."""
        session, sampler, device = self.session, self.sampler, self.session.model.device
        sampler.observe([list(prompt)])
        text = TextIndex(prompt)
        last = int(sampler(first_logits))
        text.extend([last])
        if self.draft is not None:
            self.draft.add(list(prompt) + [last])
        yield last
        emitted = 1
        while emitted < max_new:
            drafts = text.propose(min(self.k, max_new - emitted - 1))  # the token after them counts too
            if not drafts and self.draft is not None:  # nothing to copy: the head's drafts
                out = self._head_pass(last, min(self.k, max_new - emitted))
                text.extend(out)
                yield from self._emit(out)
                emitted += len(out)
                last = out[-1]
                continue
            if not drafts:  # nothing to copy, no head to draft with: a plain step
                last = int(sampler(session.step(torch.tensor([last], device=device))))
                text.extend([last])
                yield last
                emitted += 1
                continue
            logits = session.extend(torch.tensor([[last] + drafts], device=device))[0]  # (1 + d, V)
            out = []
            for j in range(len(drafts) + 1):
                target = self._prepare(logits[j:j + 1], sampler.seen)
                if self.params.greedy:
                    t = int(target.argmax(-1))
                elif j < len(drafts):  # a draft that is certain (q = 1 on it): kept with probability p
                    q = torch.zeros(target.shape[-1], device=target.device)
                    q[drafts[j]] = 1.0
                    t = accept_or_resample(target.softmax(-1)[0], q, drafts[j], sampler.generator)
                else:
                    t = int(torch.multinomial(target.softmax(-1)[0], 1, generator=sampler.generator))
                out.append(t)
                sampler.observe(torch.tensor([t], device=device))
                if j == len(drafts) or t != drafts[j]:
                    break
            self.passes += 1
            self.drafted += len(drafts)
            self.accepted += sum(t == d for t, d in zip(out, drafts, strict=False))
            session.rollback(len(drafts) + 1 - len(out))  # fed: last + drafts; valid: last + out[:-1]
            text.extend(out)
            yield from self._emit(out)
            emitted += len(out)
            last = out[-1]

