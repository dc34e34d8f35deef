"""A static KV cache in JAX: full history on global layers, a W-slot ring on sliding layers.

The layout follows `nanogemma/cache.py`, adapted to a functional world where a cache is a value that each
step takes and returns (so a jitted step with `donate_argnums` updates it in place):

    global layer  k, v: (B, max_len, n_kv_heads, head_dim)   slot = position
    sliding layer k, v: (B, W, n_kv_heads, head_dim)         slot = position % W   (a ring buffer)
    both          pos:  (B, slots) absolute position held by each slot, -1 for an empty slot

Every shape is fixed when the cache is made, so the decode step compiles once per (batch, max_len).

**Slots come from positions, per row.** Unlike the PyTorch cache (which counts columns shared by the
batch and left-pads), each row writes at its own positions. A batch of prompts of different lengths is
*right*-padded: pad tokens carry position -1 and are never written (their scatter index is out of range,
and `mode="drop"` discards it). Each row then decodes at its own next position, and no row ever sees a pad.

**Why the ring is enough**, as in the PyTorch cache: a sliding query at position i sees keys i-W < j <= i,
exactly what a W-slot ring holds once the new key is written; the mask compares absolute positions, so a
wrapped ring needs no special case.

**Chunks.** A chunk of T > 1 tokens cannot be written into the ring before attention (its first queries
need keys its last tokens would overwrite), so a sliding layer attends to [ring | chunk] (W + T keys,
masked by position), then keeps each row's last min(T, W) keys of the chunk. Scattering more than W keys
into W slots would write some slots twice, in an order XLA does not define: hence "keep only the last W".
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ..config import GLOBAL, GemmaConfig


class LayerCache(NamedTuple):
    k: jax.Array  # (B, slots, KV, D)
    v: jax.Array  # (B, slots, KV, D)
    pos: jax.Array  # (B, slots) int32, -1 = empty


KVCache = tuple[LayerCache, ...]


def init_cache(cfg: GemmaConfig, batch: int, max_len: int, dtype: jnp.dtype = jnp.float32) -> KVCache:
    """An empty cache for `batch` rows of up to `max_len` positions each."""
    layers = []
    for t in cfg.layer_types:
        slots = max_len if t == GLOBAL else min(cfg.sliding_window, max_len)
        shape = (batch, slots, cfg.num_kv_heads, cfg.head_dim)
        layers.append(LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                                 jnp.full((batch, slots), -1, jnp.int32)))
    return tuple(layers)


def _write(c: LayerCache, slots: jax.Array, k: jax.Array, v: jax.Array, pos: jax.Array) -> LayerCache:
    """Scatter row b's token t to slot slots[b, t]; an out-of-range slot is dropped (a pad, or not kept)."""
    rows = jnp.arange(k.shape[0])[:, None]
    return LayerCache(c.k.at[rows, slots].set(k, mode="drop"), c.v.at[rows, slots].set(v, mode="drop"),
                      c.pos.at[rows, slots].set(pos, mode="drop"))


def causal_mask(q_pos: jax.Array, k_pos: jax.Array, window: int | None) -> jax.Array:
    """The one mask rule, of the cached and the uncached model: boolean (B, Tq, Tk), True = may attend: causal, within `window` keys if given, never a negative
    (empty or pad) key position. q_pos (B, Tq), k_pos (B, Tk); positions are absolute."""
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    allowed = (k <= q) & (k >= 0)
    if window is not None:
        allowed &= k > q - window  # i - W < j <= i: the query itself plus W - 1 earlier keys
    return allowed


def update_layer(c: LayerCache, pos: jax.Array, k: jax.Array, v: jax.Array,
                 window: int | None) -> tuple[jax.Array, jax.Array, jax.Array, LayerCache]:
    """Store keys/values (B, T, KV, D) at positions `pos` (B, T); return (keys, values, mask, new cache).

    `mask` (B, T, S) is what the T queries may attend to among the returned S keys.
    """
    slots = c.pos.shape[1]
    drop = slots  # any index >= slots is discarded by the scatter
    if window is None:
        c = _write(c, jnp.where(pos >= 0, pos, drop), k, v, pos)
        return c.k, c.v, causal_mask(pos, c.pos, None), c
    T = k.shape[1]
    if T == 1:  # decode: write first, then the ring holds exactly the window
        c = _write(c, jnp.where(pos >= 0, pos % slots, drop), k, v, pos)
        return c.k, c.v, causal_mask(pos, c.pos, window), c
    keys, values = jnp.concatenate((c.k, k), axis=1), jnp.concatenate((c.v, v), axis=1)
    mask = causal_mask(pos, jnp.concatenate((c.pos, pos), axis=1), window)
    last = pos.max(axis=1, keepdims=True)  # each row's last real position in this chunk
    keep = (pos >= 0) & (pos > last - slots)
    c = _write(c, jnp.where(keep, pos % slots, drop), k, v, pos)
    return keys, values, mask, c
