"""Gemma 3 (text) in JAX: `nanogemma/model.py`, component for component, as pure functions over a dict.

The parameters are a flat dict keyed by nanogemma's own names — `params["layers.3.attn.wq.weight"]` — with
every matrix stored (out, in) exactly as in the PyTorch model. So a checkpoint is the same file for both
backends, and each function below reads like its PyTorch twin: `linear(x, w)` is `nn.Linear` (x @ wᵀ; XLA
folds the transpose into the matmul, nothing is copied).

Shapes inside attention stay (batch, time, heads, head_dim), the order the projections produce; the KV cache
(`cache.py`) stores keys and values in the same order, so nothing is transposed on the decode path.

What must match PyTorch exactly (and does, to float32 rounding — see tests/test_jax_real.py):

* RMSNorm computes in float32 and multiplies by (1 + w); the cast back comes after the multiply.
* the embedding scale sqrt(d) is cast to the activation dtype before multiplying;
* QK-norm comes before RoPE; RoPE is the "rotate half" form with bases 10k (sliding) and 1M (global);
* query i of a sliding layer sees keys i-W < j <= i; the attention scale is query_pre_attn_scalar ** -0.5;
* softmax in float32; the head is tied to the embedding.

The config is not traced: every function takes the `GemmaConfig` as a plain Python argument, so a jitted
caller closes over it (see `generation.py`, `train.py`) and each config compiles its own program.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..config import GLOBAL, SLIDING, GemmaConfig
from .cache import KVCache, LayerCache, causal_mask, update_layer

Params = dict[str, jax.Array]


# ------------------------------------------------------------------------------------------ parameters


def param_shapes(cfg: GemmaConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape: the same keys as `Gemma(cfg).state_dict()`, in the same order."""
    d, h, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (cfg.vocab_size, d)}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        shapes |= {
            p + "input_norm.weight": (d,),
            p + "attn.wq.weight": (cfg.num_heads * h, d),
            p + "attn.wk.weight": (cfg.num_kv_heads * h, d),
            p + "attn.wv.weight": (cfg.num_kv_heads * h, d),
            p + "attn.wo.weight": (d, cfg.num_heads * h),
            p + "attn.q_norm.weight": (h,),
            p + "attn.k_norm.weight": (h,),
            p + "post_attn_norm.weight": (d,),
            p + "pre_ffw_norm.weight": (d,),
            p + "mlp.gate.weight": (f, d),
            p + "mlp.up.weight": (f, d),
            p + "mlp.down.weight": (d, f),
            p + "post_ffw_norm.weight": (d,),
        }
    shapes["final_norm.weight"] = (d,)
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    return shapes


def init_params(cfg: GemmaConfig, key: jax.Array, std: float = 0.02, dtype: jnp.dtype = jnp.float32) -> Params:
    """Random weights for training from scratch, by the rule of `Gemma.init_weights` (norms zero = unit scale).

    The draws differ from PyTorch's generator; to start both backends from the same weights, initialise in
    one and convert (`load.to_params`).
    """
    params = {}
    shapes = param_shapes(cfg)
    for k, (name, shape) in zip(jax.random.split(key, len(shapes)), shapes.items(), strict=True):
        if name.endswith("norm.weight"):
            params[name] = jnp.zeros(shape, dtype)
        else:
            # Residual output projections scaled down with depth, as in GPT-2.
            s = std / math.sqrt(2 * cfg.num_layers) if name.endswith(("wo.weight", "down.weight")) else std
            params[name] = (jax.random.normal(k, shape, jnp.float32) * s).astype(dtype)
    return params


# ------------------------------------------------------------------------------------------ components


def linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """`nn.Linear` without bias: w is (out, in)."""
    return x @ w.T


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    # float32 throughout, and the cast back comes *after* the scale, as in the reference.
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * (1.0 + w.astype(jnp.float32))).astype(x.dtype)


