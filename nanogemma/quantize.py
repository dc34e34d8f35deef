"""Faster weights for CPU decoding: float32 prepacked for oneDNN, or int8.

Decoding one token reads every weight once and does little arithmetic with it, so at batch 1 its speed is
set by memory traffic: bytes of weights per token, and how close to the memory's bandwidth the kernels
stream them. The 270M model's largest tensor is the tied 262,144 x 640 output head (168M of its 268M
parameters: 671 MB in float32).

**Packed float32** (`PackedLinear`, the default of `generate`, `chat` and `bench` on a CPU): the same
numbers, stored once in oneDNN's blocked layout, which a matrix-vector product streams at about twice the
speed of `F.linear` (which re-packs the weight on every call).

**Int8** stores weights with one float scale per output row, quartering the bytes:

    w[o, :] ~= q[o, :] * scale[o],   q in [-127, 127],   scale[o] = max|w[o, :]| / 127

Two kernels are offered, both from PyTorch itself:

* `int8` — **dynamic** int8 (fbgemm's packed-weight `quantized::linear_dynamic`): each call also rounds
  the activations to 7 bits (one scale per row, computed on the fly), then multiplies integers with
  AVX2. The fastest on x86 CPUs; the activation rounding adds a little error on top of the weights'.
  A few input channels of Gemma's activations are far larger than the others and would set each row's
  scale, so each layer first multiplies x by a per-channel `input_scale` c, measured once at load on a
  short shipped passage, and its weight holds w / c instead (`smoothing_scale`): the same product, with
  the rounding spread more evenly between activations and weights.
* `int8-wo` — **weight-only** int8 (`aten._weight_int8pack_mm`): activations stay in floating point and
  the int8 weights are converted inside the kernel. More exact, slower on CPUs without AVX-512; it is also
  the kernel on CUDA.

The embedding lookup keeps the model's own table (exact inputs); only the head that reuses it is quantized.
"""

from __future__ import annotations

import copy
import itertools
import threading
import warnings
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import NanogemmaError
from .model import MLP, Attention, Gemma, TiedHead

MODES = ("int8", "int8-wo")
SMOOTHING_ALPHA = 0.7  # the activations' share in `smoothing_scale`: the best measured (docs/BENCHMARKS.md)

# torch.compile cannot trace fbgemm's packed weights (an opaque C++ object), so compiled code reaches them
# through an opaque op that takes the layer's key. It is registered with the low-level `torch.library.Library`
# API: `torch.library.custom_op` wraps each call in Python that costs about as much as the int8 product itself.
# Eager code calls fbgemm directly.
_LAYERS: weakref.WeakValueDictionary[int, Int8Linear] = weakref.WeakValueDictionary()
_KEYS = itertools.count()
_LIB = torch.library.Library("nanogemma", "DEF")
_LIB.define("int8_linear(Tensor x, int key, int out_features) -> Tensor")
_LIB.impl("int8_linear", lambda x, key, out_features: _LAYERS[key].dynamic(x), "CPU")
_LIB.impl("int8_linear", lambda x, key, out_features: x.new_empty(x.shape[0], out_features), "Meta")
_int8_linear = torch.ops.nanogemma.int8_linear


def quantize_rows(w: Tensor, input_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8: (q int8 (O, I), scale float32 (O,)) with w ~= q * scale[:, None]; with
    `input_scale` c (I,), of w / c instead."""
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for i in range(0, w.shape[0], 4096):  # in blocks: the float temporaries stay small and in cache
        block = w[i:i + 4096].float() if input_scale is None else w[i:i + 4096].float() / input_scale
        s = (block.abs().amax(dim=1) / 127.0).clamp_(min=1e-12)  # an all-zero row must not divide by zero
        q[i:i + 4096] = (block / s[:, None]).round_().clamp_(-127, 127)  # not in place: block may be w
        scale[i:i + 4096] = s
    return q, scale


_PACK_ROWS = 65_536


def _prepack(weight: Tensor, input_scale: Tensor | None = None) -> object:
    """fbgemm's packed form of per-row int8 `weight` (/ `input_scale`; opaque: not a state-dict tensor)."""
    return _prepack_rows(*quantize_rows(weight, input_scale))


def _prepack_rows(q: Tensor, scale: Tensor) -> object:
    with warnings.catch_warnings():  # quantized tensor types are deprecated, the fbgemm ops are not
        warnings.simplefilter("ignore", UserWarning)
        zero = torch.zeros_like(scale, dtype=torch.long)
        return torch.ops.quantized.linear_prepack(torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0),
                                                  None)


