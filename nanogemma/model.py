"""Gemma 3 (text), from token ids to logits, in one file.

The data flow, top to bottom:

1. **Embedding.** Token ids index a (vocab, d) table; the vectors are multiplied by sqrt(d). The scalar is
   first cast to the activation dtype, so in bfloat16 sqrt(640) is 25.25, not 25.298: the reference does
   this, and the trained weights expect it.
2. **Blocks.** Each of the N blocks is "sandwich" normed — a norm before *and* after each sub-layer:

       h = x + post_attn_norm(attention(input_norm(x)))
       x = h + post_ffw_norm(mlp(pre_ffw_norm(h)))

   Blocks come in two kinds, set per layer by `config.layer_types`: *sliding* layers attend only to the
   last W positions (W = `sliding_window`, query i sees keys i-W < j <= i) and rotate with RoPE base 10k;
   *global* layers see the whole causal prefix and rotate with base 1M (stretched by a linear factor in
   the 4B+ models). The 5:1 interleaving keeps most of the KV cache O(W) while a few layers carry
   long-range information.
3. **Attention** projects to `num_heads` query heads and `num_kv_heads` key/value heads (grouped-query;
   multi-query in the 270M model), RMS-normalises q and k per head (QK-norm, which replaces Gemma 2's
   logit soft-capping), then applies RoPE, then scaled dot-product attention with the scale
   `query_pre_attn_scalar ** -0.5`.
4. **MLP** is a gated GELU (GeGLU): down(gelu_tanh(gate(x)) * up(x)).
5. **Head.** A final RMSNorm, then logits = x @ embeddingᵀ (the output head is tied to the embedding).
   Inference kernels (quantize.py) are modules swapped in after loading; the code here has one path.

Every RMSNorm here computes in float32 and multiplies by (1 + w): the weight is stored as an offset from
one, initialised to zero, so a fresh norm is the identity scale.

The forward pass optionally takes a KV cache (`cache.py`), which stores each layer's keys and values and
hands back what attention should see, with its mask. Without one the model recomputes the whole sequence
(the reference every cached path is tested against) through `attention.py`, which needs no T×T mask and
reads document boundaries from the positions: a position that does not follow its predecessor's starts a
new document, which attention does not cross.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import Layout, attend
from .config import GLOBAL, SLIDING, GemmaConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))  # zero-init: the (1 + w) form starts as identity

    def forward(self, x: Tensor) -> Tensor:
        # float32 throughout, and the cast back comes *after* the scale, as in the reference.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.float())).type_as(x)


def rope_inv_freq(head_dim: int, base: float, scale: float = 1.0) -> Tensor:
    """Per-pair rotation frequencies; linear scaling divides them, i.e. stretches positions by `scale`."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)) / scale


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin tables for `positions` (B, T) -> each (B, 1, T, head_dim), halves repeated."""
    angles = positions.float()[..., None] * inv_freq  # (B, T, head_dim/2), float32 for long contexts
    angles = torch.cat((angles, angles), dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[i], x[i + D/2]): the "rotate half" layout of HF checkpoints, no permutation needed."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCacheLayer(Protocol):
    """What attention needs from a cache: store new keys/values, return what to attend to and its mask."""

    def update(self, pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]: ...


class Attention(nn.Module):
    def __init__(self, cfg: GemmaConfig, layer_type: str):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.window = None if layer_type == GLOBAL else cfg.sliding_window
        self.scale = cfg.query_pre_attn_scalar**-0.5
        self.wq = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # quantize.py: one fused product instead
        return self.wq(x), self.wk(x), self.wv(x)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | Layout | None,
                pos: Tensor, cache: KVCacheLayer | None = None) -> Tensor:
        """`mask`: a boolean mask (True = may attend), or the sequence's `Layout` when there is no cache."""
        B, T, _ = x.shape
        q, k, v = self.project(x)
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        v = v.view(B, T, self.num_kv_heads, self.head_dim)
        # QK-norm before RoPE: normalise the raw head vectors, then rotate them.
        q = apply_rope(self.q_norm(q).transpose(1, 2), cos, sin)
        k = apply_rope(self.k_norm(k).transpose(1, 2), cos, sin)
        v = v.transpose(1, 2)
        if cache is not None:
            k, v, mask = cache.update(pos, k, v)
        y = attend(q, k, v, mask, self.scale, self.window)  # grouped-query: kv heads are shared, not copied
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor]:  # quantize.py: one fused product instead
        return self.gate(x), self.up(x)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.project(x)
        return self.down(F.gelu(gate, approximate="tanh") * up)


