"""Each component of model.py against transformers' Gemma 3 modules, on the `tiny` preset with random weights.

Sequences are longer than the tiny window (8), so sliding layers differ from global ones here.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig
from transformers.models.gemma3 import modeling_gemma3 as hf

from nanogemma.cache import causal_mask
from nanogemma.config import GLOBAL, SLIDING, get_preset, to_hf_config
from nanogemma.model import Gemma, RMSNorm, apply_rope, rope_cos_sin, rope_inv_freq
from nanogemma.weights import hf_state_dict

T = 40  # > 4 windows of the tiny preset


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 1 else 0.1))


def _hf_config(cfg) -> Gemma3TextConfig:
    c = Gemma3TextConfig(**{k: v for k, v in to_hf_config(cfg).items() if k not in ("architectures", "torch_dtype")})
    c._attn_implementation = "sdpa"
    return c


@pytest.fixture(scope="module")
def pair():
    cfg = get_preset("tiny")
    ours = Gemma(cfg).eval()
    _randomize(ours)
    ref = Gemma3ForCausalLM(_hf_config(cfg)).eval()
    missing, unexpected = ref.load_state_dict(hf_state_dict(ours.state_dict()), strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing)  # tied head
    return cfg, ours, ref


def test_rmsnorm_matches_reference():
    ours, ref = RMSNorm(64, 1e-6), hf.Gemma3RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        ours.weight.normal_()
        ref.weight.copy_(ours.weight)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(3, 7, 64) * 50).to(dtype)
        assert torch.equal(ours(x), ref(x))


def test_fresh_rmsnorm_is_identity_scale():
    x = torch.randn(4, 16)
    y = RMSNorm(16)(x)
    assert torch.allclose(y, x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt())


@pytest.mark.parametrize("scale", [1.0, 8.0])
def test_rope_matches_reference(scale):
    cfg = get_preset("tiny").replace(rope_global_scale=scale, max_seq_len=4096)
    rot = hf.Gemma3RotaryEmbedding(_hf_config(cfg))
    pos = torch.arange(0, 3000, 7)[None]
    q, k = torch.randn(1, 4, pos.shape[1], 16), torch.randn(1, 2, pos.shape[1], 16)
    for layer_type, base, s in ((SLIDING, cfg.rope_local_base, 1.0), (GLOBAL, cfg.rope_global_base, scale)):
        hf_type = "sliding_attention" if layer_type == SLIDING else "full_attention"
        cos_r, sin_r = rot(q, pos, hf_type)
        cos, sin = rope_cos_sin(pos, rope_inv_freq(16, base, s), q.dtype)
        q_ref, k_ref = hf.apply_rotary_pos_emb(q, k, cos_r, sin_r)
        assert torch.allclose(apply_rope(q, cos, sin), q_ref, atol=1e-6)
        assert torch.allclose(apply_rope(k, cos, sin), k_ref, atol=1e-6)


def test_mlp_matches_reference(pair):
    cfg, ours, ref = pair
    x = torch.randn(2, T, cfg.hidden_size)
    torch.testing.assert_close(ours.layers[0].mlp(x), ref.model.layers[0].mlp(x), rtol=0, atol=1e-6)


def _brute_force_mask(n: int, window: int | None) -> torch.Tensor:
    """Additive mask written out from the rule itself: query i sees key j iff i - W < j <= i."""
    m = torch.full((n, n), float("-inf"))
    for i in range(n):
        for j in range(n):
            if j <= i and (window is None or j > i - window):
                m[i, j] = 0.0
    return m[None, None]


def test_sliding_window_mask_rule():
    pos = torch.arange(T)[None]
    for window in (None, 1, 8, 100):
        expected = _brute_force_mask(T, window) == 0
        assert torch.equal(causal_mask(pos, pos, window), expected)
        if window:
            assert causal_mask(pos, pos, window)[0, 0].sum(-1).max() == min(window, T)  # W keys at most


@pytest.mark.parametrize("layer", [0, 5])  # a sliding and a global layer of the tiny preset
def test_attention_matches_reference(pair, layer):
    cfg, ours, ref = pair
    assert ours.layers[layer].layer_type == (GLOBAL if layer == 5 else SLIDING)
    x = torch.randn(2, T, cfg.hidden_size)
    pos = torch.arange(T)[None].expand(2, T)
    window = None if layer == 5 else cfg.sliding_window
    inv = ours.inv_freq_global if layer == 5 else ours.inv_freq_local
    cos, sin = rope_cos_sin(pos, inv, x.dtype)
    y = ours.layers[layer].attn(x, cos, sin, causal_mask(pos, pos, window), pos)
    hf_type = "full_attention" if layer == 5 else "sliding_attention"
    y_ref, _ = ref.model.layers[layer].self_attn(
        x, position_embeddings=ref.model.rotary_emb(x, pos, hf_type), attention_mask=_brute_force_mask(T, window)
    )
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-5)


def test_block_and_full_model_match_reference(pair):
    cfg, ours, ref = pair
    ids = torch.randint(0, cfg.vocab_size, (2, T))
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        torch.testing.assert_close(ours(ids), out.logits, rtol=0, atol=1e-5)
        # And layer by layer: hidden_states[i + 1] is block i's output.
        x = ours.embed_tokens(ids)
        torch.testing.assert_close(x, out.hidden_states[0], rtol=0, atol=0)
        pos = torch.arange(T)[None].expand(2, T)
        for i, block in enumerate(ours.layers[:-1]):
            inv = ours.inv_freq_global if block.layer_type == GLOBAL else ours.inv_freq_local
            window = None if block.layer_type == GLOBAL else cfg.sliding_window
            x = block(x, *rope_cos_sin(pos, inv, x.dtype), causal_mask(pos, pos, window), pos)
            torch.testing.assert_close(x, out.hidden_states[i + 1], rtol=0, atol=1e-5)


def test_bfloat16_model_matches_reference(pair):
    cfg, ours, ref = pair
    ids = torch.randint(0, cfg.vocab_size, (1, T))
    with torch.no_grad():
        a = ours.to(torch.bfloat16)(ids)
        b = ref.to(torch.bfloat16)(ids).logits.float()
    ours.float(), ref.float()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-2)


def test_embedding_scale_is_rounded_to_activation_dtype():
    model = Gemma(get_preset("gemma3-270m").replace(vocab_size=8, num_layers=1)).to(torch.bfloat16)
    with torch.no_grad():
        model.embed.weight.fill_(1.0)
    x = model.embed_tokens(torch.tensor([[3]]))
    assert x.dtype == torch.bfloat16 and x[0, 0, 0].item() == 25.25 != math.sqrt(640)


def test_sliding_layer_sees_exactly_the_window():
    """A one-layer sliding model: the output at position t depends on tokens t-W+1..t and no earlier one."""
    cfg = get_preset("tiny").replace(num_layers=1, layer_types=(SLIDING,))
    model = Gemma(cfg).init_weights(seed=1).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, T))
    W = cfg.sliding_window
    with torch.no_grad():
        base = model(ids)
        just_outside = ids.clone()
        just_outside[0, 20 - W] = (ids[0, 20 - W] + 1) % cfg.vocab_size
        changed = model(just_outside)
        # Token 20 - W is outside the window of every query at position >= 20: unaffected.
        assert torch.equal(changed[0, 20:], base[0, 20:])
        # ... and inside the window of query 20 - 1: affected.
        assert not torch.equal(changed[0, 19], base[0, 19])