class Int8Linear(nn.Module):
    """A bias-free linear layer over int8 weights; see the module docstring for the two kernels."""

    def __init__(self, weight: Tensor, kernel: str = "int8", workers: int = 1,
                 rows: tuple[Tensor, Tensor] | None = None, input_scale: Tensor | None = None):
        super().__init__()
        if kernel not in MODES:
            raise NanogemmaError(f"unknown int8 kernel '{kernel}'; choose from: {', '.join(MODES)}")
        self.out_features, self.in_features = weight.shape
        self.kernel = kernel if weight.device.type == "cpu" else "int8-wo"  # fbgemm is CPU-only
        self._unpacked: tuple[Tensor, Tensor] | None = None  # `rows()`'s copy of (q, scale), made on first use
        # `input_scale` (c, one per input channel; see `smoothing_scale`): x * c is rounded and multiplied
        # by the rows of weight / c, the same product. Only the dynamic kernel rounds x, so only it takes c.
        c = None
        if input_scale is not None and self.kernel == "int8":
            c = input_scale.detach().to(weight.device, torch.float32)
        self.register_buffer("input_scale", c)
        if self.kernel == "int8":
            # fbgemm packs one matrix on one core, so a large weight is packed in blocks of rows, `workers`
            # at a time; the products are the same, column for column, since every block rounds the same x
            # the same way. `rows`, already quantized (q, scale), are packed as they are (see `rows()`).
            if rows is not None:
                self.packed = [_prepack_rows(*rows)]
            else:
                blocks = weight.detach().split(_PACK_ROWS)
                with ThreadPoolExecutor(max(1, min(workers, len(blocks)))) as pool:
                    self.packed = list(pool.map(lambda block: _prepack(block, c), blocks))
            self.key = next(_KEYS)
            _LAYERS[self.key] = self
        else:
            q, scale = quantize_rows(weight.detach()) if rows is None else rows
            self.register_buffer("q", q.to(weight.device))
            self.register_buffer("scale", scale.to(weight.device))

    def int8_rows(self) -> tuple[Tensor, Tensor]:
        """(q, scale): the int8 rows and their scales."""
        if self.kernel == "int8-wo":
            return self.q, self.scale
        ws = [torch.ops.quantized.linear_unpack(p)[0] for p in self.packed]
        return (torch.cat([w.int_repr() for w in ws]),
                torch.cat([w.q_per_channel_scales() for w in ws]).float())

    def rows(self, ids: Tensor) -> Int8Linear:
        """The same kernel over rows `ids` only, with the very same int8 numbers (a draft head's logits are
        the full head's for its tokens).

        A draft head asks again each time a token joins its set, so the unpacked rows are kept after the
        first call: unpacking fbgemm's form of the whole 262,144-row head on every new token made eager
        speculation slower than plain int8 (docs/BENCHMARKS.md). The copy costs the head's int8 size again."""
        if self._unpacked is None:
            self._unpacked = self.int8_rows()
        q, scale = self._unpacked
        q, scale = q[ids.to(q.device)], scale[ids.to(q.device)]
        # `weight` only gives the shape and device here
        return Int8Linear(q, self.kernel, rows=(q, scale), input_scale=self.input_scale)

    def weight_bytes(self) -> int:
        extra = 0 if self.input_scale is None else 4 * self.in_features
        return self.in_features * self.out_features + 4 * self.out_features + extra

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"

    def dequantized(self) -> Tensor:
        """The float32 weight (O, I) these int8 rows stand for (with the input scale folded back in)."""
        if self.kernel == "int8":
            w = torch.cat([torch.ops.quantized.linear_unpack(p)[0].dequantize() for p in self.packed])
            return w if self.input_scale is None else w * self.input_scale
        return self.q.float() * self.scale[:, None]

    def dynamic(self, x: Tensor) -> Tensor:
        if x.shape[0] > 1:
            # fbgemm rounds a call's activations with one scale, set by its largest value. Across the
            # positions of a prompt that scale is a few outliers' (Gemma's first positions carry activations
            # orders of magnitude above the others'), and every other row is rounded to a handful of levels:
            # the perplexity of a long text doubles. The product is linear in each row, so each row is
            # brought to a largest magnitude of 1 first and scaled back after: each is rounded on its own
            # scale, as a single row (a decode step) always is.
            m = x.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
            return self._fbgemm(x / m).mul_(m)
        return self._fbgemm(x)

    def _fbgemm(self, x: Tensor) -> Tensor:
        # reduce_range: 7-bit activations. AVX2's int8 multiply-add sums pairs of products into int16,
        # which full-range uint8 x int8 products overflow (saturate): errors of several percent.
        if len(self.packed) == 1:
            return torch.ops.quantized.linear_dynamic(x, self.packed[0], True)
        return torch.cat([torch.ops.quantized.linear_dynamic(x, p, True) for p in self.packed], dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.kernel == "int8":
            x2 = x2.float()
            if self.input_scale is not None:
                x2 = x2 * self.input_scale
            if torch.compiler.is_compiling():
                y = _int8_linear(x2, self.key, self.out_features)
            else:
                y = self.dynamic(x2)
            y = y.to(x.dtype)
        elif x.device.type == "cpu" and x.dtype == torch.float32:
            # On CPU the weight-only kernel is far faster with bfloat16 activations; results go back to fp32.
            y = torch.ops.aten._weight_int8pack_mm(x2.bfloat16(), self.q, self.scale.bfloat16()).float()
        else:
            try:
                y = torch.ops.aten._weight_int8pack_mm(x2, self.q, self.scale.to(x.dtype))
            except (RuntimeError, NotImplementedError):  # devices without the kernel: dequantize on the fly
                y = F.linear(x2, self.q.to(x.dtype)) * self.scale.to(x.dtype)
        return y.view(*shape, self.out_features)


def native_bf16() -> bool:
    """Whether oneDNN runs bfloat16 products on this CPU's own BF16 instructions (AVX512-BF16 or AMX), not
    emulated: the condition for packing a bfloat16 model. It honours ONEDNN_MAX_CPU_ISA."""
    from .machine import cpu_info

    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False
    return bool({"AVX512-BF16", "AMX-BF16"} & set(cpu_info()["isa"]))


class PackedLinear(nn.Module):
    """A bias-free linear layer whose weight is stored in oneDNN's blocked layout, packed once.

    The same float32 arithmetic as `F.linear` (results differ only in summation order, ~1e-6 relative),
    but a general matrix product re-packs its weight into cache-sized panels on every call: for the
    262,144 x 640 head that is 671 MB copied per token. Packed once, the head's matrix-vector product
    streams at about twice the speed, and a product with k rows (speculative decoding's check) costs
    little more than one. This is the kernel torch.compile's CPU backend uses for frozen linear weights.
    `weight` keeps the plain tensor (for a tied head, the embedding table itself: nothing is copied twice)
    unless `keep_weight=False`, for a weight nothing else needs (a fused copy made only to be packed).

    bfloat16 weights are packed too where the CPU has BF16 instructions (`native_bf16`): the products then
    run on them (AVX512-BF16 dot products or AMX tiles) with float32 sums, as `F.linear` does in bfloat16.
    """

    def __init__(self, weight: Tensor, rows_hint: int = 8, keep_weight: bool = True):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight.detach() if keep_weight else None
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows_hint)

    def rows(self, ids: Tensor) -> PackedLinear:
        """The same kernel over rows `ids` of the weight only (kept unless `keep_weight=False`)."""
        return PackedLinear(self.weight[ids].contiguous())

    def weight_bytes(self) -> int:
        return self.in_features * self.out_features * self.packed.element_size()

    @staticmethod
    def available(weight: Tensor) -> bool:
        if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
            return False
        return weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16 and native_bf16())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel=onednn-packed"

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape[:-1]
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.packed, None, "none", [], "")
        return y.view(*shape, self.out_features)


