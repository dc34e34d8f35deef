"""Faster weights for CPU decoding: oneDNN-packed float32 (same numbers) and the start-up path that builds them.

The int8 kernels are tested with generation (tests/test_generate.py), where they are used.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from helpers import ByteTok, tiny_model
from reference import assert_same_greedy, in_float64

from nanogemma.errors import NanogemmaError
from nanogemma.generation import generate_ids
from nanogemma.model import TiedHead
from nanogemma.quantize import Int8Linear, PackedLinear, native_bf16, pack_model, quantize_model

needs_onednn = pytest.mark.skipif(not PackedLinear.available(torch.zeros(1)), reason="no oneDNN in this torch")


@needs_onednn
@pytest.mark.parametrize("rows", [1, 3, 6, 17])
def test_packed_linear_equals_f_linear(rows):
    w = torch.randn(300, 64)
    x = torch.randn(2, rows, 64)
    torch.testing.assert_close(PackedLinear(w)(x), F.linear(x, w), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_packed_model_decodes_the_same_tokens():
    ref, packed = tiny_model(), pack_model(tiny_model())
    assert isinstance(packed.lm_head, PackedLinear) and isinstance(packed.layers[0].attn.wqkv, PackedLinear)
    assert isinstance(packed.layers[0].mlp.gate_up, PackedLinear) and getattr(packed.layers[0].attn, "wq", None) is None
    assert packed.lm_head.weight.data_ptr() == packed.embed.weight.data_ptr()  # the table is not copied
    ids = [2, 30, 40, 50, 60, 70]
    with torch.inference_mode():
        torch.testing.assert_close(packed(torch.tensor([ids])), ref(torch.tensor([ids])), rtol=0, atol=1e-4)
    assert list(generate_ids(packed, ids, 80)) == list(generate_ids(ref, ids, 80))


def test_pack_model_packs_bfloat16_only_on_native_bf16():
    """bfloat16 is packed where the CPU has BF16 instructions, else left as it was; int8 is never repacked."""
    bf16 = tiny_model().to(torch.bfloat16)
    ref = tiny_model().to(torch.bfloat16)
    packed = pack_model(bf16)
    assert isinstance(packed.lm_head, PackedLinear if native_bf16() else TiedHead)
    ids = torch.tensor([[2, 30, 40, 50, 60, 70]])
    with torch.inference_mode():
        ours, plain = packed(ids), ref(ids)
        with in_float64(ref):
            exact = ref(ids)
    # Both sum in float32 and round each product's result to bfloat16: the same error, up to rounding order.
    assert (ours - exact).abs().max() <= 2 * (plain - exact).abs().max() + 1e-6
    q = quantize_model(tiny_model(), "int8")
    assert isinstance(pack_model(q).lm_head, Int8Linear)


@pytest.mark.parametrize("kernel", ["int8", "int8-wo"])
def test_fused_projections_give_each_projection_exactly(kernel):
    """One int8 product over [wq; wk; wv] equals three: rows are independent and x is rounded once per call."""
    ws = [torch.randn(48, 32), torch.randn(16, 32), torch.randn(16, 32)]
    x = torch.randn(3, 32)
    fused = Int8Linear(torch.cat(ws), kernel)(x).split([48, 16, 16], dim=-1)
    for part, w in zip(fused, ws, strict=True):
        assert torch.equal(part, Int8Linear(w, kernel)(x))


def test_int8_packed_in_row_blocks_gives_the_same_products(monkeypatch):
    """A weight packed in blocks of rows, on several threads (as the head is), gives the one-block numbers."""
    from nanogemma import quantize

    w, x = torch.randn(100, 32), torch.randn(3, 32)
    whole = Int8Linear(w)
    monkeypatch.setattr(quantize, "_PACK_ROWS", 16)
    blocks = Int8Linear(w, workers=2)
    assert len(whole.packed) == 1 and len(blocks.packed) == 7
    assert torch.equal(blocks(x), whole(x)) and torch.equal(blocks.dequantized(), whole.dequantized())
    blocked = quantize_model(tiny_model(), "int8")  # the head in blocks, the layers on two threads
    monkeypatch.setattr(quantize, "_PACK_ROWS", 1 << 30)
    single = quantize_model(tiny_model(), "int8")
    assert len(blocked.lm_head.packed) > 1 and len(single.lm_head.packed) == 1
    ids = torch.tensor([[2, 30, 40, 50]])
    with torch.inference_mode():
        assert torch.equal(blocked(ids), single(ids))


def test_quantized_model_is_fused_and_matches_the_unfused_product():
    ref = tiny_model()
    q = quantize_model(tiny_model(), "int8")
    attn, mlp = q.layers[0].attn, q.layers[0].mlp
    assert isinstance(attn.wqkv, Int8Linear) and isinstance(mlp.gate_up, Int8Linear)
    assert getattr(attn, "wq", None) is None and getattr(mlp, "up", None) is None  # the float weights are not kept alongside
    w = torch.cat([ref.layers[0].attn.wq.weight, ref.layers[0].attn.wk.weight, ref.layers[0].attn.wv.weight])
    torch.testing.assert_close(attn.wqkv.dequantized(), w, rtol=0, atol=float(w.detach().abs().max()) / 127)


def test_int8_linear_dequantized_round_trips():
    w = torch.randn(40, 32)
    for kernel in ("int8", "int8-wo"):
        lin = Int8Linear(w, kernel)
        assert (lin.dequantized() - w).abs().max() <= w.abs().amax(1).max() / 127  # within one step


def test_load_for_inference_prepares_the_model_beside_the_tokenizer(tiny_hf, monkeypatch):
    from nanogemma import tokenizer
    from nanogemma.errors import NanogemmaError
    from nanogemma.weights import load, load_for_inference

    events = []
    real = tokenizer.load_tokenizer

    def logged_tokenizer(path):
        events.append("tokenizer")
        return real(path)

    def prepare(model, go):
        events.append(threading.current_thread() is not threading.main_thread())
        go.set()  # from here on the tokenizer may load
        time.sleep(0.2)
        events.append("prepared")

    monkeypatch.setattr(tokenizer, "load_tokenizer", logged_tokenizer)
    load(tiny_hf, prepare=prepare)
    assert events == [True, "tokenizer", "prepared"]  # in parallel, and load waited for prepare
    events.clear()
    load(tiny_hf, prepare=lambda model, go: events.append("no go"))  # returning also lets it go on
    assert events == ["no go", "tokenizer"]

    def fail(model, go):
        raise NanogemmaError("packing failed")

    with pytest.raises(NanogemmaError, match="packing failed"):  # an error there is the caller's error
        load(tiny_hf, prepare=fail)
    packed, _ = load_for_inference(str(tiny_hf))
    assert isinstance(packed.layers[1].mlp.gate_up, PackedLinear) == PackedLinear.available(torch.zeros(1))
    q, _ = load_for_inference(str(tiny_hf), quantize="int8")
    assert isinstance(q.layers[1].attn.wqkv, Int8Linear) and isinstance(q.lm_head, Int8Linear)
    assert q.lm_head.input_scale is not None  # dynamic int8 was calibrated on the shipped passage
    unpacked, _ = load_for_inference(str(tiny_hf), pack=False)
    assert getattr(unpacked.layers[1].attn, "wqkv", None) is None


def test_loading_does_not_import_torch_dynamo(tiny_hf):
    """Start-up stays lean: building a model never imports torch._dynamo (a second of every start)."""
    code = ("import sys; from nanogemma.weights import load_for_inference; "
            f"load_for_inference({str(tiny_hf)!r}); print('torch._dynamo' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"


@needs_onednn
def test_generate_decodes_a_plain_model_through_its_packed_twin():
    """The library's `generate` reaches the packed kernels by itself, and leaves the model a plain module."""
    from nanogemma.generation import generate, generate_batch
    from nanogemma.quantize import converted, packed_view

    model, tok = tiny_model(), ByteTok()
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    twin = packed_view(model)
    assert twin is not model and converted(twin) and not converted(model)
    assert isinstance(twin.layers[0].attn.wqkv, PackedLinear) and isinstance(model.layers[0].attn.wq, torch.nn.Linear)
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before  # the model's own weights, untouched
    assert twin.embed is model.embed and twin.lm_head.weight.data_ptr() == model.embed.weight.data_ptr()
    assert packed_view(model) is twin  # built once
    prompt = tok.encode("Once upon")
    fast = tok.encode(generate(model, tok, "Once upon", max_new_tokens=40), add_bos=False)
    plain = tok.encode(generate(model, tok, "Once upon", max_new_tokens=40, fast=False), add_bos=False)
    assert_same_greedy(model, prompt, fast, plain, what="packed twin vs plain")
    # Training changes the weights in place: the next generation sees them, through a rebuilt twin.
    with torch.no_grad():
        model.layers[0].mlp.down.weight.mul_(-1)
    assert packed_view(model) is not twin
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        torch.testing.assert_close(packed_view(model)(ids), model(ids), rtol=0, atol=1e-4)
    assert packed_view(quantize_model(tiny_model())).lm_head.__class__ is Int8Linear  # converted: left as it is
    with pytest.raises(NanogemmaError, match="one prompt"):
        generate(model, tok, ["a", "b"])
    with pytest.raises(NanogemmaError, match="list of prompts"):
        generate_batch(model, tok, "ab")