class TiedHead(nn.Module):
    """The output head tied to the embedding: logits = x @ tableᵀ, no weights of its own (`weight` is the table)."""

    def __init__(self, embed: nn.Embedding):
        super().__init__()
        object.__setattr__(self, "embed", embed)  # not a child module: the table is saved once, as embed.weight

    weight = property(lambda self: self.embed.weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


class Block(nn.Module):
    def __init__(self, cfg: GemmaConfig, layer_type: str):
        super().__init__()
        self.layer_type = layer_type
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = Attention(cfg, layer_type)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.pre_ffw_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.post_ffw_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | Layout | None,
                pos: Tensor, cache: KVCacheLayer | None = None) -> Tensor:
        h = x + self.post_attn_norm(self.attn(self.input_norm(x), cos, sin, mask, pos, cache))
        return h + self.post_ffw_norm(self.mlp(self.pre_ffw_norm(h)))


class Gemma(nn.Module):
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, t) for t in cfg.layer_types)
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        # Inference swaps a packed or int8 kernel in here (quantize.py); tied or not is the config's to say.
        self.lm_head = TiedHead(self.embed) if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # Frequencies are derived, not learned: non-persistent, so checkpoints hold only weights.
        self.register_buffer("inv_freq_local", torch.empty(cfg.head_dim // 2), persistent=False)
        self.register_buffer("inv_freq_global", torch.empty(cfg.head_dim // 2), persistent=False)
        if self.inv_freq_local.device.type != "meta":  # built on the meta device, a loader calls it later
            self.reset_rope()

    def reset_rope(self) -> None:
        """(Re)compute the RoPE frequency buffers, on the device of the embedding."""
        cfg, device = self.config, self.embed.weight.device
        self.inv_freq_local = rope_inv_freq(cfg.head_dim, cfg.rope_local_base).to(device)
        self.inv_freq_global = rope_inv_freq(cfg.head_dim, cfg.rope_global_base, cfg.rope_global_scale).to(device)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def init_weights(self, std: float = 0.02, seed: int | None = None) -> Gemma:
        """Random initialisation for training from scratch (norms stay zero, i.e. unit scale)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight"):
                    p.zero_()
                else:
                    # Residual output projections scaled down with depth, as in GPT-2.
                    s = std / math.sqrt(2 * self.config.num_layers) if name.endswith(("wo.weight", "down.weight")) else std
                    p.copy_(torch.randn(p.shape, generator=gen) * s)
        return self

    def embed_tokens(self, ids: Tensor) -> Tensor:
        x = self.embed(ids)
        return x * torch.tensor(math.sqrt(self.config.hidden_size), dtype=x.dtype)

    def logits(self, x: Tensor) -> Tensor:
        """Hidden states -> logits: the final norm, then the head (the embedding table when tied)."""
        return self.lm_head(self.final_norm(x))

    def forward(self, ids: Tensor, pos: Tensor | None = None, cache: object | None = None,
                last_only: bool = False) -> Tensor:
        """ids (B, T) -> float logits (B, T, vocab) (or (B, 1, vocab) with `last_only`).

        `pos` (B, T) gives absolute positions (default 0..T-1); without a cache, a position that does not
        follow its predecessor's starts a new document (packed training rows restart at 0 for each).
        `cache`, a `cache.KVCache`, makes the call incremental: its per-layer objects store keys/values
        and supply the masks.
        """
        x = self.hidden(ids, pos, cache)
        if last_only:
            x = x[:, -1:]
        return self.logits(x).float()

    def hidden(self, ids: Tensor, pos: Tensor | None = None, cache: object | None = None) -> Tensor:
        """The residual stream after the last block (B, T, hidden): everything but the final norm and head."""
        B, T = ids.shape
        # Without a cache, one layout of the sequence (its documents, its query blocks) serves every layer.
        layout = Layout.of(pos, T) if cache is None else None
        if pos is None:
            pos = torch.arange(T, device=ids.device).expand(B, T)
        x = self.embed_tokens(ids)
        rope = {
            SLIDING: rope_cos_sin(pos, self.inv_freq_local, x.dtype),
            GLOBAL: rope_cos_sin(pos, self.inv_freq_global, x.dtype),
        }
        for i, layer in enumerate(self.layers):
            cos, sin = rope[layer.layer_type]
            layer_cache = None if cache is None else cache.layers[i]  # a cache supplies its own masks
            x = layer(x, cos, sin, layout, pos, layer_cache)
        return x