# Builds a fused projection's kernel from (its weight, the float layer whose input it takes).
Make = Callable[[Tensor, nn.Module], nn.Module]


class FusedAttention(Attention):
    """Attention whose q, k and v come from one product: one pass over x, one kernel call, not three."""

    def __init__(self, attn: Attention, make: Make):
        nn.Module.__init__(self)
        self.num_heads, self.num_kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.window, self.scale, self.q_norm, self.k_norm = attn.window, attn.scale, attn.q_norm, attn.k_norm
        with torch.no_grad():
            self.wqkv = make(torch.cat([attn.wq.weight, attn.wk.weight, attn.wv.weight]), attn.wq)
            self.wo = make(attn.wo.weight, attn.wo)
        self.sizes = [attn.wq.out_features, attn.wk.out_features, attn.wv.out_features]

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.wqkv(x).split(self.sizes, dim=-1)


class FusedMLP(MLP):
    """The MLP with gate and up from one product."""

    def __init__(self, mlp: MLP, make: Make):
        nn.Module.__init__(self)
        with torch.no_grad():
            self.gate_up = make(torch.cat([mlp.gate.weight, mlp.up.weight]), mlp.gate)
            self.down = make(mlp.down.weight, mlp.down)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.gate_up(x).chunk(2, dim=-1)