def rope_inv_freq(head_dim: int, base: float, scale: float = 1.0) -> np.ndarray:
    """Per-pair rotation frequencies (a constant, so numpy); linear scaling divides them."""
    return (1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)) / scale).astype(np.float32)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables for `positions` (B, T) -> each (B, T, 1, head_dim), halves repeated, ready to
    broadcast over the heads axis of (B, T, H, D)."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # float32, for long contexts
    angles = jnp.concatenate((angles, angles), axis=-1)[:, :, None, :]
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate pairs (x[i], x[i + D/2]): the "rotate half" layout of HF checkpoints."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate((-x2, x1), axis=-1) * sin


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """Grouped-query attention. q (B, T, H, D); k, v (B, S, KV, D); mask (B, T, S) -> (B, T, H, D).

    Query heads are grouped onto their key/value head by a reshape, not by repeating k and v. A masked
    score becomes the most negative finite float rather than -inf: a row with nothing allowed (a pad
    query) then averages instead of producing NaN, and no NaN can leak into real rows.
    """
    B, T, H, D = q.shape
    kv = k.shape[2]
    qg = q.reshape(B, T, kv, H // kv, D)
    # Scores, softmax and the weighted sum accumulate in float32 whatever the activation dtype, as
    # PyTorch's fused CPU attention does; only the output is rounded back.
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    y = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return y.reshape(B, T, H, D).astype(v.dtype)


def attention(p: Params, prefix: str, cfg: GemmaConfig, layer_type: str, x: jax.Array, cos: jax.Array,
              sin: jax.Array, mask: jax.Array | None, pos: jax.Array,
              cache: LayerCache | None = None) -> tuple[jax.Array, LayerCache | None]:
    B, T, _ = x.shape
    window = None if layer_type == GLOBAL else cfg.sliding_window
    q = linear(x, p[prefix + "wq.weight"]).reshape(B, T, cfg.num_heads, cfg.head_dim)
    k = linear(x, p[prefix + "wk.weight"]).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    v = linear(x, p[prefix + "wv.weight"]).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    # QK-norm before RoPE: normalise the raw head vectors, then rotate them.
    q = apply_rope(rms_norm(q, p[prefix + "q_norm.weight"], cfg.norm_eps), cos, sin)
    k = apply_rope(rms_norm(k, p[prefix + "k_norm.weight"], cfg.norm_eps), cos, sin)
    if cache is not None:
        k, v, mask, cache = update_layer(cache, pos, k, v, window)
    y = attend(q, k, v, mask, cfg.query_pre_attn_scalar**-0.5)
    return linear(y.reshape(B, T, -1), p[prefix + "wo.weight"]), cache


def mlp(p: Params, prefix: str, x: jax.Array) -> jax.Array:
    gate = jax.nn.gelu(linear(x, p[prefix + "gate.weight"]), approximate=True)  # tanh GELU, as Gemma uses
    return linear(gate * linear(x, p[prefix + "up.weight"]), p[prefix + "down.weight"])


def block(p: Params, i: int, cfg: GemmaConfig, x: jax.Array, cos: jax.Array, sin: jax.Array,
          mask: jax.Array | None, pos: jax.Array,
          cache: LayerCache | None = None) -> tuple[jax.Array, LayerCache | None]:
    """One sandwich-normed block: a norm before and after each sub-layer."""
    pre, eps = f"layers.{i}.", cfg.norm_eps
    a, cache = attention(p, pre + "attn.", cfg, cfg.layer_types[i], rms_norm(x, p[pre + "input_norm.weight"], eps),
                         cos, sin, mask, pos, cache)
    h = x + rms_norm(a, p[pre + "post_attn_norm.weight"], eps)
    m = mlp(p, pre + "mlp.", rms_norm(h, p[pre + "pre_ffw_norm.weight"], eps))
    return h + rms_norm(m, p[pre + "post_ffw_norm.weight"], eps), cache


# ------------------------------------------------------------------------------------------ the model


def embed_tokens(p: Params, cfg: GemmaConfig, ids: jax.Array) -> jax.Array:
    x = p["embed.weight"][ids]
    return x * jnp.asarray(math.sqrt(cfg.hidden_size), dtype=x.dtype)  # scale rounded to the activation dtype


def logits(p: Params, cfg: GemmaConfig, x: jax.Array) -> jax.Array:
    x = rms_norm(x, p["final_norm.weight"], cfg.norm_eps)
    return linear(x, p.get("lm_head.weight", p["embed.weight"])).astype(jnp.float32)


def _blocks(p: Params, cfg: GemmaConfig, ids: jax.Array, pos: jax.Array,
            cache: KVCache | None) -> tuple[jax.Array, KVCache | None]:
    x = embed_tokens(p, cfg, ids)
    rope = {
        SLIDING: rope_cos_sin(pos, rope_inv_freq(cfg.head_dim, cfg.rope_local_base), x.dtype),
        GLOBAL: rope_cos_sin(pos, rope_inv_freq(cfg.head_dim, cfg.rope_global_base, cfg.rope_global_scale), x.dtype),
    }
    masks: dict[str, jax.Array] = {}
    if cache is None:
        masks = {t: causal_mask(pos, pos, None if t == GLOBAL else cfg.sliding_window) for t in set(cfg.layer_types)}
    new_layers = []
    for i, layer_type in enumerate(cfg.layer_types):
        x, layer_cache = block(p, i, cfg, x, *rope[layer_type], masks.get(layer_type), pos,
                               None if cache is None else cache[i])
        new_layers.append(layer_cache)
    return x, None if cache is None else tuple(new_layers)


def default_positions(ids: jax.Array) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)