def test_int8_rounds_each_row_on_its_own_scale():
    """A multi-row int8 call (a prompt's positions) rounds each row's activations on that row's own scale,
    so one outlier row (Gemma's first positions) cannot coarsen the others. Bound, from the kernel's
    arithmetic (exact integer products): against the float64 product with the same int8 weights, an output
    of row i errs by at most half an activation step, 2·max|x_i|/127 / 2 (7-bit activations over the
    row's normalised range [-1, 1]), times the sum of |w| over its inputs, plus float32 rounding."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g)
    x = torch.randn(5, 64, generator=g)
    x[0] *= 1000.0  # the outlier
    lin = Int8Linear(w, "int8")
    deq = lin.dequantized().double()
    y, exact = lin(x).double(), x.double() @ deq.t()
    step = 2 * x.double().abs().amax(1, keepdim=True) / 127
    bound = step / 2 * deq.abs().sum(1)[None, :] * 1.001 + 1e-4 * exact.abs()
    assert ((y - exact).abs() <= bound).all()
    # one scale for the whole call would give rows 1..4 the outlier's step: a thousand times coarser
    assert (step[1:] * 100 < step[0]).all()


def _outlier_activations(rows: int, g: torch.Generator) -> torch.Tensor:
    """Activations shaped like Gemma's normed hidden states: a few input channels far above the rest."""
    x = torch.randn(rows, 64, generator=g)
    x[:, [5, 40, 41]] *= 60.0
    return x


