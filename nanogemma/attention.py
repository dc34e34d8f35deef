"""Attention over a whole sequence (training, evaluation, any forward without a KV cache), without a T×T mask.

The model's rule (model.py) is: a query attends to earlier keys of its own document, and on sliding layers
only to the last W of them. A dense boolean mask states that rule in O(T²) memory per layer type, and
the sliding layers then compute T² scores of which all but T·W are thrown away. Here the rule is applied
by *which keys each block of queries is given*, so the masks are small and the work is what the rule needs:

* **Global layers, one document per row** (plain pretraining windows): the causal kernel itself,
  `scaled_dot_product_attention(is_causal=True)`; no mask at all.
* **Blocks of queries** otherwise. Queries are cut into blocks of C; block [s, e) attends to keys
  [lo, e), where lo is the first key any of its queries may see — s − W + 1 on sliding layers, the start
  of the earliest document in the block when documents are packed. The block's mask (C × (e − lo)) adds
  what the key range cannot say: causality inside the block, the window edge, document boundaries.
  Memory is O(T·(C + W)) on sliding layers and O(T·(C + document length)) on packed global layers.

Documents are read from the positions, as packed training batches write them: a token whose position is
not its predecessor's plus one starts a new document (positions restart at 0 for every packed document).
So the model needs no extra argument, and a plain `arange` is one document.

`attend` is the single entry point: model.py calls it with either a mask tensor (a KV cache's, or a
test's), which goes to the kernel (a decode step's perhaps in two calls, below), or a `Layout` of the
sequence, which picks a kernel above.

A cache's decode step has one query per row, and in a server's batch the rows' histories can differ a lot
in length (one long document beside short chats). The kernel computes every key a mask hides, so rows
whose history ends at or before half of the longest's get a call of their own over only the keys they
need (`_short_rows`): the same attention, for a fraction of the reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

MIN_BLOCK = 128  # queries per block at least: below this the per-call overhead outweighs the saved work


@dataclass
class Block:
    start: int  # queries [start, end)
    end: int
    lo: int  # keys [lo, end)
    mask: Tensor  # (B or 1, 1, end - start, end - lo), True = may attend


@dataclass
class Layout:
    """Where each token's document starts, and the query blocks of each window size, built once per forward."""

    length: int
    doc_start: Tensor | None  # (B, T) index of the first token of each token's document; None: one document
    blocks: dict[int | None, list[Block]] = field(default_factory=dict)

    @classmethod
    def of(cls, pos: Tensor | None, length: int) -> Layout:
        """The layout of a sequence with positions `pos` (None: 0..T-1, one document per row)."""
        if pos is None:
            return cls(length, None)
        new = torch.ones_like(pos, dtype=torch.bool)
        new[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
        if not bool(new[:, 1:].any()):
            return cls(length, None)
        idx = torch.arange(length, device=pos.device).expand_as(pos)
        doc_start = torch.where(new, idx, torch.zeros_like(idx)).cummax(dim=1).values
        return cls(length, doc_start)

    def block_size(self, window: int | None) -> int:
        return max(window or 0, MIN_BLOCK)

    def query_blocks(self, window: int | None, device: torch.device) -> list[Block]:
        """The blocks for layers of this window (None: global), computed on first use, then shared."""
        if window in self.blocks:
            return self.blocks[window]
        T, C = self.length, self.block_size(window)
        starts = list(range(0, T, C))
        # The earliest document start in each block's first column, over the batch: one transfer for all.
        first_doc = [0] * len(starts) if self.doc_start is None else self.doc_start[:, starts].amin(0).tolist()
        idx = torch.arange(T, device=device)
        out = []
        for s, d in zip(starts, first_doc, strict=True):
            e = min(s + C, T)
            lo = max(d, 0 if window is None else s - window + 1, 0)
            q, k = idx[s:e, None], idx[None, lo:e]
            allowed = k <= q
            if window is not None:
                allowed = allowed & (k > q - window)
            allowed = allowed[None, None]
            if self.doc_start is not None:  # same document: same start
                allowed = allowed & (self.doc_start[:, None, s:e, None] == self.doc_start[:, None, None, lo:e])
            out.append(Block(s, e, lo, allowed))
        self.blocks[window] = out
        return out


def repeat_kv(x: Tensor, heads: int) -> Tensor:
    """(B, Hkv, T, D) -> (B, heads, T, D), each key/value head once per query head of its group.

    Whole-sequence attention is trained, and the CPU flash kernel's backward with `enable_gqa` is many times
    slower than with one key/value head per query head (docs/BENCHMARKS.md, training attention). With one
    key/value head (multi-query, the 270M model) this is a stride-0 view, no copy; otherwise K and V are
    copied, which is small next to the scores."""
    B, Hkv, T, D = x.shape
    return x[:, :, None].expand(B, Hkv, heads // Hkv, T, D).reshape(B, heads, T, D)


SPLIT_MIN_KEYS = 128  # a decode step's short rows get their own call when it skips at least this many keys


def _short_rows(mask: Tensor) -> tuple[list[int], list[int], int] | None:
    """For a decode step's mask (B, 1, 1, Tk): (short rows, the others, the keys the short rows need) when
    some rows' histories end at or before half of the longest's, else None.

    The CPU kernel computes every key a mask hides, and a batch's keys are as many as its longest history
    needs: beside one 4,000-token prompt, fifteen 200-token conversations would each attend to 4,000
    entries. Only eager CPU steps are split: it reads the mask's values (a sync on a GPU) and its shapes
    depend on them (a compiled step's may not)."""
    if mask.device.type != "cpu" or mask.dtype != torch.bool or torch.compiler.is_compiling():
        return None
    B, Tk = mask.shape[0], mask.shape[-1]
    if Tk < 2 * SPLIT_MIN_KEYS:
        return None
    allowed = mask.reshape(B, -1, Tk).any(dim=1)
    ends = (Tk - allowed.flip(-1).to(torch.uint8).argmax(-1)).tolist()  # one past each row's last key
    longest = max(ends)
    short = [i for i, e in enumerate(ends) if 2 * e <= longest]
    if not short or len(short) == B:
        return None
    need = max(ends[i] for i in short)
    if Tk - need < SPLIT_MIN_KEYS:
        return None
    return short, [i for i in range(B) if 2 * ends[i] > longest], need


def _attend_in_two(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float, window: int | None,
                   short: list[int], others: list[int], need: int) -> Tensor:
    """A decode step in two calls: the short rows over their first `need` keys (every later key is hidden
    from them), the others over all. Each row attends to the same keys as in one call; only hidden ones
    are dropped (the rounding may differ in the last bits, as between any two key counts)."""
    out = q.new_empty(q.shape)
    for idx, n in ((short, need), (others, k.shape[2])):
        consecutive = idx == list(range(idx[0], idx[0] + len(idx)))  # then the rows are views, not copies
        rows = slice(idx[0], idx[0] + len(idx)) if consecutive else torch.tensor(idx, device=q.device)
        out[rows] = attend(q[rows], k[rows, :, :n], v[rows, :, :n], mask[rows, ..., :n], scale, window)
    return out


def _threads() -> int:
    return torch.get_num_threads()


# Read once when a step is traced (dynamo cannot trace the call itself). This is what
# `torch.compiler.assume_constant_result` does, set by hand: importing the decorator imports torch._dynamo,
# a second of every start-up.
_threads._dynamo_marked_constant = True  # type: ignore[attr-defined]


def decode_parts(heads: int, group: int, threads: int | None = None) -> int:
    """Into how many groups a decode step splits each key/value head's `group` query rows: the fewest (a
    power of two dividing `group`) that give the kernel's `heads` x parts work items at least one per
    thread. Each part reads the cache again, so no more than the threads can use."""
    threads = threads or _threads()
    parts = 1
    while heads * parts < threads and group % (2 * parts) == 0:
        parts *= 2
    return parts


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | Layout | None, scale: float,
           window: int | None) -> Tensor:
    """softmax(q kᵀ · scale + mask) v for q (B, H, Tq, D), k and v (B, Hkv, Tk, D) -> (B, H, Tq, D)."""
    gqa = k.shape[1] != q.shape[1]
    if not isinstance(mask, Layout):  # an explicit mask (a cache's): the kernel takes it as it is
        B, H, Tq, D = q.shape
        if Tq == 1 and mask is not None and B > 1:
            split = _short_rows(mask)
            if split is not None:
                return _attend_in_two(q, k, v, mask, scale, window, *split)
        if gqa and Tq == 1 and (mask is None or mask.shape[1] == 1):
            # A decode step: the G query heads that share a key/value head go in as G query rows of that
            # head, which the kernel then reads once, not once per query head (the same mask row for all).
            # The kernel gives each (row, head) to one thread, so with fewer of them than threads the rows
            # are split into `parts` groups, each a head of G / parts rows (enable_gqa maps group j to
            # key/value head j // parts): every thread works, each reading the cache once.
            Hkv = k.shape[1]
            parts = decode_parts(B * Hkv, H // Hkv) if q.device.type == "cpu" else 1  # CPU threads only
            out = F.scaled_dot_product_attention(q.reshape(B, Hkv * parts, H // Hkv // parts, D), k, v,
                                                 attn_mask=mask, scale=scale, enable_gqa=parts > 1)
            return out.view(B, H, 1, D)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    if gqa:
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    if window is None and mask.doc_start is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    outs = [F.scaled_dot_product_attention(q[:, :, b.start:b.end], k[:, :, b.lo:b.end], v[:, :, b.lo:b.end],
                                           attn_mask=b.mask, scale=scale)
            for b in mask.query_blocks(window, q.device)]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
