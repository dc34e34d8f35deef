"""The JAX model against the PyTorch one, and its KV cache against full recomputation, on `tiny` models.

The tiny window is 8, so a few dozen tokens wrap the sliding rings many times. Every comparison feeds
both backends the same weights (PyTorch's, converted with `to_params`).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from nanogemma import model as pt
from nanogemma.config import GLOBAL, get_preset
from nanogemma.decoding import SamplingParams
from nanogemma.errors import NanogemmaError
from nanogemma.jax import model as jx
from nanogemma.jax.cache import init_cache
from nanogemma.jax.generation import Decoder, Session, _programs, filter_logits, generate_ids
from nanogemma.jax.load import to_params
from nanogemma.jax.model import JaxGemma
from nanogemma.sampling import filter_logits as t_filter_logits

W = 8  # the tiny preset's sliding window


def tiny_pair(seed: int = 0, **changes) -> tuple[pt.Gemma, JaxGemma]:
    """A random tiny PyTorch model (scaled so greedy decoding wanders) and its JAX twin."""
    cfg = get_preset("tiny").replace(**changes)
    model = pt.Gemma(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 1 else 0.05))
    return model, JaxGemma(cfg, to_params(cfg, model.state_dict()))


@pytest.fixture(scope="module")
def pair() -> tuple[pt.Gemma, JaxGemma]:
    return tiny_pair()


def prompt(n: int, seed: int = 1) -> list[int]:
    return torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(seed + n)).tolist()


def test_parameter_names_and_shapes_match_pytorch(pair):
    model, _ = pair
    assert jx.param_shapes(model.config) == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    untied = get_preset("tiny").replace(tie_embeddings=False)
    assert jx.param_shapes(untied) == {k: tuple(v.shape) for k, v in pt.Gemma(untied).state_dict().items()}


def test_components_match_pytorch():
    norm = pt.RMSNorm(64)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 7, 64) * 50
    np.testing.assert_allclose(jx.rms_norm(jnp.asarray(x.numpy()), jnp.asarray(norm.weight.detach().numpy()), 1e-6),
                               norm(x).detach().numpy(), rtol=0, atol=1e-5)
    for base, scale in ((10_000.0, 1.0), (1_000_000.0, 8.0)):
        np.testing.assert_array_equal(jx.rope_inv_freq(16, base, scale), pt.rope_inv_freq(16, base, scale).numpy())
        pos = torch.arange(0, 3000, 7)[None]
        q = torch.randn(1, 4, pos.shape[1], 16)
        cos, sin = pt.rope_cos_sin(pos, pt.rope_inv_freq(16, base, scale), q.dtype)
        jcos, jsin = jx.rope_cos_sin(jnp.asarray(pos.numpy()), jx.rope_inv_freq(16, base, scale), jnp.float32)
        ours = jx.apply_rope(jnp.asarray(q.transpose(1, 2).numpy()), jcos, jsin)  # JAX keeps (B, T, H, D)
        ref = pt.apply_rope(q, cos, sin).transpose(1, 2).numpy()
        np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=2e-5)


def test_forward_matches_pytorch(pair):
    model, jm = pair
    ids = torch.tensor([prompt(40), prompt(40, seed=2)])  # 40 tokens: five windows
    with torch.no_grad():
        ref = model(ids).numpy()
    np.testing.assert_allclose(np.asarray(jm(ids.numpy())), ref, rtol=0, atol=1e-5)


def test_bfloat16_forward_is_as_close_as_pytorchs():
    """In bfloat16 the two backends round differently; each must be as near the float32 result as the other."""
    model, jm = tiny_pair()
    ids = torch.tensor([prompt(40)])
    with torch.no_grad():
        f32 = model(ids).numpy()
        torch_err = np.abs(model.to(torch.bfloat16)(ids).numpy() - f32).max()
    jb = JaxGemma(jm.config, to_params(jm.config, jm.params, "bfloat16"))
    assert jb.dtype == jnp.bfloat16
    jax_err = np.abs(np.asarray(jb(ids.numpy())) - f32).max()
    assert jax_err < max(1.5 * torch_err, 0.02), (jax_err, torch_err)


def test_sliding_layer_sees_exactly_the_window():
    """One sliding layer: position t depends on tokens t-W+1..t and on no earlier one."""
    _, jm = tiny_pair(num_layers=1, layer_types=("sliding",))
    ids = np.array([prompt(40)])
    changed = ids.copy()
    changed[0, 20 - W] = (ids[0, 20 - W] + 1) % 512
    base, out = np.asarray(jm(ids)), np.asarray(jm(changed))
    np.testing.assert_array_equal(out[0, 20:], base[0, 20:])
    assert not np.array_equal(out[0, 19], base[0, 19])


# --------------------------------------------------------------------------------------------- cache


def test_cache_layout():
    cfg = get_preset("tiny")
    cache = init_cache(cfg, 2, 100)
    for t, layer in zip(cfg.layer_types, cache, strict=True):
        assert layer.k.shape == (2, 100 if t == GLOBAL else W, cfg.num_kv_heads, cfg.head_dim)
        assert (np.asarray(layer.pos) == -1).all()


@pytest.mark.parametrize("chunk", [3, W, 128])  # below, at and above the window
def test_cached_logits_equal_full_forward_across_many_wraps(pair, chunk):
    """Teacher forcing: each cached step's logits equal the uncached forward at that position."""
    _, jm = pair
    ids = prompt(21)  # a prompt of more than two windows, prefilled in chunks
    seq = ids + prompt(60, seed=5)  # then 60 decode steps: the rings wrap 10 times
    session = Session(jm, 1, len(seq), prefill_chunk=chunk)
    got = [np.asarray(session.prefill([ids]))[0]]
    for t in seq[len(ids):-1]:
        got.append(np.asarray(session.step(np.array([t])))[0])
    full = np.asarray(jm(np.array([seq])))[0, len(ids) - 1:-1]
    np.testing.assert_allclose(np.stack(got), full, rtol=0, atol=2e-5)


