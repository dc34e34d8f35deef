"""Continuous batching: many requests share one model, each in its own slot of one KV cache.

The engine knows nothing of text: token ids in, token ids out (the server, `server.py`, does the rest).

**Why not `generation.Session`.** A session's batch shares one column counter: prompts are left-padded so
that every row ends at the same column, and the batch starts and ends together. A server cannot wait for
the batch to finish before it takes the next request, so here every slot (a row of the cache) keeps its
*own* position counter:

    global layer  k, v: (slots, kv_heads, max_len, head_dim)   entry = the slot's position
    sliding layer k, v: (slots, kv_heads, W, head_dim)         entry = position % W  (a ring per slot)
    both          pos:  (slots, entries) position held by each entry, -1 for an empty one

Masks are built from the stored positions (`cache.attention_mask`), exactly as in `cache.py`, so a slot's
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
   gaps (each prompt still gets `MIN_CHUNK` tokens a step, so a burst is not served a few at a time). A
   prompt's last chunk gives its first token;
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
from torch import Tensor, nn

from .cache import attention_mask
from .config import GLOBAL, GemmaConfig
from .decoding import SamplingParams
from .errors import NanogemmaError
from .model import Gemma
from .sampling import Sampler

DEFAULT_SLOTS = 8
DEFAULT_STEP_TOKENS = 256
DEFAULT_CONTEXT = 8192
PREFIX_BLOCK = 64  # prefix reuse works in whole blocks of this many prompt tokens
MIN_CHUNK = 16  # prompt tokens a step gives each prompt being prefilled, at least
DEFAULT_PREFIX_CACHE = 8  # prefixes `nanogemma serve` keeps


def check_settings(slots: int, step_tokens: int, max_queue: int, prefix_cache: int) -> None:
    """Refuse engine settings that cannot work (the server checks them before it loads the model)."""
    for name, value, least in (("--slots", slots, 1), ("--step-tokens", step_tokens, 1),
                               ("--max-queue", max_queue, 0), ("--prefix-cache", prefix_cache, 0)):
        if value < least:
            raise NanogemmaError(f"{name} must be >= {least}, got {value}")


class QueueFull(NanogemmaError):
    """The waiting queue is at its limit: the caller should retry later (HTTP 429)."""


# ------------------------------------------------------------------------------------------ the cache


class _Plan:
    """What the next forward call feeds, shared by every layer: a decode step or a batch of prefill chunks."""

    def __init__(self, slots: int, device: torch.device):
        # Prefill: row i of the batch is a chunk of `chunks[i] = (slot, start, n)`: n tokens from position
        # `start`, right-padded to the batch's common length with pads at position -1. None: a decode step.
        self.chunks: list[tuple[int, int, int]] | None = None
        self.sel = torch.zeros(0, dtype=torch.long, device=device)  # the chunks' slots, as an index
        self.rows = slots  # a decode step covers slots 0..rows-1
        self.keys: int | None = None  # eager decode: attend to the first `keys` entries of global layers
        self.write = torch.zeros(slots, dtype=torch.long, device=device)  # each slot's next position
        self.masks: dict[int | None, Tensor] = {}  # one mask per layer type per eager call


class SlotLayerCache(nn.Module):
    """Keys/values of one layer for every slot: `window=None` a global layer, else a W-entry ring per slot."""

    def __init__(self, plan: _Plan, slots: int, kv_heads: int, head_dim: int, entries: int,
                 window: int | None, static: bool, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.plan, self.window, self.static, self.entries = plan, window, static, entries
        self.register_buffer("k", torch.zeros(slots, kv_heads, entries, head_dim, dtype=dtype, device=device))
        self.register_buffer("v", torch.zeros(slots, kv_heads, entries, head_dim, dtype=dtype, device=device))
        self.register_buffer("pos", torch.full((slots, entries), -1, dtype=torch.long, device=device))

    def update(self, pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self._decode(pos, k, v) if self.plan.chunks is None else self._chunks(pos, k, v)

    def _decode(self, pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, (_, H, _, D) = self.plan.rows, k.shape
        entry = self.plan.write[:b] if self.window is None else self.plan.write[:b] % self.entries
        self.k[:b].scatter_(2, entry.view(b, 1, 1, 1).expand(b, H, 1, D), k)
        self.v[:b].scatter_(2, entry.view(b, 1, 1, 1).expand(b, H, 1, D), v)
        self.pos[:b].scatter_(1, entry.view(b, 1), pos)
        n = self.plan.keys if self.window is None and not self.static else None
        keys, values, kpos = (self.k[:b], self.v[:b], self.pos[:b]) if n is None else \
            (self.k[:b, :, :n], self.v[:b, :, :n], self.pos[:b, :n])
        if self.static:  # compiled: no Python-side state inside the graph
            return keys, values, attention_mask(pos, kpos, self.window)
        mask = self.plan.masks.get(self.window)
        if mask is None:  # every layer of a type holds the same positions: one mask serves them all
            mask = self.plan.masks[self.window] = attention_mask(pos, kpos, self.window)
        return keys, values, mask

    def _chunks(self, pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Prefill: row i holds a chunk of slot `sel[i]`. Each row attends to its own slot's entries and to
        its own chunk; only a chunk's real tokens are stored (its pads, at position -1, never are)."""
        plan, sel = self.plan, self.plan.sel
        if self.window is None:
            for i, (slot, start, n) in enumerate(plan.chunks):
                self.k[slot, :, start:start + n] = k[i, :, :n]
                self.v[slot, :, start:start + n] = v[i, :, :n]
                self.pos[slot, start:start + n] = pos[i, :n]
            # Every row sees the first `end` entries of its slot, as many as the longest history needs: a
            # shorter history's extra entries are empty (position -1), so the mask hides them.
            end = max(start + n for _, start, n in plan.chunks)
            keys, values, kpos = self.k[sel, :, :end], self.v[sel, :, :end], self.pos[sel, :end]
            mask = plan.masks.get(None)
            if mask is None:  # every global layer holds the same positions: one mask serves them all
                mask = plan.masks[None] = attention_mask(pos, kpos, None)
            return keys, values, mask
        # As in cache.py: attend to [old ring | chunk] before overwriting, then keep each chunk's last keys.
        keys, values = torch.cat((self.k[sel], k), dim=2), torch.cat((self.v[sel], v), dim=2)
        mask = plan.masks.get(self.window)
        if mask is None:
            ring_pos = self.pos[sel]
            ring_pos = torch.where(ring_pos < pos[:, :1], ring_pos, -1)  # entries at or past the chunk are stale
            mask = plan.masks[self.window] = attention_mask(pos, torch.cat((ring_pos, pos), dim=1), self.window)
        for i, (slot, start, n) in enumerate(plan.chunks):
            keep = min(n, self.entries)
            entries = torch.arange(start + n - keep, start + n, device=k.device) % self.entries
            self.k[slot].index_copy_(1, entries, k[i, :, n - keep:n])
            self.v[slot].index_copy_(1, entries, v[i, :, n - keep:n])
            self.pos[slot].index_copy_(0, entries, pos[i, n - keep:n])
        return keys, values, mask


