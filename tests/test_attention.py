"""Whole-sequence attention (nanogemma/attention.py) against the dense T×T mask it replaces.

The dense reference is `cache.causal_mask` plus the document rule, fed to the same blocks. Bounds come
from a float64 copy of the model. Its norms still compute in float32 (model.RMSNorm does, by design), so
in "float64" the two paths may differ by float32 rounding passed through the norms: at most a few dozen
float32 epsilons of the gradient's scale. In float32 the blocked path may be no further from the float64
result than a small multiple of the dense path's own float32 error, whatever the CPU's kernels round.
"""

from __future__ import annotations

import pytest
import torch

from nanogemma.attention import MIN_BLOCK, Layout
from nanogemma.cache import causal_mask
from nanogemma.config import GLOBAL, get_preset
from nanogemma.model import Gemma, rope_cos_sin

EPS32 = torch.finfo(torch.float32).eps

pytestmark = pytest.mark.usefixtures("one_thread")

T = MIN_BLOCK + 72  # several query blocks, T ≫ W (the tiny preset's window is 8)


def _positions(lengths: list[int], batch: int = 2) -> torch.Tensor:
    """Row 0 packs documents of `lengths`; row 1 is one document."""
    packed = torch.cat([torch.arange(n) for n in lengths])
    return torch.stack([packed, torch.arange(len(packed))] + [torch.arange(len(packed))] * (batch - 2))


