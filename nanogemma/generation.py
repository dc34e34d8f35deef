"""Autoregressive generation with the KV cache: prefill the prompt in chunks, then decode one token a step.

The pieces:

* `Session` owns a `KVCache` and feeds it: `prefill(rows)` runs the prompts through the model in chunks
  (left-padding a batch so every row ends at the same column) and `step(tokens)` feeds one token per row.
  Both return the next-token logits. A chat keeps one session across turns, so earlier turns are never
  recomputed. With `compile=...` the decode step is a `torch.compile`d function over a static-shape cache
  (CUDA graphs on a GPU: inductor's `triton.cudagraphs`, what `mode="reduce-overhead"` sets); prefill stays eager.
* `Decoder` is the sampling loop over a batch: it yields one token per row each step, stops a row at a stop
  token (<eos>, <end_of_turn>) or when the caller says so (a stop string), and stops everything at
  `max_new_tokens` or the context limit.
* `generate` / `generate_batch` turn text into text, with streaming and stop strings (`TextStream`).

**The context limit.** A prompt must leave room for at least one new token: a prompt of `max_seq_len`
tokens or more is an error. Generation then ends at the context limit exactly as it ends at
`max_new_tokens` — the text is returned, shorter than asked.

`use_cache=False` keeps the original definition: re-run the model over the whole sequence for every token.
It is O(T²) and exists so the tests can prove the cached path gives the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from .cache import KVCache
from .decoding import SamplingParams, check_request, mark_stops, stop_ids_for, stream_text
from .errors import NanogemmaError
from .model import Gemma
from .sampling import Sampler
from .speculative import Speculation, SpeculativeDecoder

DEFAULT_PREFILL_CHUNK = 512


class Session:
    """A model plus a KV cache for `batch` rows of at most `max_len` tokens (pads included)."""

    def __init__(self, model: Gemma, batch: int = 1, max_len: int | None = None, compile: bool | str = False,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, spare: int = 0):
        cfg = model.config
        self.model, self.batch = model, batch
        self.max_len = min(max_len or cfg.max_seq_len, cfg.max_seq_len)
        if prefill_chunk < 1:
            raise NanogemmaError(f"the prefill chunk must be >= 1 token, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self.cache = KVCache(cfg, batch, self.max_len, model.dtype, model.device, static=bool(compile), spare=spare)
        self.pads = torch.zeros(batch, 1, dtype=torch.long, device=model.device)  # per-row left padding
        self._pos = torch.zeros(batch, 1, dtype=torch.long, device=model.device)  # next decode position
        self._step_fn = self._compile(compile) if compile else self._eager_step

    # ------------------------------------------------------------------------------------------ state
    @property
    def length(self) -> int:
        """Columns in the cache (the longest row's tokens)."""
        return self.cache.length

    @torch.inference_mode()
    def reset(self) -> None:
        self.cache.reset()
        self.pads = torch.zeros_like(self.pads)

    # ------------------------------------------------------------------------------------------ feeding
    @torch.inference_mode()
    def prefill(self, rows: Sequence[Sequence[int]], pad_id: int = 0) -> Tensor:
        """Feed each row's tokens; returns float logits (B, V) for the token after each row's last one.

        Rows may differ in length only on an empty cache (they are left-padded); later calls append equal
        numbers of tokens to every row, e.g. the next turn of a chat.
        """
        if len(rows) != self.batch:
            raise NanogemmaError(f"this session holds {self.batch} row(s), got {len(rows)} prompt(s)")
        longest = max(len(r) for r in rows)
        if min(len(r) for r in rows) == 0:
            raise NanogemmaError("a prompt is empty and no <bos> was added: nothing to continue")
        if longest != min(len(r) for r in rows) and self.length > 0:
            raise NanogemmaError("rows of different lengths can only be fed to an empty session")
        self.cache.check_room(longest)
        device = self.model.device
        if self.length == 0:
            self.pads = torch.tensor([[longest - len(r)] for r in rows], device=device)
        ids = torch.tensor([[pad_id] * (longest - len(r)) + list(r) for r in rows], device=device)
        logits = None
        for start in range(0, longest, self.prefill_chunk):
            chunk = ids[:, start:start + self.prefill_chunk]
            cols = torch.arange(self.length, self.length + chunk.shape[1], device=device)
            logits = self.model(chunk, cols[None] - self.pads, self.cache, last_only=True)[:, -1]
            self.cache.advance(chunk.shape[1])
        self._pos = self.pads.neg() + self.length
        return logits

    @torch.inference_mode()
    def step(self, tokens: Tensor) -> Tensor:
        """Feed one token per row, tokens (B,) -> float logits (B, V)."""
        return self.model.logits(self.step_hidden(tokens)).float()

    @torch.inference_mode()
    def step_hidden(self, tokens: Tensor) -> Tensor:
        """Feed one token per row, tokens (B,) -> the last block's output (B, hidden), before the final norm."""
        self.cache.check_room(1)
        self.cache.cursor.masks.clear()  # normally empty; not after a step that was interrupted midway
        hidden = self._step_fn(tokens.view(self.batch, 1), self._pos)
        self.cache.advance(1)
        self._pos += 1
        return hidden

    @torch.inference_mode()
    def extend(self, tokens: Tensor) -> Tensor:
        """Feed T tokens per row in one call, tokens (B, T) -> float logits (B, T, V), one row of logits after
        each token. A call of at most `spare` tokens can be taken back (`rollback`), as T steps can."""
        T = tokens.shape[1]
        self.cache.check_room(T)
        self.cache.cursor.masks.clear()
        pos = self._pos + torch.arange(T, device=self._pos.device)
        logits = self.model(tokens.view(self.batch, T), pos, self.cache)
        self.cache.advance(T)
        self._pos += T
        return logits.float()

    @torch.inference_mode()
    def rollback(self, n: int) -> None:
        """Take back the last `n` tokens fed by `step` or a short `extend` (the session needs `spare >= n`)."""
        self.cache.rollback(n)
        self._pos -= n

    def _eager_step(self, ids: Tensor, pos: Tensor) -> Tensor:
        return self.model.hidden(ids, pos, self.cache)[:, -1]

    def _compile(self, how: bool | str) -> Callable[[Tensor, Tensor], Tensor]:
        """A compiled decode step. `how`: True (inductor; CUDA graphs on a GPU) or a backend name ("eager",
        "aot_eager": no C++ compiler needed, which is how the CPU tests exercise this path)."""
        cuda = self.model.device.type == "cuda"
        self.cache.mark_static()  # needed by CUDA graphs, harmless elsewhere (and so covered by CPU tests)
        model, cache = self.model, self.cache

        def decode_step(ids: Tensor, pos: Tensor) -> Tensor:
            return model.hidden(ids, pos, cache)[:, -1]

        compiled = torch.compile(decode_step, **compile_options(how, cuda))
        # CUDA graphs reuse their output buffer on the next replay: copy the hidden state out.
        return (lambda ids, pos: compiled(ids, pos).clone()) if cuda else compiled


def _skip_guards_but_the_cache(entries: list) -> list[bool]:
    """Skip the guards on the model's modules, but keep those on the KV cache: every session's decode step
    is the same code, so a second session (another length, another batch) must not replay the first one's
    graph over its own buffers."""
    skip = torch.compiler.skip_guard_on_all_nn_modules_unsafe(entries)
    return [keep or "cache" in entry.name for keep, entry in zip(skip, entries, strict=True)]


def compile_options(how: bool | str, cuda: bool) -> dict:
    """torch.compile's arguments for the decode step: `how` is True (inductor) or a backend name."""
    # Guards re-check every parameter of the model before each step; a session keeps
    # its modules and tensors for life, so those checks can go. (`options` excludes `mode`, so CUDA graphs
    # are asked for by their inductor option rather than by mode="reduce-overhead".)
    options: dict = {"guard_filter_fn": _skip_guards_but_the_cache}
    if cuda and not isinstance(how, str):
        options["triton.cudagraphs"] = True
    backend = {"backend": how} if isinstance(how, str) else {}
    return {"fullgraph": True, "dynamic": False, "options": options, **backend}


class Decoder:
    """Sample up to `max_new_tokens` per row; iterate to get one list of tokens per step (None: row done).

    A row stops at a token in `stop_ids` (not yielded) or when the caller calls `finish(row)` (e.g. a
    stop string appeared). The last sampled token is never fed back, so no step is wasted.
    """

    def __init__(self, model: Gemma, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 params: SamplingParams | None = None, stop_ids: set[int] | None = None,
                 compile: bool | str = False, prefill_chunk: int = DEFAULT_PREFILL_CHUNK, pad_id: int = 0,
                 speculation: Speculation | None = None):
        self.params = (params or SamplingParams()).validate()
        self.max_new = check_request(prompts, max_new_tokens, model.config.max_seq_len)
        self.model, self.prompts, self.pad_id = model, [list(p) for p in prompts], pad_id
        self.stop_ids = stop_ids or set()
        self.done = [False] * len(prompts)
        self.compile, self.prefill_chunk = compile, prefill_chunk
        # Speculation pays off at batch 1, where a step costs its weights' read; a batch shares that read already.
        self.speculation = speculation if len(prompts) == 1 else None
        self.stats: SpeculativeDecoder | None = None

    def finish(self, row: int) -> None:
        self.done[row] = True

    @torch.inference_mode()
    def __iter__(self) -> Iterator[list[int | None]]:
        if self.max_new == 0:
            return
        B = len(self.prompts)
        spec = self.speculation
        session = Session(self.model, B, max(len(p) for p in self.prompts) + self.max_new, self.compile,
                          self.prefill_chunk, spare=spec.spare if spec else 0)
        if spec:
            yield from self._speculate(session, spec)
            return
        sampler = Sampler(self.params, B, self.model.config.vocab_size, self.model.device)
        sampler.observe(self.prompts)
        logits = session.prefill(self.prompts, self.pad_id)
        for i in range(self.max_new):
            tokens = sampler(logits)
            out = mark_stops(tokens.tolist(), self.done, self.stop_ids)
            if all(self.done):
                return
            yield out
            if all(self.done) or i == self.max_new - 1:  # the caller may have finished rows meanwhile
                return
            logits = session.step(tokens)


    def _speculate(self, session: Session, spec: Speculation) -> Iterator[list[int | None]]:
        self.stats = spec.decoder(session, self.params)
        logits = session.prefill(self.prompts, self.pad_id)
        for token in self.stats.run(self.prompts[0], logits, self.max_new):
            if token in self.stop_ids:
                return
            yield [token]
            if self.done[0]:
                return


@torch.inference_mode()
def generate_ids(model: Gemma, ids: list[int], max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop_ids: set[int] | None = None, *, min_p: float | None = None,
                 repetition_penalty: float = 1.0, use_cache: bool = True, compile: bool | str = False,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> Iterator[int]:
    """Yield new token ids of one prompt; stops at a stop id (not yielded), max_new_tokens or the context."""
    params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, seed)
    if use_cache:
        for row in Decoder(model, [ids], max_new_tokens, params, stop_ids, compile, prefill_chunk):
            if row[0] is None:
                return
            yield row[0]
        return
    # The reference: recompute everything for every token.
    decoder = Decoder(model, [ids], max_new_tokens, params, stop_ids)  # validates like the cached path
    sampler = Sampler(decoder.params, 1, model.config.vocab_size, model.device)
    sampler.observe([ids])
    seq = torch.tensor([ids], dtype=torch.long, device=model.device)
    for _ in range(decoder.max_new):
        token = sampler(model(seq, last_only=True)[:, -1])
        if stop_ids and int(token) in stop_ids:
            return
        yield int(token)
        seq = torch.cat([seq, token[:, None]], dim=1)


def generate_batch(model: Gemma, tok, prompts: Sequence[str], max_new_tokens: int = 64,
                   params: SamplingParams | None = None, add_bos: bool = True, stop: Sequence[str] = (),
                   stream: Callable[[int, str], None] | None = None, compile: bool | str = False,
                   prefill_chunk: int = DEFAULT_PREFILL_CHUNK, speculation: Speculation | None = None,
                   fast: bool = True, timing: dict | None = None) -> list[str]:
    """Continue several prompts together; returns the new text of each. `stream(row, piece)` sees text as it comes.
    `timing`, if given, gets the prompt tokens and the times `decoding.stream_text` records.

    Greedy results equal generating each prompt alone: rows are left-padded and the pads masked out.
    `fast` decodes a plain CPU model through its packed twin (`quantize.packed_view`): the same float32
    arithmetic in another summation order, at the CLI's speed; `model` itself is not changed.
    """
    if isinstance(prompts, str):
        raise NanogemmaError("generate_batch takes a list of prompts; for one prompt use generate(model, tok, prompt)")
    ids = [tok.encode(p, add_bos=add_bos) for p in prompts]
    pad = getattr(tok, "pad_id", 0) or 0
    if fast and not compile:  # torch.compile traces the plain modules; it cannot trace packed weights
        from .quantize import packed_view
        model = packed_view(model)
    decoder = Decoder(model, ids, max_new_tokens, params, stop_ids_for(tok), compile, prefill_chunk, pad,
                      speculation)
    if timing is not None:
        timing["prompt_tokens"] = sum(map(len, ids))
    return stream_text(decoder, tok, len(prompts), stop, stream, timing)


def generate(model: Gemma, tok, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             add_bos: bool = True, stream: Callable[[str], None] | None = None, *, min_p: float | None = None,
             repetition_penalty: float = 1.0, stop: Sequence[str] = (), compile: bool | str = False,
             prefill_chunk: int = DEFAULT_PREFILL_CHUNK, fast: bool = True) -> str:
    """Continue `prompt`; return the new text only. `stream` is called with each new piece of text.

    Stops at <eos>/<end_of_turn>, at the first of the `stop` strings (which is not included), after
    `max_new_tokens`, or at the context limit. Sampling is reproducible with `seed`. On a CPU the decoding
    runs through packed kernels (`fast`, see `generate_batch`); `model(ids)` stays the plain module.
    """
    if not isinstance(prompt, str):
        raise NanogemmaError(f"generate takes one prompt (a str), not {type(prompt).__name__}; "
                             "for several prompts use generate_batch(model, tok, prompts)")
    params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, seed)
    sink = (lambda _row, piece: stream(piece)) if stream else None
    return generate_batch(model, tok, [prompt], max_new_tokens, params, add_bos, stop, sink, compile,
                          prefill_chunk, fast=fast)[0]