def test_int8_input_scale_keeps_the_product():
    """Int8Linear(w, input_scale=c) rounds x·c and the rows of w/c: the product is still x·wᵀ.

    Bound, from the kernel's arithmetic (exact integer sums of products): with x' = x·c and w' = w/c,
    each entry of x' errs by at most half a 7-bit step over its row's range, e_i = max|x'_i| / 127, each
    weight by half its row's step, d_o = max|w'_o| / 254, so an output errs from the float64 x·wᵀ by at
    most e_i Σ|w'_o| + d_o (Σ|x'_i| + 64 e_i), plus float32 rounding. Multi-row and single-row calls
    (prompt and decode step) both hold it."""
    from nanogemma.quantize import smoothing_scale

    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 64, generator=g)
    x = _outlier_activations(5, g)
    c = smoothing_scale(_outlier_activations(32, g).pow(2).mean(0).sqrt(), w)
    lin = Int8Linear(w, "int8", input_scale=c)
    assert torch.equal(lin.input_scale, c)
    xs, ws = x.double() * c.double(), w.double() / c.double()
    e = xs.abs().amax(1, keepdim=True) / 127
    d = ws.abs().amax(1)[None, :] / 254
    bound = e * ws.abs().sum(1)[None, :] + d * (xs.abs().sum(1, keepdim=True) + 64 * e)
    exact = x.double() @ w.double().t()
    bound = bound * 1.001 + 1e-4 * (xs.abs() @ ws.abs().t())
    for y in (lin(x), torch.cat([lin(row[None]) for row in x])):
        assert ((y.double() - exact).abs() <= bound).all()
    # the float weight it stands for is w, each entry within half a step of w' times c
    assert ((lin.dequantized().double() - w.double()).abs() <= d.t() * c.double()[None, :] * 1.001).all()
    head = lin.rows(torch.tensor([3, 0, 50]))  # a draft head's rows keep the scale: the same logits
    assert torch.equal(head(x), lin(x)[:, [3, 0, 50]])
    assert Int8Linear(w, "int8-wo", input_scale=c).input_scale is None  # weight-only int8 rounds no x


def test_int8_input_scale_helps_outlier_channels():
    """With a few outlier channels, per-row rounding gives the other channels few levels; the calibrated
    scale (from other activations than the ones tested) evens them out: the error against float64 drops."""
    from nanogemma.quantize import smoothing_scale

    g = torch.Generator().manual_seed(2)
    w = torch.randn(96, 64, generator=g)
    x = _outlier_activations(16, g)
    c = smoothing_scale(_outlier_activations(64, g).pow(2).mean(0).sqrt(), w)  # as `input_magnitudes`
    exact = x.double() @ w.double().t()
    plain = (Int8Linear(w, "int8")(x).double() - exact).norm()
    smooth = (Int8Linear(w, "int8", input_scale=c)(x).double() - exact).norm()
    assert smooth < 0.5 * plain, (float(smooth), float(plain))


def test_quantize_model_calibrates_the_dynamic_kernel():
    """With calibration ids every projection and the head of a dynamic-int8 model get an input scale,
    measured on the plain model, and the model still computes the float model's product."""
    ref = tiny_model()
    ids = torch.tensor([[2, 30, 40, 50, 60, 70, 80, 90]])
    q = quantize_model(tiny_model(), "int8", calibration=torch.arange(3, 60))
    layers = [q.lm_head] + [m for b in q.layers for m in (b.attn.wqkv, b.attn.wo, b.mlp.gate_up, b.mlp.down)]
    assert all(m.input_scale is not None and (m.input_scale > 0).all() for m in layers)
    plain = quantize_model(tiny_model(), "int8")
    assert plain.lm_head.input_scale is None
    with torch.inference_mode():
        a, b = ref(ids), q(ids)
    assert (a - b).norm() < 0.15 * a.norm()  # as for the uncalibrated model (tests/test_generate.py)
    assert quantize_model(tiny_model(), "int8-wo", calibration=ids).lm_head.input_scale is None