def _dense_hidden(model: Gemma, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The model with today's dense masks (causal, window, same document), block by block."""
    x = model.embed_tokens(ids)
    layout = Layout.of(pos, ids.shape[1])
    idx = torch.arange(ids.shape[1]).expand_as(pos)
    doc = layout.doc_start if layout.doc_start is not None else torch.zeros_like(pos)
    same_doc = doc[:, None, :, None] == doc[:, None, None, :]
    for block in model.layers:
        glob = block.layer_type == GLOBAL
        inv = model.inv_freq_global if glob else model.inv_freq_local
        mask = causal_mask(idx, idx, None if glob else model.config.sliding_window) & same_doc
        x = block(x, *rope_cos_sin(pos, inv, x.dtype), mask, pos)
    return model.final_norm(x)


def _grads(model: Gemma, ids, pos, dense: bool) -> list[torch.Tensor]:
    model.zero_grad()
    h = _dense_hidden(model, ids, pos) if dense else model.final_norm(model.hidden(ids, pos))
    (model.lm_head(h).double().logsumexp(-1).mean() + h.double().pow(2).mean()).backward()
    return [p.grad.detach().double().clone() for p in model.parameters()]


@pytest.fixture(scope="module")
def tiny_model():
    cfg = get_preset("tiny").replace(max_seq_len=1024)
    model = Gemma(cfg).init_weights(seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    return model


@pytest.mark.parametrize("lengths", [[T], [60, 90, 1, 49]], ids=["one-document", "packed"])
def test_gradients_equal_dense_path(tiny_model, lengths):
    pos = _positions(lengths)
    ids = torch.randint(0, tiny_model.config.vocab_size, pos.shape, generator=torch.Generator().manual_seed(2))
    m64 = Gemma(tiny_model.config)
    m64.load_state_dict(tiny_model.state_dict())
    m64 = m64.double()
    ref = _grads(m64, ids, pos, dense=True)
    blocked64 = _grads(m64, ids, pos, dense=False)
    dense32 = _grads(tiny_model, ids, pos, dense=True)
    blocked32 = _grads(tiny_model, ids, pos, dense=False)
    for r, b64, d32, b32 in zip(ref, blocked64, dense32, blocked32, strict=True):
        scale = r.abs().max().item() + 1e-30
        assert (b64 - r).abs().max().item() <= 32 * EPS32 * scale  # the same arithmetic, in other blocks
        dense_err = (d32 - r).abs().max().item()
        assert (b32 - r).abs().max().item() <= 4 * dense_err + 1e-6 * scale


def test_packed_document_sees_only_itself(tiny_model):
    """A document's logits do not change when unrelated documents are packed before and after it."""
    m = Gemma(tiny_model.config)
    m.load_state_dict(tiny_model.state_dict())
    m = m.double().eval()
    gen = torch.Generator().manual_seed(3)
    doc = torch.randint(0, m.config.vocab_size, (1, 90), generator=gen)
    before, after = (torch.randint(0, m.config.vocab_size, (1, n), generator=gen) for n in (110, 40))
    with torch.no_grad():
        alone = m(doc)
        packed = m(torch.cat([before, doc, after], 1),
                   torch.cat([torch.arange(110), torch.arange(90), torch.arange(40)])[None])
    # Attention to other documents would move logits by O(1); float32 norms bound the rest (see above).
    torch.testing.assert_close(packed[:, 110:200], alone, rtol=0, atol=32 * EPS32 * alone.abs().max().item())


def test_layout_keeps_memory_linear():
    """No block mask is wider than C + W keys on a sliding layer, or C + the document on a packed global one."""
    W = 512
    layout = Layout.of(None, 8192)
    sliding = layout.query_blocks(W, torch.device("cpu"))
    assert max(b.mask.shape[-1] for b in sliding) <= layout.block_size(W) + W - 1
    assert layout.doc_start is None  # one document: global layers take the causal kernel, no mask
    pos = torch.arange(8192).remainder(300)[None]  # documents of 300 tokens
    glob = Layout.of(pos, 8192).query_blocks(None, torch.device("cpu"))
    assert max(b.mask.shape[-1] for b in glob) <= MIN_BLOCK + 300 + MIN_BLOCK


@pytest.mark.parametrize("heads,kv_heads", [(4, 1), (8, 2), (4, 4)])
@pytest.mark.parametrize("B,threads", [(3, 2), (1, 4)])
def test_a_decode_step_folds_each_query_group_onto_its_key_value_head(heads, kv_heads, B, threads):
    """One query per row (a decode step) against a cache with a per-row mask: `attend` hands the query heads
    that share a key/value head to the kernel as rows of that head (split into groups when there are fewer
    work items than threads: a lone row on 4 threads). The result must be every query head's own attention
    over its group's key/value head: checked against float64, with rows whose masks differ."""

    g = torch.Generator().manual_seed(0)
    T, D = 37, 16
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_decode_fold(heads, kv_heads, B, T, D, g)
    finally:
        torch.set_num_threads(before)


def test_decode_parts_gives_every_thread_a_work_item_and_no_more():
    from nanogemma.attention import decode_parts

    assert decode_parts(1, 4, threads=2) == 2  # the 270M model's lone row: two groups of two query rows
    assert decode_parts(1, 4, threads=1) == 1
    assert decode_parts(1, 4, threads=16) == 4  # no more parts than query rows
    assert decode_parts(2, 4, threads=2) == 1  # a batch of two already gives each thread a row
    assert decode_parts(1, 3, threads=2) == 1  # a group that does not split evenly stays whole


def _check_decode_fold(heads: int, kv_heads: int, B: int, T: int, D: int, g: torch.Generator) -> None:
    from nanogemma.attention import attend

    q = torch.randn(B, heads, 1, D, generator=g)
    k, v = torch.randn(B, kv_heads, T, D, generator=g), torch.randn(B, kv_heads, T, D, generator=g)
    mask = torch.rand(B, 1, 1, T, generator=g) < 0.7
    mask[..., 0] = True
    got = attend(q, k, v, mask, 0.25, None)
    group = heads // kv_heads
    kd, vd = (x.double().repeat_interleave(group, dim=1) for x in (k, v))  # query head h reads kv head h // group
    scores = (q.double() @ kd.transpose(-1, -2) * 0.25).masked_fill(~mask, float("-inf"))
    want = scores.softmax(-1) @ vd
    assert got.shape == (B, heads, 1, D)
    assert (got.double() - want).abs().max().item() < 1e-5
    unmasked = (q.double() @ kd.transpose(-1, -2) * 0.25).softmax(-1) @ vd  # no mask: every key
    assert (attend(q, k, v, None, 0.25, None).double() - unmasked).abs().max().item() < 1e-5


def test_a_decode_step_gives_short_rows_their_own_call():
    """Rows whose histories end at or before half of the longest's attend in a call of their own, over only
    the keys they need; the result must still be each row's attention over its own keys (float64 bound: a
    small multiple of one plain float32 call's own error), for rows in any order."""
    from nanogemma.attention import SPLIT_MIN_KEYS, _short_rows, attend

    g = torch.Generator().manual_seed(1)
    B, H, T, D = 4, 4, 600, 32
    ends = [600, 40, 550, 90]  # rows 1 and 3 are short, and not consecutive
    q = torch.randn(B, H, 1, D, generator=g)
    k, v = torch.randn(B, 1, T, D, generator=g), torch.randn(B, 1, T, D, generator=g)
    mask = torch.zeros(B, 1, 1, T, dtype=torch.bool)
    for i, e in enumerate(ends):
        mask[i, ..., :e] = True
    assert _short_rows(mask) == ([1, 3], [0, 2], 90)
    got = attend(q, k, v, mask, 0.2, None)
    scores = (q.double() @ k.double().transpose(-1, -2) * 0.2).masked_fill(~mask, float("-inf"))
    want = scores.softmax(-1) @ v.double()
    plain = torch.nn.functional.scaled_dot_product_attention(q, k.expand(B, H, T, D), v.expand(B, H, T, D),
                                                             attn_mask=mask, scale=0.2)
    plain_err = (plain.double() - want).abs().max().item()
    assert (got.double() - want).abs().max().item() <= 4 * plain_err + 16 * EPS32
    # Too little to skip, or every row alike: one call, as before.
    assert _short_rows(mask[:, ..., :2 * SPLIT_MIN_KEYS - 1]) is None
    assert _short_rows(mask[[0, 2]]) is None
