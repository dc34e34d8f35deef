"""The backend-free half of generation: what a user asks for, and how new token ids become text.

Both decoders — PyTorch (`generation.py`) and JAX (`jax/generation.py`) — take a `SamplingParams`, stop at
the ids of `stop_ids_for`, and hand their rows of new ids to `stream_text`, which detokenises
incrementally and applies stop strings. Nothing here needs torch or JAX.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .errors import NanogemmaError

# Self-speculative decoding's defaults (speculative.py), here so that the CLI's flags need no torch.
DEFAULT_DRAFT_VOCAB = 32_768
DEFAULT_DRAFT_TOKENS = 6


def mark_stops(tokens: list[int], done: list[bool], stop_ids: set[int]) -> list[int | None]:
    """One step's tokens, None for rows that are done; a row is done from its first stop token (not yielded)."""
    out: list[int | None] = []
    for b, t in enumerate(tokens):
        if not done[b] and t in stop_ids:
            done[b] = True
        out.append(None if done[b] else t)
    return out


def check_request(prompts: Sequence[Sequence[int]], max_new_tokens: int, limit: int) -> int:
    """Refuse what no decoder can do (both backends' decoders ask here); returns the tokens that fit."""
    if max_new_tokens < 0:
        raise NanogemmaError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    if not prompts:
        raise NanogemmaError("no prompts to continue")
    longest = max(len(p) for p in prompts)
    if longest >= limit:
        raise NanogemmaError(f"a prompt has {longest} tokens; the model's context is {limit}: shorten it")
    return min(max_new_tokens, limit - longest)  # generation ends at the context limit

# ------------------------------------------------------------------------------------------ sampling


@dataclass
class SamplingParams:
    """How to pick each token. The defaults are greedy decoding with no penalty."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None

    def validate(self) -> SamplingParams:
        validate(self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty)
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def validate(temperature: float, top_k: int | None, top_p: float | None, min_p: float | None = None,
             repetition_penalty: float = 1.0) -> None:
    """Raise a NanogemmaError naming the flag that is out of range."""
    if temperature < 0:
        raise NanogemmaError(f"--temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise NanogemmaError(f"--top-k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise NanogemmaError(f"--top-p must be in (0, 1], got {top_p}")
    if min_p is not None and not 0.0 <= min_p <= 1.0:
        raise NanogemmaError(f"--min-p must be in [0, 1], got {min_p}")
    if not repetition_penalty > 0:
        raise NanogemmaError(f"--repetition-penalty must be > 0 (1 means none), got {repetition_penalty}")


# ---------------------------------------------------------------------------------------------- text


class TextStream:
    """Incremental detokenisation with stop strings.

    A UTF-8 character can span several byte-fallback tokens; decoding a prefix of them gives U+FFFD, so a
    trailing U+FFFD is held back until the next token completes it. Text that could be the start of a
    stop string is held back too, until it either completes the stop string (then `stopped` is set and the
    text ends just before it) or stops matching.
    """

    def __init__(self, tok, stop: Sequence[str] = ()):
        self.tok, self.ids, self.emitted = tok, [], 0
        self.stop = [s for s in stop if s]
        self.stopped = False
        self.text = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        return self._emit(text, final=False)

    def flush(self) -> str:
        return self._emit(self.tok.decode(self.ids), final=True)

    def _emit(self, text: str, final: bool) -> str:
        if self.stopped:
            return ""
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, self.stopped = text[:cut], True
        self.text = text
        safe = len(text)
        if not final and not self.stopped:
            safe -= max((k for s in self.stop for k in range(min(len(s) - 1, len(text)), 0, -1)
                         if text.endswith(s[:k])), default=0)
        piece = text[self.emitted:safe]
        self.emitted = max(self.emitted, safe)
        return piece


def stop_ids_for(tok) -> set[int]:
    """<eos> ends a document; <end_of_turn> ends a chat turn (instruction-tuned models emit it)."""
    ids = {tok.eos_id}
    if getattr(tok, "end_of_turn_id", None) is not None:
        ids.add(tok.end_of_turn_id)
    return ids


def stream_text(decoder, tok, rows: int, stop: Sequence[str] = (),
                stream: Callable[[int, str], None] | None = None, timing: dict | None = None) -> list[str]:
    """Turn a decoder's rows of new token ids into text: stop strings, whole characters, `stream(row, piece)`.

    Shared by the PyTorch and JAX decoders: anything iterable over rows (None = row finished) with `finish(row)`.
    `timing`, if given, gets "start", "first" (perf_counter when the first tokens came: prefill done) and
    "tokens" (new tokens generated), for `generate --stats`.
    """
    streams = [TextStream(tok, stop) for _ in range(rows)]
    if timing is not None:
        timing.update(start=time.perf_counter(), first=None, tokens=0)
    for row in decoder:
        if timing is not None:
            timing["first"] = timing["first"] or time.perf_counter()
            timing["tokens"] += sum(t is not None for t in row)
        for b, token in enumerate(row):
            if token is None:
                continue
            piece = streams[b].push(token)
            if piece and stream:
                stream(b, piece)
            if streams[b].stopped:
                decoder.finish(b)
    for b, s in enumerate(streams):
        tail = s.flush()
        if tail and stream:
            stream(b, tail)
    return [s.text for s in streams]
