"""A KV cache shaped for Gemma 3: full history on global layers, a ring of W entries on sliding layers.

Why a cache: without one, every new token re-runs the model over the whole sequence (O(T²) work). With one,
each layer keeps the keys and values it has already computed and a new token only computes its own.

**Layout.** Every buffer is preallocated, so shapes never change and a compiled decode step (or a CUDA
graph) can be captured once and replayed:

    global layer  k, v: (B, n_kv_heads, max_len, head_dim)   slot = column
    sliding layer k, v: (B, n_kv_heads, W, head_dim)         slot = column % W   (a ring buffer)
    both          pos:  (B, slots) absolute position held by each slot, -1 for an empty slot

A *column* counts tokens fed to the cache (shared by all rows of a batch); a *position* is what RoPE and
the masks use, per row. They differ only in a batch: prompts of different lengths are left-padded so
that they all end at the same column, and a row with p pads holds position c - p at column c (pads get
negative positions). Masks are built from the stored positions by `causal_mask`, which never lets a
real query see a negative (pad or empty) key — so a padded row computes exactly what it would alone.

**Why a ring is enough.** A sliding query at position i sees keys i-W < j <= i: the last W columns, which
are exactly what a W-slot ring holds after the new key is written. The peers' bug — fluent text for about a
thousand tokens, then gibberish — comes from getting this bookkeeping wrong once the ring wraps (stale slots
attended, or the window applied to slot indices instead of positions). Here the mask compares absolute
positions, so a wrapped ring needs no special case: slot order is irrelevant to attention.

**Chunked prefill.** A chunk of T > 1 tokens cannot be written into the ring before attention: its first
queries still need keys that its last tokens would overwrite. So a sliding layer attends to the ring's old
contents concatenated with the chunk's own keys (W + T keys, masked by position), then keeps the chunk's last
min(T, W) keys. Prompts longer than W therefore work in any chunk size, and memory stays O(W).

**Decode.** For T == 1 the slot index comes from `KVCache.col`, a tensor, so a compiled step reads the
current column without recompiling. In `static` mode global layers attend over all max_len slots (fixed
shapes for torch.compile / CUDA graphs, empty slots masked); otherwise over the filled prefix only, which is
what eager CPU decoding wants.

**Taking tokens back** (speculative decoding's rejected drafts, `KVCache.rollback`). A decode step on a
sliding layer overwrites the oldest key of the ring; with `spare = n` the cache first copies that entry into
a small undo log of n entries, so the last n decode steps can be undone exactly (a chunk of at most n
tokens logs its entries the same way: prompt-lookup decoding checks its drafts in one such chunk). The ring itself keeps W
slots whatever `spare` is: with extra ring slots instead, the same keys would sit in other slots after the
first wrap, attention would sum them in another order, and a speculative run would part from plain decoding
in the last bits of float32 (and, through int8's rounding of activations, in whole tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import GLOBAL, GemmaConfig
from .errors import NanogemmaError


def causal_mask(q_pos: Tensor, k_pos: Tensor, window: int | None) -> Tensor:
    """Boolean (B, 1, Tq, Tk) mask, True = may attend: causal, and within `window` keys if given.

    Positions are absolute, so the same rule serves full sequences, chunks and cache layouts. A negative
    key position marks an empty cache slot and is never attended.
    """
    q = q_pos[:, None, :, None]
    k = k_pos[:, None, None, :] if k_pos.dim() == 2 else k_pos[None, None, None, :]
    allowed = (k <= q) & (k >= 0)
    if window is not None:
        allowed &= k > q - window  # i - W < j <= i: the query itself plus W - 1 earlier keys
    return allowed


def attention_mask(q_pos: Tensor, k_pos: Tensor, window: int | None) -> Tensor:
    """`causal_mask`, plus: a pad query (negative position) may attend to every slot.

    A pad's output is never used, but a row of the mask with nothing allowed makes attention return NaN,
    and a NaN in a pad's hidden state would reach its stored values and poison real rows (0 * NaN = NaN).
    Letting pads see everything keeps them finite.
    """
    return causal_mask(q_pos, k_pos, window) | (q_pos < 0)[:, None, :, None]


class _Cursor:
    """Columns written so far, shared by all layers: a Python int for eager slicing, a tensor for compiled steps."""

    def __init__(self, device: torch.device):
        self.length = 0
        self.col = torch.zeros(1, dtype=torch.long, device=device)
        # Eager decoding: every sliding layer (and every global one) holds the same positions, so one mask
        # per layer type serves the whole step. Cleared when the cursor advances.
        self.masks: dict[int | None, Tensor] = {}
        self.undoable = 0  # trailing columns whose overwritten ring entries are in the undo logs


class LayerCache(nn.Module):
    """Keys/values of one layer. `window=None`: a global layer (slot = column); else a W-slot ring."""

    def __init__(self, cursor: _Cursor, batch: int, kv_heads: int, head_dim: int, slots: int,
                 window: int | None, static: bool, dtype: torch.dtype, device: torch.device, spare: int = 0):
        super().__init__()
        self.cursor, self.window, self.static, self.slots = cursor, window, static, slots
        self.register_buffer("k", torch.zeros(batch, kv_heads, slots, head_dim, dtype=dtype, device=device))
        self.register_buffer("v", torch.zeros(batch, kv_heads, slots, head_dim, dtype=dtype, device=device))
        self.register_buffer("pos", torch.full((batch, slots), -1, dtype=torch.long, device=device))
        # The undo log (sliding layers only: a global layer's slot is its column, nothing is overwritten).
        self.spare = spare if window is not None else 0
        if self.spare:
            self.register_buffer("old_k", torch.zeros(batch, kv_heads, self.spare, head_dim, dtype=dtype, device=device))
            self.register_buffer("old_v", torch.zeros(batch, kv_heads, self.spare, head_dim, dtype=dtype, device=device))
            self.register_buffer("old_pos", torch.full((batch, self.spare), -1, dtype=torch.long, device=device))

    def reset(self) -> None:
        self.pos.fill_(-1)  # an empty slot is one with a negative position; stale k/v are then never seen

    def update(self, pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Store the new keys/values (B, H, T, D) at absolute positions `pos` (B, T); return what to attend to."""
        if k.shape[2] == 1:
            return self._decode(pos, k, v)
        return self._chunk(pos, k, v)

    def _decode(self, pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        col = self.cursor.col
        slot = col if self.window is None else col % self.slots
        if self.spare:  # keep what this step overwrites, so that `undo` can put it back
            entry = col % self.spare
            self.old_k.index_copy_(2, entry, self.k.index_select(2, slot))
            self.old_v.index_copy_(2, entry, self.v.index_select(2, slot))
            self.old_pos.index_copy_(1, entry, self.pos.index_select(1, slot))
        self.k.index_copy_(2, slot, k)
        self.v.index_copy_(2, slot, v)
        self.pos.index_copy_(1, slot, pos)
        if self.window is None and not self.static:
            n = self.cursor.length + 1  # eager: only the filled prefix, so cost grows with the text, not max_len
            keys, values, kpos = self.k[:, :, :n], self.v[:, :, :n], self.pos[:, :n]
        else:
            keys, values, kpos = self.k, self.v, self.pos
        if self.static:  # compiled: no Python-side state inside the graph
            return keys, values, attention_mask(pos, kpos, self.window)
        mask = self.cursor.masks.get(self.window)
        if mask is None:
            mask = self.cursor.masks[self.window] = attention_mask(pos, kpos, self.window)
        return keys, values, mask

    def undo(self, cols: Tensor) -> None:
        """Forget the decode steps at columns `cols` (the latest ones, newest first, each logged by `_decode`)."""
        if self.window is None:
            self.pos.index_fill_(1, cols, -1)
            return
        # Newest first, one column at a time when two of them share a ring slot (more columns than W):
        # the older column's log then holds the entry that was there before both.
        groups = [cols] if len(cols) <= self.slots else list(cols.split(1))
        for group in groups:
            slots, entries = group % self.slots, group % self.spare
            self.k.index_copy_(2, slots, self.old_k.index_select(2, entries))
            self.v.index_copy_(2, slots, self.old_v.index_select(2, entries))
            self.pos.index_copy_(1, slots, self.old_pos.index_select(1, entries))

    def _chunk(self, pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        start, T = self.cursor.length, k.shape[2]
        if self.window is None:
            end = start + T
            self.k[:, :, start:end], self.v[:, :, start:end], self.pos[:, start:end] = k, v, pos
            return self.k[:, :, :end], self.v[:, :, :end], attention_mask(pos, self.pos[:, :end], None)
        # Sliding: attend to [old ring | chunk] before overwriting, then keep the chunk's last min(T, W) keys.
        keys, values = torch.cat((self.k, k), dim=2), torch.cat((self.v, v), dim=2)
        # Ring slots at or after the chunk's first position are stale (a step interrupted before the cursor
        # advanced wrote them): hide them, as the new chunk replaces them.
        ring_pos = torch.where(self.pos < pos[:, :1], self.pos, -1)
        mask = attention_mask(pos, torch.cat((ring_pos, pos), dim=1), self.window)
        keep = min(T, self.slots)
        slots = torch.arange(start + T - keep, start + T, device=k.device) % self.slots
        if self.spare and T <= min(self.spare, self.slots):  # a short chunk can be taken back, as decode steps can
            entries = torch.arange(start, start + T, device=k.device) % self.spare
            self.old_k.index_copy_(2, entries, self.k.index_select(2, slots))
            self.old_v.index_copy_(2, entries, self.v.index_select(2, slots))
            self.old_pos.index_copy_(1, entries, self.pos.index_select(1, slots))
        self.k.index_copy_(2, slots, k[:, :, T - keep:])
        self.v.index_copy_(2, slots, v[:, :, T - keep:])
        self.pos.index_copy_(1, slots, pos[:, T - keep:])
        return keys, values, mask


class KVCache(nn.Module):
    """Per-layer caches for `batch` rows and up to `max_len` columns; pass as `model(ids, pos, cache=...)`.

    After each forward call the caller advances the cursor by the number of columns fed (`advance`):
    keeping that outside the model lets a compiled decode step stay free of Python-side state.
    """

    def __init__(self, cfg: GemmaConfig, batch: int, max_len: int, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", static: bool = False, spare: int = 0):
        super().__init__()
        device = torch.device(device)
        self.batch, self.max_len, self.static = batch, max_len, static
        self.cursor = _Cursor(device)
        # `spare`: how many of the latest decode steps can be taken back (`rollback`); see the undo log above.
        self.layers = nn.ModuleList(
            LayerCache(self.cursor, batch, cfg.num_kv_heads, cfg.head_dim,
                       max_len if t == GLOBAL else min(cfg.sliding_window, max_len),
                       None if t == GLOBAL else cfg.sliding_window, static, dtype, device, spare)
            for t in cfg.layer_types
        )
        self.spare = spare
        # the longest chunk that logs what it overwrites (`LayerCache._chunk`), so that `rollback` can undo it
        self._logged_chunk = min([spare] + [layer.slots for layer in self.layers if layer.window is not None])

    @property
    def length(self) -> int:
        """Columns fed so far (pads included)."""
        return self.cursor.length

    @property
    def col(self) -> Tensor:
        return self.cursor.col

    def room(self) -> int:
        return self.max_len - self.cursor.length

    def check_room(self, n: int) -> None:
        if n > self.room():
            raise NanogemmaError(f"the KV cache holds {self.max_len} tokens and {self.length} are used: "
                                 f"{n} more do not fit; start a new session (or allow a longer context)")

    def advance(self, n: int) -> None:
        # A decode step logs what it overwrites, and so does a chunk of at most `spare` columns (and no
        # more than a ring holds); a longer chunk logs nothing, so what came before it can no longer be
        # taken back.
        self.cursor.undoable = min(self.spare, self.cursor.undoable + n) if n <= self._logged_chunk else 0
        self.cursor.length += n
        self.cursor.col.add_(n)
        self.cursor.masks.clear()

    @torch.inference_mode()
    def rollback(self, n: int) -> None:
        """Forget the last `n` columns fed (decode steps, or short chunks), as if they had never been fed (speculative decoding's rejected
        drafts): the cache is then exactly what it was before them."""
        if n > self.cursor.undoable:
            raise NanogemmaError(f"cannot take back {n} columns: the cache keeps {self.spare} spare slots "
                                 f"and the last {self.cursor.undoable} columns can be undone")
        if n == 0:
            return
        cols = torch.arange(self.length - n, self.length, device=self.cursor.col.device)
        for layer in self.layers:
            layer.undo(cols.flip(0))
        self.cursor.undoable -= n
        self.cursor.length -= n
        self.cursor.col.sub_(n)
        self.cursor.masks.clear()

    @torch.inference_mode()  # buffers made or written in inference mode may only be written there
    def reset(self) -> None:
        self.cursor.length = 0
        self.cursor.undoable = 0
        self.cursor.col.zero_()
        self.cursor.masks.clear()
        for layer in self.layers:
            layer.reset()

    def mark_static(self) -> None:
        """Tell torch.compile the buffers keep their addresses (so CUDA graphs can mutate them in place)."""
        import torch._dynamo

        for layer in self.layers:
            for buf in layer.buffers():
                torch._dynamo.mark_static_address(buf)
        torch._dynamo.mark_static_address(self.cursor.col)


@dataclass
class CacheSize:
    """Bytes of keys and values (positions excluded) for one sequence at a given context length."""

    length: int
    ours: int  # global layers full length, sliding layers W
    full: int  # every layer full length, as a cache that ignores the windows would be


def cache_size(cfg: GemmaConfig, length: int | None = None, dtype: torch.dtype = torch.float32) -> CacheSize:
    """What the cache costs at `length` tokens (default: the model's whole context), against a naive full cache."""
    length = cfg.max_seq_len if length is None else length
    per_slot = 2 * cfg.num_kv_heads * cfg.head_dim * torch.empty((), dtype=dtype).element_size()
    slots = sum(length if t == GLOBAL else min(cfg.sliding_window, length) for t in cfg.layer_types)
    return CacheSize(length, per_slot * slots, per_slot * length * cfg.num_layers)
