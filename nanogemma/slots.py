"""The engine's KV cache: one row per slot, each slot with its own positions; and the prefixes kept aside.

`cache.py` holds one batch whose rows share a column counter. A server's requests start and end at
different times, so here every slot (a row of the cache) keeps its *own* position counter:

    global layer  k, v: (slots, kv_heads, max_len, head_dim)   entry = the slot's position
    sliding layer k, v: (slots, kv_heads, W, head_dim)         entry = position % W  (a ring per slot)
    both          pos:  (slots, entries) position held by each entry, -1 for an empty one

Masks are built from the stored positions (`cache.attention_mask`), exactly as in `cache.py`, so a slot's
attention sees its own history and nothing else, whatever the other slots hold.

A forward call is either a decode step over slots 0..rows-1 (one token each) or a batch of prefill chunks,
row i one slot's next chunk, right-padded with pads at position -1 (never stored, never attended). The
engine says which before the call (`SlotCache.plan_decode`, `SlotCache.plan_chunks`); every layer reads
the same `_Plan`, and in eager calls every layer of a type shares one mask.

`snapshot` / `restore` copy a slot's filled entries aside and back, bit for bit: `PrefixCache` keeps such
copies keyed by a prompt's first k * `PREFIX_BLOCK` tokens, so a request that begins the same way (a
system prompt) starts from them (the engine, `engine.py`, decides when).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .cache import attention_mask
from .config import GLOBAL, GemmaConfig

PREFIX_BLOCK = 64  # prefix reuse works in whole blocks of this many prompt tokens


class _Plan:
    """What the next forward call feeds, shared by every layer: a decode step or a batch of prefill chunks."""

    def __init__(self, slots: int, device: torch.device):
        # Prefill: row i of the batch is a chunk of `chunks[i] = (slot, start, n)`: n tokens from position
        # `start`, right-padded to the batch's common length with pads at position -1. None: a decode step.
        self.chunks: list[tuple[int, int, int]] | None = None
        self.sel = torch.zeros(0, dtype=torch.long, device=device)  # the chunks' slots, as an index
        self.rows = slots  # a decode step covers slots 0..rows-1
        self.keys: int | None = None  # eager decode: attend to the first `keys` entries (see `_decode`)
        self.write = torch.zeros(slots, dtype=torch.long, device=device)  # each slot's next position
        self.row_ids = torch.arange(slots, device=device)  # the decode step's rows: slots 0..rows-1
        self.masks: dict[int | None, Tensor] = {}  # one mask per layer type per eager call
        self.stores: dict[int | None, tuple[Tensor, Tensor, Tensor, Tensor]] = {}  # see `to_store`

    def to_store(self, ring: int | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(row, token, slot, entry): where each chunk token a layer keeps comes from and goes, as index
        tensors made once per call for each kind of layer, so a layer stores a whole batch in one indexed
        write per buffer (a write per row cost a few Python-side operations per row, in every layer).

        A global layer (`ring=None`) keeps every real token at entry = its position; a ring of `ring`
        entries keeps each chunk's last `ring` tokens at entry = position % ring (no two of them collide)."""
        hit = self.stores.get(ring)
        if hit is None:
            rows: list[int] = []
            tokens: list[int] = []
            slots: list[int] = []
            entries: list[int] = []
            for i, (slot, start, n) in enumerate(self.chunks):
                first = 0 if ring is None else max(0, n - ring)
                rows += [i] * (n - first)
                tokens += range(first, n)
                slots += [slot] * (n - first)
                entries += (range(start + first, start + n) if ring is None else
                            [(start + j) % ring for j in range(first, n)])
            hit = self.stores[ring] = tuple(torch.tensor(x, dtype=torch.long, device=self.write.device)
                                            for x in (rows, tokens, slots, entries))
        return hit


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
        b = self.plan.rows
        entry = self.plan.write[:b] if self.window is None else self.plan.write[:b] % self.entries
        # Indexed writes of one entry per row: `scatter_` on these slices copied each layer's whole
        # (rows, H, context, D) cache per step, a cost that grew with the context, not with the tokens.
        rows = self.plan.row_ids[:b]
        self.k[rows, :, entry] = k[:, :, 0]
        self.v[rows, :, entry] = v[:, :, 0]
        self.pos[rows, entry] = pos[:, 0]
        # Eager calls attend to the first `keys` entries only: every position held is below it, on a ring
        # too until some slot wraps (entry = position % W), so the entries past it are empty in every row.
        n = None if self.static else min(self.plan.keys, self.entries)
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
            self._store(pos, k, v, None)
            # Every row sees the first `end` entries of its slot, as many as the longest history needs: a
            # shorter history's extra entries are empty (position -1), so the mask hides them.
            end = max(start + n for _, start, n in plan.chunks)
            keys, values, kpos = self.k[sel, :, :end], self.v[sel, :, :end], self.pos[sel, :end]
            mask = plan.masks.get(None)
            if mask is None:  # every global layer holds the same positions: one mask serves them all
                mask = plan.masks[None] = attention_mask(pos, kpos, None)
            return keys, values, mask
        # As in cache.py: attend to [old ring | chunk] before overwriting, then keep each chunk's last keys.
        # Only the ring's first `held` entries can be filled (all of them once a slot has wrapped): a burst
        # of new prompts then gathers and attends to their short histories, not to W empty entries each.
        held = min(self.entries, max(start for _, start, _ in plan.chunks))
        keys = torch.cat((self.k[sel, :, :held], k), dim=2)
        values = torch.cat((self.v[sel, :, :held], v), dim=2)
        mask = plan.masks.get(self.window)
        if mask is None:
            ring_pos = self.pos[sel, :held]
            ring_pos = torch.where(ring_pos < pos[:, :1], ring_pos, -1)  # entries at or past the chunk are stale
            mask = plan.masks[self.window] = attention_mask(pos, torch.cat((ring_pos, pos), dim=1), self.window)
        self._store(pos, k, v, self.entries)
        return keys, values, mask

    def _store(self, pos: Tensor, k: Tensor, v: Tensor, ring: int | None) -> None:
        """Keep the batch's chunk tokens in their slots' entries (`_Plan.to_store` says which go where)."""
        row, token, slot, entry = self.plan.to_store(ring)
        self.k[slot, :, entry] = k[row, :, token]
        self.v[slot, :, entry] = v[row, :, token]
        self.pos[slot, entry] = pos[row, token]


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
        plan.masks, plan.stores = {}, {}

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