class SlotCache(nn.Module):
    """Per-layer caches for `slots` independent sequences of up to `max_len` tokens each."""

    def __init__(self, cfg: GemmaConfig, slots: int, max_len: int, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", static: bool = False):
        super().__init__()
        device = torch.device(device)
        self.slots, self.max_len, self.static = slots, max_len, static
        self.plan = _Plan(slots, device)
        self.layers = nn.ModuleList(
            SlotLayerCache(self.plan, slots, cfg.num_kv_heads, cfg.head_dim,
                           max_len if t == GLOBAL else min(cfg.sliding_window, max_len),
                           None if t == GLOBAL else cfg.sliding_window, static, dtype, device)
            for t in cfg.layer_types
        )
        self.lengths = [0] * slots  # tokens fed to each slot

    @torch.inference_mode()
    def clear(self, slot: int) -> None:
        """Empty one slot (its stale keys are then never seen: an empty entry has a negative position)."""
        for layer in self.layers:
            layer.pos[slot].fill_(-1)
        self.lengths[slot] = 0

    @torch.inference_mode()
    def snapshot(self, slot: int) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Copies of one slot's filled entries, layer by layer (a ring that has not wrapped yet holds
        positions 0..n-1 in entries 0..n-1, like a global layer; a wrapped one is copied whole)."""
        n = self.lengths[slot]
        return [(layer.k[slot, :, :n].clone(), layer.v[slot, :, :n].clone(), layer.pos[slot, :n].clone())
                for layer in self.layers]

    @torch.inference_mode()
    def restore(self, slot: int, rows: list[tuple[Tensor, Tensor, Tensor]], length: int) -> None:
        """Give `slot` the entries of a snapshot taken after `length` tokens."""
        self.clear(slot)
        for layer, (k, v, pos) in zip(self.layers, rows, strict=True):
            n = pos.shape[0]
            layer.k[slot, :, :n], layer.v[slot, :, :n], layer.pos[slot, :n] = k, v, pos
        self.lengths[slot] = length

    def plan_chunks(self, slots: Sequence[int], lengths: Sequence[int]) -> None:
        """The next call feeds `lengths[i]` tokens to `slots[i]`, row i of a batch padded to the longest."""
        plan = self.plan
        plan.chunks = [(s, self.lengths[s], n) for s, n in zip(slots, lengths, strict=True)]
        plan.sel = torch.tensor(list(slots), dtype=torch.long, device=plan.write.device)
        plan.masks = {}

    def plan_decode(self, rows: int) -> None:
        plan = self.plan
        plan.chunks, plan.rows, plan.masks = None, rows, {}
        plan.write.copy_(torch.tensor(self.lengths, device=plan.write.device))
        plan.keys = min(max(self.lengths[:rows]) + 1, self.max_len)

    def mark_static(self) -> None:
        """Tell torch.compile the buffers keep their addresses (so CUDA graphs can mutate them in place)."""
        import torch._dynamo

        for layer in self.layers:
            for buf in (layer.k, layer.v, layer.pos):
                torch._dynamo.mark_static_address(buf)
        torch._dynamo.mark_static_address(self.plan.write)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())


class PrefixCache:
    """Snapshots of a slot's cache after a prompt's first k * PREFIX_BLOCK tokens, at most `capacity`.

    Most stored prefixes are never asked for again (each prompt's own tail); a shared one (a system prompt)
    is asked for by every request that begins with it. Plain least-recently-used would let a burst of new
    prompts' tails push the shared one out before the next request comes, so eviction is segmented: a
    prefix that has served a request moves to a protected part (at most half the capacity, its own least
    recently used sent back when full), and new prefixes, still unproven, are evicted first.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.probation: collections.OrderedDict[tuple[int, ...], list] = collections.OrderedDict()
        self.protected: collections.OrderedDict[tuple[int, ...], list] = collections.OrderedDict()

    @property
    def entries(self) -> dict[tuple[int, ...], list]:
        return {**self.probation, **self.protected}

    def longest(self, prompt: Sequence[int]) -> tuple[int, list | None]:
        """The longest stored prefix of `prompt` that leaves at least one token to feed (for the logits)."""
        for n in range(((len(prompt) - 1) // PREFIX_BLOCK) * PREFIX_BLOCK, 0, -PREFIX_BLOCK):
            key = tuple(prompt[:n])
            rows = self.protected.get(key)
            if rows is not None:
                self.protected.move_to_end(key)
            elif (rows := self.probation.pop(key, None)) is not None:
                self.protected[key] = rows
                if len(self.protected) > self.capacity // 2:
                    old, old_rows = self.protected.popitem(last=False)
                    self.probation[old] = old_rows
            if rows is not None:
                return n, rows
        return 0, None

    def put(self, prefix: Sequence[int], rows: list) -> None:
        self.probation[tuple(prefix)] = rows
        while len(self.probation) + len(self.protected) > self.capacity:
            (self.probation or self.protected).popitem(last=False)

    def __contains__(self, prefix: Sequence[int]) -> bool:
        return tuple(prefix) in self.probation or tuple(prefix) in self.protected


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


# ------------------------------------------------------------------------------------------ the engine


class Engine:
    """A model serving up to `slots` requests at once; `submit` from any thread, `run` in one thread.

    `max_len` is each slot's context (prompt plus new tokens), `step_tokens` the tokens one step may feed
    (decode and prefill together), `max_queue` how many requests may wait for a slot, `prefix_cache` how many
    prompt prefixes to keep for reuse (0: none).
    """

    def __init__(self, model: Gemma, slots: int = DEFAULT_SLOTS, max_len: int | None = None,
                 step_tokens: int = DEFAULT_STEP_TOKENS, max_queue: int = 64, compile: bool | str = False,
                 pad_id: int = 0, prefix_cache: int = 0):
        cfg = model.config
        check_settings(slots, step_tokens, max_queue, prefix_cache)
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
        if decoding:
            self._decode(decoding)
        self._prefill(max(self.step_tokens - len(decoding), 1))
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

    def _prefill(self, budget: int) -> None:
        """Feed the next chunk of every prompt still being prefilled, all as rows of one forward call.

        A burst of new prompts is thus prefilled as one batch rather than one slot after another. The
        prompts share the budget equally, so a short one is through in a step or two even beside a long
        one; but each gets at least `MIN_CHUNK` tokens (or `step_tokens` if smaller), so when many wait,
        the step grows rather than serving them a few at a time, which would let the first ones start
        decoding and slow every later step. A batch is padded to its longest chunk and the pads count
        against the budget: they cost as much as tokens. A second call runs when the first left budget
        over (chunks cut short at a block boundary, or prompts finished).
        """
        while budget > 0:
            reqs = [r for r in self.active if r is not None and r.fed < len(r.prompt)]
            if not reqs:
                return
            share = max(min(MIN_CHUNK, self.step_tokens), budget // len(reqs))
            chunks = [self._chunk(r, share) for r in reqs]
            self._feed(reqs, chunks)
            budget -= len(reqs) * max(len(c) for c in chunks)

    def _chunk(self, req: Request, share: int) -> list[int]:
        """The request's next prompt tokens, at most `share` of them."""
        end = min(req.fed + share, len(req.prompt))
        if self.prefixes is not None:  # end the chunk on the last block boundary it reaches: a prefix to keep
            aligned = min(end, len(req.prompt) - 1) // PREFIX_BLOCK * PREFIX_BLOCK
            if aligned > req.fed:
                end = aligned
        return req.prompt[req.fed:end]

    def _feed(self, reqs: list[Request], chunks: list[list[int]]) -> None:
        """One forward call: row i feeds `chunks[i]` to the slot of `reqs[i]` (pads at position -1)."""
        T, device = max(len(c) for c in chunks), self.model.device
        ids = torch.full((len(reqs), T), self.pad_id, dtype=torch.long)
        pos = torch.full((len(reqs), T), -1, dtype=torch.long)
        for i, (req, chunk) in enumerate(zip(reqs, chunks, strict=True)):
            start = self.cache.lengths[req.slot]
            ids[i, :len(chunk)] = torch.tensor(chunk)
            pos[i, :len(chunk)] = torch.arange(start, start + len(chunk))
        self.cache.plan_chunks([r.slot for r in reqs], [len(c) for c in chunks])
        hidden = self.model.hidden(ids.to(device), pos.to(device), self.cache)
        done = [i for i, (r, c) in enumerate(zip(reqs, chunks, strict=True)) if r.fed + len(c) == len(r.prompt)]
        logits: dict[int, Tensor] = {}
        if done:  # the head only for rows whose prompt ends here, at each one's last real token
            last = torch.tensor([len(chunks[i]) - 1 for i in done], device=device)
            logits = dict(zip(done, self.model.logits(hidden[torch.tensor(done, device=device), last]).float(),
                              strict=True))
        for i, (req, chunk) in enumerate(zip(reqs, chunks, strict=True)):
            self.cache.lengths[req.slot] += len(chunk)
            req.fed += len(chunk)
            self.stats.prompt_tokens += len(chunk)
            if (self.prefixes is not None and req.fed % PREFIX_BLOCK == 0 and req.fed < len(req.prompt)
                    and req.prompt[:req.fed] not in self.prefixes):
                self.prefixes.put(req.prompt[:req.fed], self.cache.snapshot(req.slot))
            if i in logits:
                self._emit(req, logits[i][None])

    def _decode(self, decoding: list[Request]) -> None:
        rows = self.slots if self.cache.static else max(r.slot for r in decoding) + 1
        pos = torch.full((rows, 1), -1, dtype=torch.long)
        for r in decoding:
            pos[r.slot, 0] = self.cache.lengths[r.slot]
        self.cache.plan_decode(rows)
        device = self.model.device
        hidden = self._step_fn(self.pending[:rows, None].to(device), pos.to(device))
        rows_used = torch.tensor([r.slot for r in decoding], device=device)
        logits = self.model.logits(hidden.index_select(0, rows_used)).float()
        for i, r in enumerate(decoding):
            self.cache.lengths[r.slot] += 1
            self._emit(r, logits[i:i + 1])

    def _emit(self, req: Request, logits: Tensor) -> None:
        """Sample the request's next token; hand it over, or finish the request."""
        token = int(req.sampler(logits))
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
