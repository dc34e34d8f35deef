"""Autoregressive generation: the simple, obviously-correct loop, with streaming text output.

Each step runs the model over the whole sequence so far and samples the next token from the last position.
That is O(T²) work per token — the KV-cache engine avoids it — but it is the definition every faster path
is tested against.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .errors import NanogemmaError
from .model import Gemma
from .sampling import sample, validate


class TextStream:
    """Incremental detokenisation that never splits a multi-byte character.

    A UTF-8 character can span several byte-fallback tokens; decoding a prefix of them gives U+FFFD. We
    decode everything generated so far and hold back a trailing U+FFFD until the next token completes it.
    """

    def __init__(self, tok):
        self.tok, self.ids, self.emitted = tok, [], 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[self.emitted:], len(text)
        return piece

    def flush(self) -> str:
        text = self.tok.decode(self.ids)
        piece, self.emitted = text[self.emitted:], len(text)
        return piece


def stop_ids_for(tok) -> set[int]:
    """<eos> ends a document; <end_of_turn> ends a chat turn (instruction-tuned models emit it)."""
    ids = {tok.eos_id}
    if getattr(tok, "end_of_turn_id", None) is not None:
        ids.add(tok.end_of_turn_id)
    return ids


@torch.inference_mode()
def generate_ids(model: Gemma, ids: list[int], max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop_ids: set[int] | None = None) -> Iterator[int]:
    """Yield new token ids one at a time; stops at a stop id (not yielded), max_new_tokens or the context."""
    validate(temperature, top_k, top_p)
    limit = model.config.max_seq_len
    if len(ids) == 0:
        raise NanogemmaError("the prompt is empty and no <bos> was added: nothing to continue")
    if len(ids) >= limit:
        raise NanogemmaError(f"the prompt has {len(ids)} tokens; the model's context is {limit}: shorten it")
    gen = torch.Generator(device=model.device)
    if seed is not None:
        gen.manual_seed(seed)
    else:
        gen.seed()
    seq = torch.tensor([ids], dtype=torch.long, device=model.device)
    for _ in range(min(max_new_tokens, limit - len(ids))):  # generation ends at the context limit
        logits = model(seq, last_only=True)[:, -1]
        nxt = sample(logits, temperature, top_k, top_p, gen)
        token = int(nxt.item())
        if stop_ids and token in stop_ids:
            return
        yield token
        seq = torch.cat([seq, nxt[:, None]], dim=1)


def generate(model: Gemma, tok, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             add_bos: bool = True, stream: Callable[[str], None] | None = None) -> str:
    """Continue `prompt`; return the new text only. `stream` is called with each new piece of text."""
    stream_text = TextStream(tok)
    for token in generate_ids(model, tok.encode(prompt, add_bos=add_bos), max_new_tokens, temperature,
                              top_k, top_p, seed, stop_ids_for(tok)):
        piece = stream_text.push(token)
        if piece and stream:
            stream(piece)
    tail = stream_text.flush()
    if tail and stream:
        stream(tail)
    return stream_text.tok.decode(stream_text.ids)
