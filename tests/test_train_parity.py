"""Training numerics against transformers, and the fused head + cross-entropy against the plain one.

The same 8 AdamW steps through nanogemma (fused head + loss) and transformers' Gemma3ForCausalLM (its own
loss) give losses equal to ~1e-6 (float rounding; asserted: 1e-4 on every step). The reference is built
without a padding id: transformers would otherwise zero the embedding gradient of id 0, a real token
here, and the curves would drift apart by ~1e-4 per step for that reason alone.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import nanogemma.train.loss as loss_mod
from nanogemma.tools.train_bench import hf_loss, hf_model, run
from nanogemma.train.config import TrainConfig, model_config
from nanogemma.train.loss import LanguageModelLoss, TrainingGemma, fused_linear_cross_entropy
from nanogemma.weights import hf_state_dict


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def small_chunks(monkeypatch):
    """Force several chunks even for small tensors."""
    monkeypatch.setitem(loss_mod.CHUNK_ELEMENTS, "cpu", 7 * 300)
    monkeypatch.setattr(loss_mod, "MIN_ROWS", 1)


def test_fused_cross_entropy_equals_plain(small_chunks):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(50, 16, generator=g, requires_grad=True)
    w = torch.randn(300, 16, generator=g).mul(0.5).requires_grad_()
    y = torch.randint(0, 300, (50,), generator=g)
    plain = F.cross_entropy(h @ w.t(), y)
    gh, gw = torch.autograd.grad(plain * 3.0, (h, w))
    fused = fused_linear_cross_entropy(h, w, y)
    fh, fw = torch.autograd.grad(fused * 3.0, (h, w))  # an upstream gradient other than 1 is honoured
    assert fused.item() == pytest.approx(plain.item(), abs=1e-5)
    torch.testing.assert_close(fh, gh, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fw, gw, rtol=1e-5, atol=1e-7)


def test_fused_cross_entropy_under_bfloat16_autocast():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(64, 32, generator=g, requires_grad=True)
    w = torch.randn(100, 32, generator=g).requires_grad_()
    y = torch.randint(0, 100, (64,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = F.cross_entropy((h @ w.t()).float(), y)
        fused = fused_linear_cross_entropy(h, w, y)
    assert fused.dtype == torch.float32 and fused.item() == pytest.approx(plain.item(), rel=1e-2)
    fused.backward()
    assert h.grad.dtype == w.grad.dtype == torch.float32


def test_fused_cross_entropy_bfloat16_groups_within_rounding_of_float64(monkeypatch):
    """Under bfloat16 autocast the head runs in groups of rows (several here, one chunk-sized softmax at a time,
    a partial group last); loss and gradients stay within the error bfloat16 rounding explains, against a
    float64 reference on the same bfloat16-rounded inputs (what autocast feeds the matmuls).

    The bound, from first-order error analysis with u = 2⁻⁸ (bfloat16's unit roundoff) and L = max |logit|:
    the logits are rounded (each off by ≤ u·|logit|), which moves a row's loss by at most u times a
    p-weighted sum of |logits|, and its softmax-minus-target q by ≤ 2uL + u in total (the last u: q itself
    is rounded); the gradient matmuls add a rounding of their output, u times the sum of the magnitudes of
    its terms. Twice that covers the second order."""
    monkeypatch.setitem(loss_mod.CHUNK_ELEMENTS, "cpu", 7 * 300)  # softmax in chunks of 7 rows
    monkeypatch.setattr(loss_mod, "MIN_ROWS", 1)
    monkeypatch.setattr(loss_mod, "GROUP_BYTES", 21 * 300 * 2)  # groups of 21 rows: 21, 21, 8
    assert loss_mod._head_plan("cpu", 300)[1:] == (7, 7)
    g = torch.Generator().manual_seed(4)
    n, upstream = 50, 3.0
    h = torch.randn(n, 16, generator=g, requires_grad=True)
    w = torch.randn(300, 16, generator=g).mul(0.5).requires_grad_()
    y = torch.randint(0, 300, (n,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert loss_mod._head_plan("cpu", 300)[1:] == (21, 7)
        fused = fused_linear_cross_entropy(h, w, y)
    fh, fw = torch.autograd.grad(fused * upstream, (h, w))
    h64, w64 = h.detach().bfloat16().double(), w.detach().bfloat16().double()
    logits = h64 @ w64.t()
    q = (logits.softmax(-1) - F.one_hot(y, 300).double()) * (upstream / n)
    ref_loss, ref_h, ref_w = F.cross_entropy(logits, y).item(), q @ w64, q.t() @ h64
    u, big, p = 2.0**-8, logits.abs().max().item(), logits.softmax(-1)
    # A row's loss, lse - logit[target], moves by ≤ u·(Σ p·|logit| + |logit[target]|) when each logit is rounded.
    rows = torch.arange(n)
    loss_bound = u * ((p * logits.abs()).sum(-1) + logits[rows, y].abs()).mean().item()
    assert abs(fused.item() - ref_loss) <= 2 * loss_bound
    # |error of q| per element: its softmax part moves by ≤ p·2uL, and q is rounded (≤ u|q|, u at the target).
    dq = ((2 * u * big + u) * p + u * F.one_hot(y, 300).double()) * (upstream / n)
    bound_h = dq @ w64.abs() + u * (q.abs() @ w64.abs())
    bound_w = dq.t() @ h64.abs() + u * (q.abs().t() @ h64.abs())
    assert ((fh.double() - ref_h).abs() <= 2 * bound_h).all()
    assert ((fw.double() - ref_w).abs() <= 2 * bound_w).all()
    # Not vacuous: the bounds are a small fraction of the gradients' scale.
    assert (2 * bound_h).max() < 0.2 * ref_h.abs().max() and (2 * bound_w).max() < 0.2 * ref_w.abs().max()


def test_training_gemma_features_give_the_models_logits():
    cfg = model_config(TrainConfig(model="tiny"), 320)
    model = TrainingGemma(cfg).init_weights(seed=0)
    x = torch.randint(0, cfg.vocab_size, (2, 40))
    logits = model(x)
    model.features_only = True
    features = model(x)
    model.features_only = False
    assert features.shape == (2, 40, cfg.hidden_size)
    torch.testing.assert_close(features @ model.head_weight().t(), logits, rtol=1e-5, atol=1e-5)
    y = torch.randint(0, cfg.vocab_size, (2, 40))
    fused = LanguageModelLoss(model, fused=True)(model, x, y)
    assert fused.item() == pytest.approx(F.cross_entropy(logits.reshape(-1, cfg.vocab_size), y.reshape(-1)).item(),
                                         abs=1e-5)


def tiny_batch(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(0, cfg.vocab_size, (4, 65), generator=g)
    return w[:, :-1], w[:, 1:]


def test_first_step_gradients_equal_transformers():
    cfg = model_config(TrainConfig(model="tiny"), 320)
    ours = TrainingGemma(cfg).init_weights(seed=0)
    theirs = hf_model(cfg, ours.state_dict(), torch.device("cpu"))
    x, y = tiny_batch(cfg)
    LanguageModelLoss(ours, fused=True)(ours, x, y).backward()
    hf_loss(theirs, x, y).backward()
    ref = dict(theirs.named_parameters())
    for name, grad in hf_state_dict({k: p.grad for k, p in ours.named_parameters()}).items():
        torch.testing.assert_close(grad, ref[name].grad, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


def test_training_losses_agree_with_transformers_over_several_steps():
    """The same 8 AdamW steps (same weights, batches, schedule, clipping) through both models."""
    cfg = model_config(TrainConfig(model="tiny"), 320)
    tokens = np.random.default_rng(0).integers(0, 320, 20_000).astype(np.uint16)
    r = run(cfg, tokens, steps=8, warmup=0, batch_size=8, seq_len=64, lr=3e-3)
    print(f"losses ours {r.ours_losses}\nlosses transformers {r.hf_losses}\nlargest difference {r.max_loss_diff:.2e}; "
          f"tokens/s ours {r.ours_tokens_per_s:,.0f}, transformers {r.hf_tokens_per_s:,.0f} (not asserted here: "
          "bench/bench_train.py measures speed)")
    assert r.ours_losses[0] == pytest.approx(r.hf_losses[0], abs=1e-5)
    assert r.max_loss_diff < 1e-4
    assert all(math.isfinite(v) for v in r.hf_losses)
    assert r.hf_attention == "sdpa"  # transformers' default kernel, as its users train with it


@pytest.mark.slow
def test_compiled_training_step_matches_eager():
    """`compile = true`: the same losses as eager (the fused loss and the features_only switch compile too)."""
    cfg = model_config(TrainConfig(model="tiny"), 320)
    tokens = np.random.default_rng(0).integers(0, 320, 20_000).astype(np.uint16)
    eager = run(cfg, tokens, steps=3, warmup=0, batch_size=4, seq_len=32, compare=False)
    compiled = run(cfg, tokens, steps=3, warmup=0, batch_size=4, seq_len=32, compare=False, compile=True)
    assert compiled.ours_losses == pytest.approx(eager.ours_losses, abs=1e-5)


def test_evaluation_sums_in_chunks_equal_the_full_logits(small_chunks):
    """Evaluation applies the head a chunk of rows at a time (the full N x V logits of a Gemma validation
    batch are GBs); its loss sum, argmax hits and target count equal a float64 reference of the full logits."""
    cfg = model_config(TrainConfig(model="tiny"), 320)
    model = TrainingGemma(cfg).init_weights(seed=0).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
    y[0, :15] = -100  # prompt tokens of chat data: not targets
    with torch.no_grad():
        model.features_only = True
        h = model(x).double().reshape(-1, cfg.hidden_size)
        model.features_only = False
    logits = h @ model.head_weight().double().t()
    yy, keep = y.reshape(-1), y.reshape(-1) >= 0
    ref_loss = F.cross_entropy(logits[keep], yy[keep], reduction="sum").item()
    top2 = logits[keep].topk(2, dim=-1).values
    ambiguous = int(((top2[:, 0] - top2[:, 1]) < 1e-4).sum())  # argmax ties float32 may break either way
    ref_correct = int((logits[keep].argmax(-1) == yy[keep]).sum())
    for fused in (True, False):
        with torch.no_grad():
            loss, correct, count = LanguageModelLoss(model, fused=fused).sums(model, x, y).tolist()
        assert count == int(keep.sum()) == 65
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        assert abs(correct - ref_correct) <= ambiguous
