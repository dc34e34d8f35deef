"""Generation in JAX: jitted prefill and decode over a static KV cache, compiled once per shape.

The same pieces as `nanogemma/generation.py`, reshaped for a compiler:

* `Session` owns a static cache (`cache.py`) and two jitted functions: `prefill` feeds prompts in chunks of
  a fixed size (the last chunk padded), `step` feeds one token per row. Shapes depend only on (batch,
  cache length, chunk size), and the cache length is rounded up to a multiple of `LENGTH_BUCKET`, so a new
  prompt reuses the compiled programs instead of tracing again; the functions live at module level, keyed
  by the config, so they survive from one `generate` call to the next.
* A batch is right-padded: each row writes and attends at its own positions, and pads (position -1) are
  never stored. To get the next-token logits of rows that end at different columns, prefill feeds every
  row's tokens but its last, and the first decode step feeds the last ones.
* `sample` runs jitted too: repetition penalty, then greedy or temperature + top-k / top-p / min-p, then
  a draw from `jax.random` (reproducible with a seed, though not the same stream as PyTorch's generator).
  The settings are static (each setting compiles its own sampler); top-k uses `lax.top_k`, not a sort.
* `Decoder` is the loop, one token per row each step, with stop tokens; `generate` / `generate_batch`
  turn text into text with the PyTorch side's `TextStream` (stop strings, split UTF-8 characters).

Python drives the decode loop (one jitted call per token), which keeps streaming and stop strings simple;
the next step is dispatched before the host looks at the sampled tokens, so the two overlap.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..config import GemmaConfig
from ..decoding import SamplingParams, check_request, mark_stops, stop_ids_for, stream_text
from ..errors import NanogemmaError
from .cache import KVCache, init_cache
from .model import JaxGemma, config_key, forward_cached

DEFAULT_PREFILL_CHUNK = 128
LENGTH_BUCKET = 256  # cache lengths are rounded up to a multiple of this: fewer distinct shapes


def cache_length(cfg: GemmaConfig, needed: int) -> int:
    return min(cfg.max_seq_len, LENGTH_BUCKET * math.ceil(needed / LENGTH_BUCKET))


# ------------------------------------------------------------------------------------- compiled parts


@functools.lru_cache(maxsize=8)
def _programs(key: str) -> tuple[Callable, Callable]:
    """(prefill, step) for one config; jax.jit then keeps one executable per argument shape."""
    cfg = GemmaConfig.from_dict(json.loads(key))

    def prefill(params, cache, ids, pos):
        return forward_cached(params, cfg, ids, pos, cache)[1]  # logits unused: XLA drops the head

    def step(params, cache, tokens, pos):
        logits, cache = forward_cached(params, cfg, tokens[:, None], pos[:, None], cache)
        return logits[:, -1], cache

    # The cache is donated: XLA may update it in place instead of copying every buffer each step.
    return jax.jit(prefill, donate_argnums=1), jax.jit(step, donate_argnums=1)


class Session:
    """A model plus a static cache for `batch` rows of at most `max_len` positions each."""

    def __init__(self, model: JaxGemma, batch: int = 1, max_len: int | None = None,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK):
        cfg = model.config
        if prefill_chunk < 1:
            raise NanogemmaError(f"the prefill chunk must be >= 1 token, got {prefill_chunk}")
        self.model, self.batch, self.chunk = model, batch, prefill_chunk
        self.max_len = cache_length(cfg, max_len or cfg.max_seq_len)
        self.cache: KVCache = init_cache(cfg, batch, self.max_len, model.dtype)
        self.next_pos = np.zeros(batch, dtype=np.int32)  # per row: the position its next token takes
        self._prefill, self._step = _programs(config_key(cfg))

    def prefill(self, rows: Sequence[Sequence[int]], pad_id: int = 0) -> jax.Array:
        """Feed each row's tokens (lengths may differ); returns float32 logits (B, V) for each row's next token."""
        if len(rows) != self.batch:
            raise NanogemmaError(f"this session holds {self.batch} row(s), got {len(rows)} prompt(s)")
        lengths = np.array([len(r) for r in rows], dtype=np.int32)
        if lengths.min() == 0:
            raise NanogemmaError("a prompt is empty and no <bos> was added: nothing to continue")
        if (self.next_pos + lengths).max() > self.max_len:
            raise NanogemmaError(f"the KV cache holds {self.max_len} tokens: {int(lengths.max())} more do not fit; "
                                 "start a new session (or allow a longer context)")
        body = int(lengths.max()) - 1  # every row's tokens but its last, right-padded to a whole chunk
        n_chunks = math.ceil(body / self.chunk)
        if n_chunks:
            width = n_chunks * self.chunk
            ids = np.full((self.batch, width), pad_id, dtype=np.int32)
            pos = np.full((self.batch, width), -1, dtype=np.int32)
            for b, r in enumerate(rows):
                n = len(r) - 1
                ids[b, :n] = r[:n]
                pos[b, :n] = self.next_pos[b] + np.arange(n)
            for c in range(n_chunks):
                s = slice(c * self.chunk, (c + 1) * self.chunk)
                self.cache = self._prefill(self.model.params, self.cache, jnp.asarray(ids[:, s]), jnp.asarray(pos[:, s]))
            self.next_pos = self.next_pos + lengths - 1  # a new array: see `step`
        return self.step(np.array([r[-1] for r in rows], dtype=np.int32))

    def step(self, tokens: np.ndarray | jax.Array) -> jax.Array:
        """Feed one token per row (B,) -> float32 logits (B, V). Does not wait for the result."""
        if self.next_pos.max() >= self.max_len:
            raise NanogemmaError(f"the KV cache holds {self.max_len} tokens and is full; start a new session")
        logits, self.cache = self._step(self.model.params, self.cache, jnp.asarray(tokens, jnp.int32),
                                        jnp.asarray(self.next_pos))
        # Never `+=`: on CPU, jnp.asarray may share the numpy buffer, and the step it was handed to runs
        # asynchronously — an in-place update could change the position it reads.
        self.next_pos = self.next_pos + 1
        return logits


# ------------------------------------------------------------------------------------------ sampling


def filter_logits(logits: jax.Array, top_k: int | None = None, top_p: float | None = None,
                  min_p: float | None = None) -> jax.Array:
    """Set to -inf every logit outside the top-k, the top-p nucleus and the min-p floor (as sampling.py)."""
    V = logits.shape[-1]
    if top_k is not None and 0 < top_k < V:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and 0.0 < top_p < 1.0:
        # Sorted descending, a token is dropped when the tokens ranked above it already reach top_p; the
        # kept ones are a prefix, so the smallest kept logit is the cut. (After top-k, only k can survive.)
        n = V if top_k is None else min(top_k, V)
        ranked = jax.lax.top_k(logits, n)[0]
        probs = jax.nn.softmax(ranked, axis=-1)
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        cut = jnp.take_along_axis(ranked, keep.sum(-1, keepdims=True) - 1, axis=-1)
        logits = jnp.where(logits < cut, -jnp.inf, logits)
    if min_p is not None and min_p > 0.0:
        floor = logits.max(-1, keepdims=True) + math.log(min_p)  # p_i >= min_p * p_max, in logit space
        logits = jnp.where(logits < floor, -jnp.inf, logits)
    return logits


def sample(logits: jax.Array, key: jax.Array, seen: jax.Array | None, p: SamplingParams) -> jax.Array:
    """logits (B, V) -> token ids (B,), in the order of `nanogemma.sampling`: penalty, greedy or filters, draw."""
    logits = logits.astype(jnp.float32)
    if seen is not None and p.repetition_penalty != 1.0:
        r = p.repetition_penalty
        logits = jnp.where(seen, jnp.where(logits > 0, logits / r, logits * r), logits)
    if p.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits / p.temperature, p.top_k, p.top_p, p.min_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.lru_cache(maxsize=16)
def _sampler(temperature: float, top_k: int | None, top_p: float | None, min_p: float | None,
             penalty: float) -> Callable:
    p = SamplingParams(temperature, top_k, top_p, min_p, penalty)

    def run(logits, key, seen):
        tokens = sample(logits, key, seen, p)
        if seen is not None:
            seen = seen.at[jnp.arange(tokens.shape[0]), tokens].set(True)
        return tokens, seen

    return jax.jit(run)


class Sampler:
    """Sampling with state: the random key (advanced every call) and, for the penalty, the tokens seen."""

    def __init__(self, params: SamplingParams, batch: int, vocab_size: int):
        self.params = params.validate()
        seed = params.seed if params.seed is not None else int(np.random.SeedSequence().entropy % (1 << 31))
        self.key = jax.random.key(seed)
        self.batch, self.vocab_size = batch, vocab_size
        self.seen = jnp.zeros((batch, vocab_size), bool) if params.repetition_penalty != 1.0 else None
        self._run = _sampler(params.temperature, params.top_k, params.top_p, params.min_p, params.repetition_penalty)

    def observe(self, rows: Sequence[Sequence[int]]) -> None:
        if self.seen is None:
            return
        seen = np.zeros((self.batch, self.vocab_size), bool)
        for b, ids in enumerate(rows):
            seen[b, list(ids)] = True
        self.seen = self.seen | seen

    def __call__(self, logits: jax.Array) -> jax.Array:
        self.key, sub = jax.random.split(self.key)
        tokens, self.seen = self._run(logits, sub, self.seen)
        return tokens


# ------------------------------------------------------------------------------------------ the loop


class Decoder:
    """Sample up to `max_new_tokens` per row; iterate to get one list of tokens per step (None: row done).

    The same contract as the PyTorch `Decoder`: a row stops at a token in `stop_ids` (not yielded) or when
    the caller calls `finish(row)`; generation ends at `max_new_tokens` or the context limit.
    """

    def __init__(self, model: JaxGemma, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 params: SamplingParams | None = None, stop_ids: set[int] | None = None,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, pad_id: int = 0):
        self.params = (params or SamplingParams()).validate()
        self.max_new = check_request(prompts, max_new_tokens, model.config.max_seq_len)
        self.model, self.prompts, self.pad_id = model, [list(p) for p in prompts], pad_id
        self.stop_ids = stop_ids or set()
        self.done = [False] * len(prompts)
        self.prefill_chunk = prefill_chunk

    def finish(self, row: int) -> None:
        self.done[row] = True

    def __iter__(self) -> Iterator[list[int | None]]:
        if self.max_new == 0:
            return
        B = len(self.prompts)
        session = Session(self.model, B, max(len(p) for p in self.prompts) + self.max_new, self.prefill_chunk)
        sampler = Sampler(self.params, B, self.model.config.vocab_size)
        sampler.observe(self.prompts)
        logits = session.prefill(self.prompts, self.pad_id)
        for i in range(self.max_new):
            tokens = sampler(logits)
            last = i == self.max_new - 1
            if not last:
                logits = session.step(tokens)  # dispatched now; runs while the host reads `tokens`
            out = mark_stops(np.asarray(tokens).tolist(), self.done, self.stop_ids)
            if all(self.done):
                return
            yield out
            if all(self.done):
                return


def generate_ids(model: JaxGemma, ids: list[int], max_new_tokens: int, params: SamplingParams | None = None,
                 stop_ids: set[int] | None = None, use_cache: bool = True,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> Iterator[int]:
    """Yield new token ids of one prompt. `use_cache=False` is the reference: every step reruns the whole
    sequence (padded to a fixed length, so it too compiles once)."""
    if use_cache:
        for row in Decoder(model, [ids], max_new_tokens, params, stop_ids, prefill_chunk):
            if row[0] is None:
                return
            yield row[0]
        return
    decoder = Decoder(model, [ids], max_new_tokens, params, stop_ids)  # validates like the cached path
    sampler = Sampler(decoder.params, 1, model.config.vocab_size)
    sampler.observe([ids])
    width = cache_length(model.config, len(ids) + decoder.max_new)
    seq = np.zeros((1, width), np.int32)
    seq[0, :len(ids)] = ids
    n = len(ids)
    for _ in range(decoder.max_new):
        pos = np.where(np.arange(width) < n, np.arange(width), -1)[None].astype(np.int32)
        token = int(sampler(model(seq.copy(), pos)[:, n - 1])[0])  # a copy: `seq` changes below
        if stop_ids and token in stop_ids:
            return
        yield token
        seq[0, n] = token
        n += 1


# ---------------------------------------------------------------------------------------------- text


def generate_batch(model: JaxGemma, tok, prompts: Sequence[str], max_new_tokens: int = 64,
                   params: SamplingParams | None = None, add_bos: bool = True, stop: Sequence[str] = (),
                   stream: Callable[[int, str], None] | None = None,
                   prefill_chunk: int = DEFAULT_PREFILL_CHUNK, timing: dict | None = None) -> list[str]:
    """Continue several prompts together; returns each one's new text (as `nanogemma.generation.generate_batch`)."""
    ids = [tok.encode(p, add_bos=add_bos) for p in prompts]
    pad = getattr(tok, "pad_id", 0) or 0
    decoder = Decoder(model, ids, max_new_tokens, params, stop_ids_for(tok), prefill_chunk, pad)
    if timing is not None:
        timing["prompt_tokens"] = sum(map(len, ids))
    return stream_text(decoder, tok, len(prompts), stop, stream, timing)


def generate(model: JaxGemma, tok, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             add_bos: bool = True, stream: Callable[[str], None] | None = None, *, min_p: float | None = None,
             repetition_penalty: float = 1.0, stop: Sequence[str] = (),
             prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> str:
    """Continue `prompt` with the JAX model; return the new text only (as `nanogemma.generate`)."""
    params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, seed)
    sink = (lambda _row, piece: stream(piece)) if stream else None
    return generate_batch(model, tok, [prompt], max_new_tokens, params, add_bos, stop, sink, prefill_chunk)[0]