def forward(params: Params, cfg: GemmaConfig, ids: jax.Array, pos: jax.Array | None = None) -> jax.Array:
    """ids (B, T) -> float32 logits (B, T, vocab), the whole sequence recomputed (no cache).

    `pos` (B, T) gives absolute positions (default 0..T-1); a negative position marks padding, which no
    real token attends to.
    """
    pos = default_positions(ids) if pos is None else pos
    x, _ = _blocks(params, cfg, ids, pos, None)
    return logits(params, cfg, x)


def forward_cached(params: Params, cfg: GemmaConfig, ids: jax.Array, pos: jax.Array,
                   cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Incremental forward: stores the new keys/values in `cache` and returns (logits (B, T, V), new cache).

    Pure: the cache passed in is not modified (jit with `donate_argnums` lets XLA update it in place).
    """
    x, cache = _blocks(params, cfg, ids, pos, cache)
    return logits(params, cfg, x), cache


# ------------------------------------------------------------------------------------------ a handle


def config_key(cfg: GemmaConfig) -> str:
    """A hashable spelling of a config (the dataclass itself is not hashable): keys the compiled functions."""
    return json.dumps(cfg.to_dict(), sort_keys=True)


@functools.lru_cache(maxsize=8)
def _jitted_forward(key: str):
    cfg = GemmaConfig.from_dict(json.loads(key))
    return jax.jit(lambda params, ids, pos: forward(params, cfg, ids, pos))


@dataclass(eq=False)
class JaxGemma:
    """A config and its parameters — what `nanogemma.jax.load` returns. Calling it runs the jitted forward
    (no cache): `model(ids)` -> float32 logits (B, T, vocab), as `Gemma.__call__` does."""

    config: GemmaConfig
    params: Params

    def __call__(self, ids: Any, pos: Any | None = None) -> jax.Array:
        ids = jnp.asarray(ids, dtype=jnp.int32)
        pos = default_positions(ids) if pos is None else jnp.asarray(pos, dtype=jnp.int32)
        return _jitted_forward(config_key(self.config))(self.params, ids, pos)

    @property
    def dtype(self) -> Any:
        return self.params["embed.weight"].dtype