def _convert(model: Gemma, make: Make, workers: int = 1) -> None:
    """Swap every block's attention and MLP for fused ones whose projections are `make(weight)`.

    A fused product reads the same weights in one kernel call instead of three (or two): at batch 1 each
    call has a fixed cost (the int8 kernel rounds the activations, oneDNN sets up its panels) that is a
    large share of a small matrix-vector product. The results are the same, row for row: every output row
    still comes from its own weight row, and int8 rounds x once per call either way. `make(weight, source)`
    gets the fused weight and the float layer whose input the product takes; it runs on `workers` threads
    (torch ops release the GIL while they work).
    """
    def convert(block: nn.Module) -> None:
        block.attn = FusedAttention(block.attn, make)  # the separate weights go with the old modules
        block.mlp = FusedMLP(block.mlp, make)

    with ThreadPoolExecutor(workers) as pool:  # a block at a time per worker: few float copies alive at once
        list(pool.map(convert, model.layers))


def pack_model(model: Gemma, go: threading.Event | None = None) -> Gemma:
    """Give a CPU model `PackedLinear` projections and head, in place: float32 always, bfloat16 where the CPU
    has BF16 instructions (a no-op where oneDNN cannot).

    `go`, if given, is set just before the head's reorder: one long torch op over the 671 MB table
    that does not hold the GIL, so another thread may then go on (see `weights.load`)."""
    head = getattr(model.lm_head, "weight", None)  # the embedding table when tied; None once quantized
    if head is None or not PackedLinear.available(head):
        return model
    if go is not None:
        go.set()
    try:
        packed_head = PackedLinear(head)
    except (RuntimeError, NotImplementedError):  # a CPU or build without the packed kernel: keep F.linear
        return model
    _convert(model, lambda w, _source: PackedLinear(w, keep_weight=False))
    model.lm_head = packed_head
    return model


def converted(model: Gemma) -> bool:
    """Whether inference kernels were already swapped into `model` (packed or int8)."""
    return not isinstance(model.lm_head, (nn.Linear, TiedHead))


# One packed twin per plain model, rebuilt when its weights change (training, `load_state_dict`, `.to()`).
_VIEWS: weakref.WeakKeyDictionary[Gemma, tuple[tuple, Gemma]] = weakref.WeakKeyDictionary()


def _weights_signature(model: Gemma) -> tuple:
    # `_version` counts in-place writes (an optimizer step, `copy_`); data_ptr and dtype see replaced tensors.
    return tuple((p.data_ptr(), p._version, p.dtype) for p in model.parameters())


def packed_view(model: Gemma) -> Gemma:
    """A twin of a plain CPU model with packed kernels, for generation; `model` itself is left as it is.

    `nanogemma.generate` decodes through this, so a library user gets the CLI's speed while `model(ids)`
    stays the plain module that trains, saves and inspects as before. The twin shares the embedding, the
    norms and the RoPE buffers; its packed copies of the projections and the head cost about the model's
    size again in memory (`weights.load_for_inference` packs in place instead, as the CLI does). It is built
    once and rebuilt when any weight of `model` has changed since. Models that cannot be packed (CUDA,
    float16, a CPU without oneDNN, already converted ones) are returned unchanged.
    """
    head = getattr(model.lm_head, "weight", None)
    if converted(model) or head is None or not PackedLinear.available(head):
        return model
    signature = _weights_signature(model)
    hit = _VIEWS.get(model)
    if hit is not None and hit[0] == signature:
        return hit[1]
    _VIEWS.pop(model, None)  # the stale twin's memory goes before the new one is built
    twin = copy.copy(model)
    twin._modules = dict(model._modules)  # a shallow copy would share (and so swap into) the model's own dict
    twin.layers = nn.ModuleList(copy.copy(block) for block in model.layers)
    for block in twin.layers:
        block._modules = dict(block._modules)
    try:
        pack_model(twin)
    except (RuntimeError, NotImplementedError):
        return model
    _VIEWS[model] = (signature, twin)
    return twin