@pytest.mark.parametrize("n", [3, W, 2 * W + 5])
def test_cached_generation_equals_uncached_and_pytorch(pair, n):
    from nanogemma.generation import generate_ids as torch_generate_ids

    model, jm = pair
    ids = prompt(n)
    cached = list(generate_ids(jm, ids, 48, prefill_chunk=4))  # 48 tokens: 6+ wraps of the window
    assert cached == list(generate_ids(jm, ids, 48, use_cache=False))
    assert cached == list(torch_generate_ids(model, ids, 48))
    assert len(set(cached)) > 10  # only meaningful if the text varies


def test_batch_equals_each_prompt_alone(pair):
    _, jm = pair
    prompts = [prompt(3), prompt(2 * W + 3), prompt(W)]
    rows = list(Decoder(jm, prompts, 20, prefill_chunk=4))
    for b, p in enumerate(prompts):
        assert [r[b] for r in rows] == list(generate_ids(jm, p, 20, prefill_chunk=4))


def test_compiled_once_per_shape(pair):
    """A new prompt (another length, same cache bucket) reuses the compiled prefill and decode."""
    _, jm = pair
    list(generate_ids(jm, prompt(5), 10))
    prefill, step = _programs(jx.config_key(jm.config))
    sizes = prefill._cache_size(), step._cache_size()
    for n in (7, 30, 11):
        list(generate_ids(jm, prompt(n), 12))
    assert (prefill._cache_size(), step._cache_size()) == sizes


def test_stop_tokens_and_limits(pair):
    _, jm = pair
    ids = prompt(5)
    first = list(generate_ids(jm, ids, 10))
    assert list(generate_ids(jm, ids, 10, stop_ids={first[3]})) == first[:first.index(first[3])]
    assert list(generate_ids(jm, ids, 0)) == []
    limit = jm.config.max_seq_len
    assert len(list(generate_ids(jm, prompt(limit - 3), 10))) == 3  # the context ends generation
    with pytest.raises(NanogemmaError, match="context"):
        list(generate_ids(jm, prompt(limit), 5))
    with pytest.raises(NanogemmaError, match="top-p"):
        list(generate_ids(jm, ids, 5, SamplingParams(temperature=1.0, top_p=1.5)))


# ------------------------------------------------------------------------------------------ sampling


@pytest.mark.parametrize("top_k,top_p,min_p", [(5, None, None), (None, 0.8, None), (None, None, 0.1),
                                               (50, 0.9, 0.05), (1, 0.5, None)])
def test_filters_match_pytorch(top_k, top_p, min_p):
    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(0)) * 3
    ref = t_filter_logits(logits, top_k, top_p, min_p).numpy()
    ours = np.asarray(filter_logits(jnp.asarray(logits.numpy()), top_k, top_p, min_p))
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    np.testing.assert_array_equal(ours[~np.isinf(ours)], ref[~np.isinf(ref)])


def test_sampling_is_seeded_and_respects_filters(pair):
    _, jm = pair
    ids = prompt(6)
    p = SamplingParams(temperature=1.0, top_k=3, seed=7)
    a, b = list(generate_ids(jm, ids, 20, p)), list(generate_ids(jm, ids, 20, p))
    assert a == b
    assert a != list(generate_ids(jm, ids, 20, SamplingParams(temperature=1.0, top_k=3, seed=8)))
    # top-k 1 is greedy, whatever the temperature.
    assert list(generate_ids(jm, ids, 20, SamplingParams(temperature=2.0, top_k=1, seed=3))) == \
        list(generate_ids(jm, ids, 20))


def test_repetition_penalty_matches_pytorch(pair):
    """Greedy with a penalty is deterministic: the same tokens as PyTorch's sampler, and not plain greedy."""
    from nanogemma.generation import generate_ids as torch_generate_ids

    model, jm = pair
    ids = prompt(6)
    ours = list(generate_ids(jm, ids, 30, SamplingParams(repetition_penalty=1.5)))
    assert ours == list(torch_generate_ids(model, ids, 30, repetition_penalty=1.5))
    assert ours != list(generate_ids(jm, ids, 30))


def test_temperature_sampling_draws_from_the_filtered_distribution():
    """20,000 draws at once (one row each) against the probabilities PyTorch's filters leave."""
    import jax

    from nanogemma.jax.generation import sample

    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]])
    p = SamplingParams(temperature=0.7, top_k=6, top_p=0.9)
    expected = t_filter_logits(logits / p.temperature, p.top_k, p.top_p).softmax(-1)[0].numpy()
    rows = jnp.broadcast_to(jnp.asarray(logits.numpy()), (20_000, 8))
    draws = np.asarray(sample(rows, jax.random.key(0), None, p))
    freq = np.bincount(draws, minlength=8) / len(draws)
    assert freq[expected == 0].sum() == 0  # filtered tokens are never drawn
    np.testing.assert_allclose(freq, expected, atol=0.015)

