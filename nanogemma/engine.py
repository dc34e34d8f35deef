"""Continuous batching: many requests share one model, each in its own slot of one KV cache.

The engine knows nothing of text: token ids in, token ids out (the server, `server.py`, does the rest).

**Why not `generation.Session`.** A session's batch shares one column counter: prompts are left-padded so
that every row ends at the same column, and the batch starts and ends together. A server cannot wait for
the batch to finish before it takes the next request, so here every slot (a row of the cache) keeps its
*own* position counter, in a `SlotCache` (`slots.py`: the layout, the masks, the prefix copies); a slot's
attention sees its own history and nothing else, whatever the other slots hold.

**A step** (`Engine.step`) does, in order:

1. free the slots of cancelled requests (a client went away, a stop string matched, a timeout);
2. admit waiting requests into free slots (lowest slot first, so busy slots stay packed at the top);
3. one batched decode step over slots 0..b-1, b = one past the highest busy slot (all slots when compiled,
   whose shapes must not change). A slot that is not decoding (free, or still prefilling) rides along with
   position -1: its key goes to the entry its own next token will use, marked empty, so it is never read —
   on a global layer that entry is unwritten, on a ring it holds position p - W, which no query at p or
   later is allowed to see;
4. prefill waiting prompts in chunks, until the step's token budget (`step_tokens`, decode tokens included)
   is spent. The prompts being prefilled share the budget equally and go through the model *together*:
   each row of one forward call is one slot's next chunk, right-padded to the longest chunk with pads at
   position -1 (never stored, never attended), so a burst of new requests is prefilled as one batch, not
   one slot after another, and a short prompt beside a 4,000-token one gets its first token within a step
   or two. A long prompt is fed a chunk per step between the decode steps, so it delays the others by a
   chunk's time, not by its whole length: the smaller `step_tokens`, the less it stretches their token
   gaps (each prompt still gets `MIN_CHUNK` tokens a step, so a burst is not served a few at a time).
   With `prefill_share` the chunks also take no more than that fraction of a decode call's time, on the
   engine's own timings, so the gaps grow by at most that fraction whatever the machine's speed. A
   prompt's last chunk gives its first token. When prompts are being prefilled, the decoding slots can
   ride in the same call as rows of one token each (`decode_in_prefill`): a decode step reads every weight
   once whatever its rows, so on a CPU, where that read is most of a decode step's time, one call instead
   of two saves a whole pass over the weights; the riders' pads (the call's chunk length less one) cost
   compute instead. "auto" decides per step from the engine's own timings of both kinds of call;
5. sample each new token with its request's own `Sampler` (its parameters, its seeded generator, its
   repetition history), and finish a request at a stop id, at `max_new_tokens` or at the context limit.
   Its slot is free for the next step.

**Prefix reuse** (`prefix_cache=N`). Requests often share a beginning (a system prompt, a few-shot
preamble). Prompts are then prefilled in chunks that end on multiples of `PREFIX_BLOCK` tokens where they
can (the last boundary a step's budget reaches, and the last one before the prompt's end); after a chunk
that ends on one, the slot's cache rows are copied aside, keyed by the tokens so far (at most N copies;
those that never served a request go first, see `PrefixCache`). A new request starts from the longest copy
that begins its prompt: its slot gets the copy's rows, bit for bit what feeding those tokens wrote, and only
the rest is prefilled.

**Exactness.** A slot computes what a lone `generate` computes: same positions, same keys, masked the same
way. The numbers can differ only in the last bits of float arithmetic, where a batched or differently
chunked matrix product rounds differently from a batch-1 one; greedy tokens are therefore equal except
where two logits tie to within that rounding (tests/test_engine.py checks this against the lone path and a
float64 reference). The `int8` kernel is the exception: it rounds activations with one scale per call,
shared by the rows of a batch, so under batching its answers can differ from a lone run's; `int8-wo` and
the float modes keep rows independent.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .decoding import SamplingParams
from .errors import NanogemmaError
from .model import Gemma
from .sampling import Sampler
from .slots import PREFIX_BLOCK, PrefixCache, SlotCache

DEFAULT_SLOTS = 8
DEFAULT_STEP_TOKENS = 256
DEFAULT_CONTEXT = 8192
MIN_CHUNK = 16  # prompt tokens a step gives each prompt being prefilled, at least
DEFAULT_PREFIX_CACHE = 8  # prefixes `nanogemma serve` keeps
DEFAULT_PREFILL_SHARE = 0.5  # `nanogemma serve`: prompt chunks take at most half a decode call's time
RIDE_MODES = ("auto", "always", "never")
HEAD_ROWS = 16  # rows of logits one head call makes (see `Engine._head`)


def check_settings(slots: int, step_tokens: int, max_queue: int, prefix_cache: int,
                   prefill_share: float | None = None) -> None:
    """Refuse engine settings that cannot work (the server checks them before it loads the model)."""
    for name, value, least in (("--slots", slots, 1), ("--step-tokens", step_tokens, 1),
                               ("--max-queue", max_queue, 0), ("--prefix-cache", prefix_cache, 0)):
        if value < least:
            raise NanogemmaError(f"{name} must be >= {least}, got {value}")
    if prefill_share is not None and not prefill_share > 0:
        raise NanogemmaError(f"--prefill-share must be > 0 (0 on the command line: no limit), got {prefill_share}")


class QueueFull(NanogemmaError):
    """The waiting queue is at its limit: the caller should retry later (HTTP 429)."""


# ------------------------------------------------------------------------------------------ requests


@dataclass(eq=False)
class Request:
    """One prompt to continue. The engine fills `tokens`, then sets `finish_reason` and `done`.

    `on_token(request, token)` and `on_finish(request)` are called from the engine's thread: keep them short
    (e.g. hand the token to an event loop).
    """

    prompt: list[int]
    max_new_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: frozenset[int] = frozenset()
    on_token: Callable[[Request, int], None] | None = None
    on_finish: Callable[[Request], None] | None = None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (a stop id), "length", "cancelled" or "error"
    error: str | None = None
    submitted: float = 0.0
    first_token_at: float | None = None
    finished_at: float | None = None
    done: threading.Event = field(default_factory=threading.Event)
    # The engine's bookkeeping.
    slot: int | None = None
    fed: int = 0  # prompt tokens fed so far
    sampler: Sampler | None = None
    cancelled: bool = False


@dataclass
class EngineStats:
    """Counters for /metrics (read from other threads: plain ints and floats, written by the engine only)."""

    requests: int = 0
    finished: dict[str, int] = field(default_factory=lambda: collections.defaultdict(int))
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    busy_seconds: float = 0.0
    prefix_hits: int = 0  # requests that started from a stored prefix
    prefix_tokens: int = 0  # prompt tokens those requests did not have to prefill
    merged_steps: int = 0  # steps whose decoding slots rode in the prefill call


# ------------------------------------------------------------------------------------------ the engine


class Engine:
    """A model serving up to `slots` requests at once; `submit` from any thread, `run` in one thread.

    `max_len` is each slot's context (prompt plus new tokens), `step_tokens` the tokens one step may feed
    (decode and prefill together), `max_queue` how many requests may wait for a slot, `prefix_cache` how many
    prompt prefixes to keep for reuse (0: none), `decode_in_prefill` whether decoding slots ride in the
    prefill call ("auto": when the engine's timings say one call is cheaper than two; CPU only, where a
    call's time is measured without synchronising a device), `prefill_share` (None: no limit) how long a
    step's prompt chunks may take while slots are decoding, as a fraction of a decode call (on the engine's
    recent timings): the decoding slots' gaps between tokens then grow by at most that fraction, whatever
    the length of a prompt that arrives, and the prompt takes more steps.
    """

    def __init__(self, model: Gemma, slots: int = DEFAULT_SLOTS, max_len: int | None = None,
                 step_tokens: int = DEFAULT_STEP_TOKENS, max_queue: int = 64, compile: bool | str = False,
                 pad_id: int = 0, prefix_cache: int = 0, decode_in_prefill: str = "auto",
                 prefill_share: float | None = None):
        cfg = model.config
        check_settings(slots, step_tokens, max_queue, prefix_cache, prefill_share)
        if decode_in_prefill not in RIDE_MODES:
            raise NanogemmaError(f"decode_in_prefill must be one of {', '.join(RIDE_MODES)}, "
                                 f"got {decode_in_prefill!r}")
        self.prefill_share = prefill_share
        self.ride = decode_in_prefill if decode_in_prefill != "auto" or model.device.type == "cpu" else "never"
        self.decode_s: float | None = None  # recent seconds per decode call
        self.token_s: float | None = None  # recent seconds per row-token of a prefill call (pads included)
        self.prefixes = PrefixCache(prefix_cache) if prefix_cache else None
        self.model, self.slots, self.pad_id = model, slots, pad_id
        self.max_len = min(max_len or min(DEFAULT_CONTEXT, cfg.max_seq_len), cfg.max_seq_len)
        if self.max_len < 2:
            raise NanogemmaError(f"the context must hold at least 2 tokens, got {self.max_len}")
        self.step_tokens, self.max_queue = step_tokens, max_queue
        self.cache = SlotCache(cfg, slots, self.max_len, model.dtype, model.device, static=bool(compile))
        self.active: list[Request | None] = [None] * slots
        self.waiting: collections.deque[Request] = collections.deque()
        self.pending = torch.zeros(slots, dtype=torch.long)  # each decoding slot's last token, not yet fed
        self.stats = EngineStats()
        self._lock = threading.Condition()
        self._step_fn = self._compile(compile) if compile else self._eager_step

    # ------------------------------------------------------------------------------------------ intake
    def check(self, prompt_len: int, max_new_tokens: int) -> None:
        """Raise a NanogemmaError if a request of this size cannot be served."""
        if prompt_len < 1:
            raise NanogemmaError("the prompt is empty: nothing to continue")
        if max_new_tokens < 1:
            raise NanogemmaError(f"max_tokens must be >= 1, got {max_new_tokens}")
        if prompt_len + max_new_tokens > self.max_len:
            raise NanogemmaError(f"the prompt has {prompt_len} tokens and {max_new_tokens} new ones were asked "
                                 f"for; the context holds {self.max_len}: shorten the prompt or ask for fewer")

    def submit(self, request: Request) -> Request:
        """Queue a request (thread-safe). Raises QueueFull when `max_queue` requests already wait."""
        self.check(len(request.prompt), request.max_new_tokens)
        request.params.validate()
        with self._lock:
            if self.busy_slots + len(self.waiting) >= self.slots + self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting already; retry later")
            request.submitted = time.perf_counter()
            self.waiting.append(request)
            self.stats.requests += 1
            self._lock.notify()
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request (thread-safe); its slot is freed at the start of the next step."""
        with self._lock:
            request.cancelled = True
            self._lock.notify()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def busy_slots(self) -> int:
        return sum(r is not None for r in self.active)

    # ------------------------------------------------------------------------------------------ stepping
    @torch.inference_mode()
    def step(self) -> bool:
        """One scheduling step. Returns False when there was nothing to do."""
        with self._lock:
            for req in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(req)
                self._finish(req, "cancelled")
            for req in self.active:
                if req is not None and req.cancelled:
                    self._finish(req, "cancelled")
            for slot in range(self.slots):
                if self.active[slot] is None and self.waiting:
                    self._admit(self.waiting.popleft(), slot)
        if not any(self.active):
            return False
        t0 = time.perf_counter()
        decoding = [r for r in self.active if r is not None and r.fed == len(r.prompt)]
        self._prefill(self._budget(len(decoding)), decoding)
        self.stats.steps += 1
        self.stats.busy_seconds += time.perf_counter() - t0
        return True

    def _admit(self, req: Request, slot: int) -> None:
        self.cache.clear(slot)
        req.slot, req.fed = slot, 0
        if self.prefixes is not None:
            n, rows = self.prefixes.longest(req.prompt)
            if rows is not None:
                self.cache.restore(slot, rows, n)
                req.fed = n
                self.stats.prefix_hits += 1
                self.stats.prefix_tokens += n
        req.sampler = Sampler(req.params, 1, self.model.config.vocab_size, self.model.device)
        req.sampler.observe([req.prompt])
        self.active[slot] = req

    def _prefill(self, budget: int, decoding: list[Request]) -> None:
        """Feed the next chunk of every prompt still being prefilled, all as rows of one forward call, and
        decode the `decoding` slots: as riders in the first such call, or on their own before it.

        A burst of new prompts is thus prefilled as one batch rather than one slot after another. The
        prompts share the budget equally, so a short one is through in a step or two even beside a long
        one; but each gets at least `MIN_CHUNK` tokens (or `step_tokens` if smaller), so when many wait,
        the step grows rather than serving them a few at a time, which would let the first ones start
        decoding and slow every later step. A batch is padded to its longest chunk and the pads count
        against the budget: they cost as much as tokens. A second call runs when the first left budget
        over (chunks cut short at a block boundary, or prompts finished).
        """
        riders = decoding
        while budget > 0:
            reqs = [r for r in self.active if r is not None and r.fed < len(r.prompt)]
            if not reqs:
                break
            share = max(min(MIN_CHUNK, self.step_tokens), budget // len(reqs))
            chunks = [self._chunk(r, share) for r in reqs]
            longest = max(len(c) for c in chunks)
            if riders and not self._rides(len(riders), longest):
                self._decode(riders)
                riders = []
            self._feed(reqs, chunks, riders)
            self.stats.merged_steps += bool(riders)
            riders = []
            budget -= len(reqs) * longest
        if riders:
            self._decode(riders)

    def _budget(self, decoding: int) -> int:
        """Prompt tokens this step may feed: `step_tokens` less the decode tokens, and while slots decode, no
        more than `prefill_share` of a decode call's time at the recent cost per prompt token."""
        budget = max(self.step_tokens - decoding, 1)
        if decoding and self.prefill_share is not None and self.decode_s is not None and self.token_s:
            budget = min(budget, max(int(self.prefill_share * self.decode_s / self.token_s), 1))
        return budget

    def _rides(self, riders: int, longest: int) -> bool:
        """Whether `riders` decoding slots should join a prefill call of chunks `longest` tokens long: when
        their pads cost less than a decode call of their own (on the engine's recent timings)."""
        if self.ride != "auto":
            return self.ride == "always"
        if self.decode_s is None or self.token_s is None:
            return False
        return riders * (longest - 1) * self.token_s < self.decode_s

    def _chunk(self, req: Request, share: int) -> list[int]:
        """The request's next prompt tokens, at most `share` of them."""
        end = min(req.fed + share, len(req.prompt))
        if self.prefixes is not None:  # end the chunk on the last block boundary it reaches: a prefix to keep
            aligned = min(end, len(req.prompt) - 1) // PREFIX_BLOCK * PREFIX_BLOCK
            if aligned > req.fed:
                end = aligned
        return req.prompt[req.fed:end]

    def _feed(self, reqs: list[Request], chunks: list[list[int]], riders: Sequence[Request] = ()) -> None:
        """One forward call: row i feeds `chunks[i]` to the slot of `reqs[i]` (pads at position -1); then one
        row per rider, its pending token (a decode step in this call)."""
        t0 = time.perf_counter()
        rows, device = len(reqs) + len(riders), self.model.device
        fed = [*chunks, *([int(self.pending[r.slot])] for r in riders)]
        T = max(len(c) for c in fed)
        ids = torch.full((rows, T), self.pad_id, dtype=torch.long)
        pos = torch.full((rows, T), -1, dtype=torch.long)
        every = [*reqs, *riders]  # row i's request
        slots = [r.slot for r in every]
        for i, (slot, chunk) in enumerate(zip(slots, fed, strict=True)):
            start = self.cache.lengths[slot]
            ids[i, :len(chunk)] = torch.tensor(chunk)
            pos[i, :len(chunk)] = torch.arange(start, start + len(chunk))
        self.cache.plan_chunks(slots, [len(c) for c in fed])
        hidden = self.model.hidden(ids.to(device), pos.to(device), self.cache)
        # The head only for rows that need a token: prompts ending here and riders, at their last real token.
        done = [i for i, (r, c) in enumerate(zip(reqs, chunks, strict=True)) if r.fed + len(c) == len(r.prompt)]
        done += range(len(reqs), rows)
        heads: dict[int, tuple[Tensor, int | None]] = {}
        if done:
            last = torch.tensor([len(fed[i]) - 1 for i in done], device=device)
            out = self._head([every[i] for i in done], hidden[torch.tensor(done, device=device), last])
            heads = dict(zip(done, out, strict=True))
        for i, r in enumerate(riders, start=len(reqs)):
            self.cache.lengths[r.slot] += 1
            self._emit(r, *heads[i])
        for i, (req, chunk) in enumerate(zip(reqs, chunks, strict=True)):
            self.cache.lengths[req.slot] += len(chunk)
            req.fed += len(chunk)
            self.stats.prompt_tokens += len(chunk)
            if (self.prefixes is not None and req.fed % PREFIX_BLOCK == 0 and req.fed < len(req.prompt)
                    and req.prompt[:req.fed] not in self.prefixes):
                self.prefixes.put(req.prompt[:req.fed], self.cache.snapshot(req.slot))
            if i in heads:
                self._emit(req, *heads[i])
        self.token_s = _recent(self.token_s, (time.perf_counter() - t0) / (rows * T))

    def _decode(self, decoding: list[Request]) -> None:
        t0 = time.perf_counter()
        rows = self.slots if self.cache.static else max(r.slot for r in decoding) + 1
        pos = torch.full((rows, 1), -1, dtype=torch.long)
        for r in decoding:
            pos[r.slot, 0] = self.cache.lengths[r.slot]
        self.cache.plan_decode(rows)
        device = self.model.device
        hidden = self._step_fn(self.pending[:rows, None].to(device), pos.to(device))
        rows_used = torch.tensor([r.slot for r in decoding], device=device)
        for r, (logits, token) in zip(decoding, self._head(decoding, hidden.index_select(0, rows_used)), strict=True):
            self.cache.lengths[r.slot] += 1
            self._emit(r, logits, token)
        self.decode_s = _recent(self.decode_s, time.perf_counter() - t0)

    def _head(self, reqs: Sequence[Request], hidden: Tensor) -> list[tuple[Tensor, int | None]]:
        """Each request's logits (1, vocab) from its hidden row, and its greedy token (None if it samples).

        The head runs on at most `HEAD_ROWS` rows at a time: a 16-row block of logits (16 MiB in float32)
        is a block malloc keeps and hands back the next step (`machine.keep_freed_memory`), while one of 32
        rows or more is mapped afresh every step and its pages faulted in one by one."""
        out: list[tuple[Tensor, int | None]] = []
        for lo in range(0, len(reqs), HEAD_ROWS):
            logits = self.model.logits(hidden[lo:lo + HEAD_ROWS]).float()
            group = reqs[lo:lo + HEAD_ROWS]
            out += [(logits[i:i + 1], token) for i, token in enumerate(_greedy_tokens(group, logits))]
        return out

    def _emit(self, req: Request, logits: Tensor, token: int | None = None) -> None:
        """Sample the request's next token (unless `token` is it already); hand it over, or finish the request."""
        token = int(req.sampler(logits)) if token is None else token
        now = time.perf_counter()
        if req.first_token_at is None:
            req.first_token_at = now
        if token in req.stop_ids:
            self._finish(req, "stop")
            return
        req.tokens.append(token)
        self.stats.generated_tokens += 1
        if req.on_token is not None:
            req.on_token(req, token)
        # As in `Decoder`: the last token is never fed, so a prompt of P tokens needs P + n - 1 entries.
        if len(req.tokens) >= req.max_new_tokens or len(req.prompt) + len(req.tokens) >= self.max_len:
            self._finish(req, "length")
            return
        self.pending[req.slot] = token

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        if req.slot is not None and self.active[req.slot] is req:
            self.active[req.slot] = None
        req.slot = None
        req.finish_reason, req.error, req.finished_at = reason, error, time.perf_counter()
        req.sampler = None
        self.stats.finished[reason] += 1
        if req.on_finish is not None:
            req.on_finish(req)
        req.done.set()

    def fail_all(self, error: str) -> None:
        """End every request with an error (after an exception inside a step): the engine starts clean."""
        with self._lock:
            for req in [*self.waiting, *(r for r in self.active if r is not None)]:
                self._finish(req, "error", error)
            self.waiting.clear()

    # ------------------------------------------------------------------------------------------ running
    def run(self, stop: threading.Event, on_error: Callable[[BaseException], None] | None = None) -> None:
        """Step until `stop` is set, sleeping while there is nothing to do (the server's engine thread)."""
        while not stop.is_set():
            try:
                worked = self.step()
            except Exception as e:  # a failed step fails its requests, never the engine
                if on_error is not None:
                    on_error(e)
                self.fail_all(f"{type(e).__name__}: {e}")
                continue
            if not worked:
                with self._lock:
                    if not self.waiting and not stop.is_set():
                        self._lock.wait(timeout=0.05)

    def wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 stop_ids: set[int] | None = None) -> list[list[int]]:
        """Serve a list of prompts to the end in this thread (tests, scripts); returns each one's new tokens."""
        params = params if isinstance(params, Sequence) else [params or SamplingParams()] * len(prompts)
        reqs = [Request(list(p), max_new_tokens, q, frozenset(stop_ids or ()))
                for p, q in zip(prompts, params, strict=True)]
        saved, self.max_queue = self.max_queue, max(self.max_queue, len(reqs))
        try:
            for r in reqs:
                self.submit(r)
        finally:
            self.max_queue = saved
        while self.step():
            pass
        return [r.tokens for r in reqs]

    # ------------------------------------------------------------------------------------------ compiling
    def _eager_step(self, ids: Tensor, pos: Tensor) -> Tensor:
        return self.model.hidden(ids, pos, self.cache)[:, -1]

    def _compile(self, how: bool | str) -> Callable[[Tensor, Tensor], Tensor]:
        """The decode step compiled over all slots (static shapes); see `generation.Session._compile`."""
        from .generation import compile_options

        cuda = self.model.device.type == "cuda"
        self.cache.mark_static()
        model, cache = self.model, self.cache

        def decode_step(ids: Tensor, pos: Tensor) -> Tensor:
            return model.hidden(ids, pos, cache)[:, -1]

        compiled = torch.compile(decode_step, **compile_options(how, cuda))
        return (lambda ids, pos: compiled(ids, pos).clone()) if cuda else compiled


def _greedy_tokens(reqs: Sequence[Request], logits: Tensor) -> list[int | None]:
    """Row i's token if request i decodes greedily (no temperature, no repetition penalty), else None: one
    argmax over all such rows, not one per row (over a 262,144-entry vocabulary, the batched reduction
    takes half the time of 16 separate ones). The same first-maximum rule as `sampling.sample`."""
    rows = [i for i, r in enumerate(reqs) if r.params.temperature <= 0.0 and r.sampler.seen is None]
    tokens: list[int | None] = [None] * len(reqs)
    if rows:
        best = (logits if len(rows) == len(reqs) else logits[rows]).argmax(-1).tolist()
        for i, t in zip(rows, best, strict=True):
            tokens[i] = t
    return tokens


def _recent(average: float | None, value: float) -> float:
    """A running average that follows the last few calls (the machine's speed drifts)."""
    return value if average is None else 0.7 * average + 0.3 * value