def calibration_text() -> str:
    """The passage dynamic int8 measures activations on (`nanogemma/calibration.txt`): about 150 tokens
    of prose, a recipe, a question and answer, code, a letter and two other languages, written for this
    package (no evaluation text: a perplexity measured on it would flatter the scales). Short, because its
    forward is paid at every load; a passage of 400 tokens measured little better (docs/BENCHMARKS.md)."""
    return (Path(__file__).parent / "calibration.txt").read_text(encoding="utf-8")


def input_magnitudes(model: Gemma, ids: Tensor) -> dict[nn.Module, Tensor]:
    """The root-mean-square of each input channel j that every projection (and the head) sees in one
    forward of the plain model over `ids` (1, T), keyed by the float layer taking x (`model.lm_head` for
    the head). A mean, not a maximum: the channels that matter are the ones large on every row, and one
    odd token of the calibration text should not decide a channel's scale."""
    found: dict[nn.Module, Tensor] = {}

    def rms(x: Tensor) -> Tensor:
        return x.detach().flatten(0, -2).float().pow(2).mean(0).sqrt()

    layers = [m for block in model.layers for m in (block.attn.wq, block.attn.wo, block.mlp.gate, block.mlp.down)]
    hooks = [m.register_forward_pre_hook(lambda layer, args: found.__setitem__(layer, rms(args[0])))
             for m in layers]
    try:
        with torch.no_grad():  # the blocks, then the final norm: the head's product itself is not needed
            found[model.lm_head] = rms(model.final_norm(model.hidden(ids)))
    finally:
        for h in hooks:
            h.remove()
    return found


def _column_range(weights: Sequence[Tensor]) -> Tensor:
    """max |w[:, j]| over the rows of all `weights` (the parts of one fused product), a block at a time."""
    out = None
    for w in weights:
        for block in w.detach().split(_PACK_ROWS):
            r = block.abs().amax(0).float()
            out = r if out is None else torch.maximum(out, r)
    return out


def smoothing_scale(x_size: Tensor, weights: Tensor | Sequence[Tensor], alpha: float = SMOOTHING_ALPHA) -> Tensor:
    """Per-input-channel c for `Int8Linear(weight, input_scale=c)`: c_j = max|w_j|^(1-a) / |x_j|^a.

    Dynamic int8 rounds each row of x on one scale, set by its largest entry. In Gemma a few input channels
    (of the normed hidden states, and of the MLP's intermediate) are far larger than the rest, so they set
    that scale and the other channels get a handful of levels. x * c evens the channels out; the weight's
    columns take 1/c, where per-output-row rounding absorbs it (SmoothQuant's migration of the difficulty
    from activations to weights, with `alpha` its share). `x_size` is each channel's typical magnitude in
    calibration (`input_magnitudes`; SmoothQuant takes the maximum, which measured worse here: see
    docs/BENCHMARKS.md); `weights`, the weight or the parts of a fused one (they share its columns).
    Channels silent in calibration, or in the weight, get a floor, so that c stays finite.
    """
    wr = _column_range([weights] if isinstance(weights, Tensor) else weights)
    xr = x_size.float()
    xr, wr = xr.clamp_min(float(xr.max()) * 1e-5 + 1e-30), wr.clamp_min(float(wr.max()) * 1e-5 + 1e-30)
    return wr.pow(1 - alpha) / xr.pow(alpha)


def quantize_model(model: Gemma, mode: str = "int8", calibration: Tensor | None = None) -> Gemma:
    """Replace every projection and the output head by `Int8Linear`, in place; returns the model.

    `calibration` (token ids, (1, T) or (T,)), for the dynamic kernel: one forward over them measures each
    projection's input channels first, and each layer then rounds x * c (see `smoothing_scale`); without
    it each row of x is rounded as it comes."""
    if mode not in MODES:
        raise NanogemmaError(f"unknown quantization '{mode}'; choose from: {', '.join(MODES)}")
    sizes: dict[nn.Module, Tensor] = {}
    if mode == "int8" and calibration is not None and model.device.type == "cpu":  # elsewhere: int8-wo
        sizes = input_magnitudes(model, calibration.reshape(1, -1)[:, :model.config.max_seq_len])

    def make(w: Tensor, source: nn.Module) -> Int8Linear:
        # A fused weight holds all the parts that share its input columns, so its own column range is theirs.
        c = smoothing_scale(sizes[source], w) if source in sizes else None
        return Int8Linear(w, mode, workers if source is model.lm_head else 1, input_scale=c)

    workers = torch.get_num_threads()  # fbgemm packs on one core: spread the matrices over all of them
    with torch.no_grad():
        head = make(model.lm_head.weight, model.lm_head)
    _convert(model, make, workers)
    model.lm_head = head
    return model
