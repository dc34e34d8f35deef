"""Check nanogemma against the reference implementation (transformers), step by step, on any checkpoint.

Both models run the same token ids. Forward hooks record, in each, the activations at the same places:

    embedding            ids -> vectors, already scaled by sqrt(hidden)
    layer i attention    the attention branch's contribution to the residual stream:
                         post_attn_norm(attention(input_norm(x)))
    layer i MLP          the MLP branch's contribution: post_ffw_norm(mlp(pre_ffw_norm(h)))
    final norm           the last RMSNorm's output
    logits               the model's output

Recording whole branches (their norms included) partitions the model: a bug anywhere in the block shows
up first in the row of the branch that contains it, and every row after it inherits the error. So the
*first* row past the tolerance is where to look.

Differences are measured relative to the activation scale, not element by element: Gemma's residual
stream reaches ~1e5 in a few channels, where float32 rounding alone is ~1e-2 in absolute terms, while
elementwise relative error is meaningless near zero. So each row reports max |ours - ref| and that
divided by max |ref| ("relative"), and the tolerance applies to the latter.

The reference loads each format its own way, so the check covers our weight loading as well as the
maths: a GGUF through transformers' GGUF reader, a Hugging Face folder through `from_pretrained`, and a
nanogemma run folder (which transformers cannot read) through `Gemma3ForCausalLM` given our state dict in
HF names. The reference uses its default attention kernel (sdpa), as nanogemma does; its "eager" kernel
rounds differently (≈2e-8 relative on the 270M model).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import NanogemmaError
from .inspect_model import format_table

DEFAULT_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
DEFAULT_PROMPT = (
    "The old lighthouse keeper climbed the spiral stairs every evening, counting the steps as his father "
    "had taught him. Two hundred and twelve. At the top he wiped the salt from the great lens, lit the "
    "lamp, and watched the beam sweep across the water toward ships he would never see."
)


@dataclass
class Row:
    name: str
    max_abs: float
    ref_scale: float  # max |ref|

    @property
    def rel(self) -> float:
        return self.max_abs / self.ref_scale if self.ref_scale > 0 else (0.0 if self.max_abs == 0 else float("inf"))


@dataclass
class Report:
    rows: list[Row]
    tolerance: float
    num_tokens: int
    top1_agreement: float  # fraction of positions where both models predict the same next token
    notes: list[str] = field(default_factory=list)

    @property
    def first_divergence(self) -> Row | None:
        return next((r for r in self.rows if not r.rel <= self.tolerance), None)  # `not <=` catches NaN

    @property
    def passed(self) -> bool:
        return self.first_divergence is None

    def table(self) -> str:
        first = self.first_divergence
        rows = []
        for r in self.rows:
            flag = "" if r.rel <= self.tolerance else "<- FIRST DIVERGENCE" if r is first else "x"
            rows.append([r.name, f"{r.max_abs:.3g}", f"{r.ref_scale:.3g}", f"{r.rel:.2e}", flag])
        lines = [*self.notes, format_table(["step", "max |ours-ref|", "max |ref|", "relative", ""], rows, {1, 2, 3}), ""]
        agree = f"top-1 next-token agreement {self.top1_agreement:.2%} of {self.num_tokens} positions"
        if first is None:
            lines.append(f"PASS: every step within relative tolerance {self.tolerance:g}; {agree}")
        else:
            lines.append(f"FAIL: first divergence at '{first.name}' (relative {first.rel:.2e} > tolerance "
                         f"{self.tolerance:g}); look there first, later rows inherit the error; {agree}")
        return "\n".join(lines)


# -------------------------------------------------------------------------------------------- capture


def _capture(model: nn.Module, ids: Tensor, outputs: list[tuple[str, nn.Module]],
             inputs: list[tuple[str, nn.Module]] = ()) -> dict[str, Tensor]:
    """Run `model(ids)`, recording the outputs of the `outputs` modules, the first input of the `inputs`
    modules, and the logits (all as float32 on the CPU)."""
    store: dict[str, Tensor] = {}

    def keep(name: str, t: Tensor | tuple) -> None:
        store[name] = (t[0] if isinstance(t, tuple) else t).detach().float().cpu()

    handles = [m.register_forward_hook(lambda _m, _a, out, n=n: keep(n, out)) for n, m in outputs]
    handles += [m.register_forward_pre_hook(lambda _m, args, n=n: keep(n, args)) for n, m in inputs]
    try:
        with torch.inference_mode():
            out = model(ids)
    finally:
        for h in handles:
            h.remove()
    keep("logits", out if isinstance(out, Tensor) else out.logits)
    return store


def site_names(layer_types: list[str] | tuple[str, ...]) -> list[str]:
    """Row names in model order."""
    names = ["embedding"]
    for i, t in enumerate(layer_types):
        names += [f"layer {i} attention ({t})", f"layer {i} MLP"]
    return names + ["final norm", "logits"]


def capture_ours(model: nn.Module, ids: Tensor) -> dict[str, Tensor]:
    """nanogemma's activations at every site. The embedding is the first block's input (already scaled)."""
    sites = []
    for i, block in enumerate(model.layers):
        sites += [(f"layer {i} attention ({block.layer_type})", block.post_attn_norm),
                  (f"layer {i} MLP", block.post_ffw_norm)]
    sites.append(("final norm", model.final_norm))
    # Our embedding is a method, not a module: its output is the first block's input.
    return _capture(model, ids.to(model.device), sites, inputs=[("embedding", model.layers[0])])


def _text_model(ref: nn.Module) -> nn.Module:
    """The decoder stack inside a transformers model (Gemma3ForCausalLM or the multimodal wrapper)."""
    for m in ref.modules():
        if all(hasattr(m, a) for a in ("embed_tokens", "layers", "norm")):
            return m
    raise NanogemmaError("the reference model has no decoder stack (embed_tokens, layers, norm); "
                         "is it a Gemma 3 model?")


def capture_reference(ref: nn.Module, ids: Tensor, layer_types: list[str] | tuple[str, ...]) -> dict[str, Tensor]:
    """The reference's activations at the same sites, through its own module names."""
    text = _text_model(ref)
    if len(text.layers) != len(layer_types):
        raise NanogemmaError(f"the reference has {len(text.layers)} layers, nanogemma {len(layer_types)}: "
                             "the two do not read the checkpoint's config alike")
    sites = []
    for i, (layer, t) in enumerate(zip(text.layers, layer_types, strict=True)):
        sites += [(f"layer {i} attention ({t})", layer.post_attention_layernorm),
                  (f"layer {i} MLP", layer.post_feedforward_layernorm)]
    sites.append(("final norm", text.norm))
    device = next(ref.parameters()).device
    return _capture(ref, ids.to(device), [("embedding", text.embed_tokens), *sites])


def compare(ours: dict[str, Tensor], ref: dict[str, Tensor], names: list[str], tolerance: float) -> Report:
    rows = []
    for name in names:
        a, b = ours[name], ref[name]
        if a.shape != b.shape:
            raise NanogemmaError(f"'{name}' has shape {tuple(a.shape)} in nanogemma but {tuple(b.shape)} in the "
                                 "reference: the two models do not describe the same architecture")
        rows.append(Row(name, (a - b).abs().max().item(), b.abs().max().item()))
    agree = (ours["logits"].argmax(-1) == ref["logits"].argmax(-1)).float().mean().item()
    return Report(rows, tolerance, ours["logits"].shape[1], agree)


def verify_models(model: nn.Module, ref: nn.Module, ids: Tensor, tolerance: float | None = None,
                  ref_acts: dict[str, Tensor] | None = None) -> Report:
    """Compare `model` (nanogemma) with `ref` (transformers) on `ids` (1, T); `ref_acts` reuses a capture."""
    tolerance = DEFAULT_TOLERANCE.get(model.dtype, 1e-2) if tolerance is None else tolerance
    types = model.config.layer_types
    ref_acts = capture_reference(ref, ids, types) if ref_acts is None else ref_acts
    return compare(capture_ours(model, ids), ref_acts, site_names(types), tolerance)


# -------------------------------------------------------------------------------------------- loading


def input_ids(encode: Callable[[str], list[int]] | None, prompt: str, num_tokens: int | None, cfg) -> Tensor:
    """The prompt's ids (with <bos>), repeated up to `num_tokens` (default: past the sliding window, so it is
    exercised). Without a tokenizer, fixed pseudo-random ids: the arithmetic does not need meaningful text."""
    if encode is None:
        ids = torch.randint(cfg.vocab_size, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    else:
        ids = encode(prompt)
    if num_tokens is None:
        num_tokens = max(len(ids), min(cfg.sliding_window + 32, cfg.max_seq_len))
    if num_tokens < 1 or num_tokens > cfg.max_seq_len:
        raise NanogemmaError(f"--tokens must be between 1 and the model's context ({cfg.max_seq_len}), got {num_tokens}")
    if max(ids) >= cfg.vocab_size:
        raise NanogemmaError(f"the tokenizer produced id {max(ids)} but the model has {cfg.vocab_size} embeddings: "
                             "the model folder's tokenizer does not belong to this model")
    body = ids[1:] if len(ids) > 1 else ids  # repeat the text, not <bos>
    while len(ids) < num_tokens:
        ids = ids + body
    return torch.tensor([ids[:num_tokens]])


def _model_kind(path: Path) -> str:
    if path.is_file():
        return "gguf"
    return "run" if (path / "nanogemma.json").is_file() else "hf"


def load_reference(path: Path, state: dict[str, Tensor], cfg, dtype: torch.dtype, device: str) -> nn.Module:
    """transformers' Gemma 3 on the same checkpoint, read by transformers itself wherever it can."""
    try:
        import transformers
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise NanogemmaError("verify compares against transformers, which is not installed: "
                             "pip install 'nanogemma[dev]' (or pip install transformers)") from None
    kind = _model_kind(path)
    kw = {"dtype": dtype, "attn_implementation": "sdpa"}
    if kind == "gguf":
        ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, **kw)
    elif kind == "hf":
        ref = AutoModelForCausalLM.from_pretrained(str(path), **kw)
    else:
        from ..config import to_hf_config
        from ..weights import hf_state_dict

        hf_cfg = {k: v for k, v in to_hf_config(cfg).items() if k not in ("architectures", "torch_dtype")}
        hf_config = transformers.Gemma3TextConfig(**hf_cfg)
        hf_config._attn_implementation = "sdpa"
        ref = transformers.Gemma3ForCausalLM(hf_config)
        missing, unexpected = ref.load_state_dict(hf_state_dict(state), strict=False)
        if unexpected or any(k != "lm_head.weight" for k in missing):
            raise NanogemmaError(f"{path}: transformers' Gemma 3 does not accept these weights "
                                 f"(missing {missing[:1]}, unexpected {unexpected[:1]})")
        ref = ref.to(dtype)
    return ref.to(device).eval()


def load_pair(name_or_path: str | None, dtype: torch.dtype, device: str):
    """(nanogemma model, text -> ids or None when the checkpoint has no tokenizer, reference model)."""
    from ..weights import build_model, load_state
    from .evaluate import text_encoder

    cfg, state, path = load_state(name_or_path)
    model = build_model(cfg, state, dtype=dtype, device=device, source=str(path))
    try:
        encode = text_encoder(Path(path))
    except NanogemmaError:
        encode = None
    return model, encode, load_reference(Path(path), state, cfg, dtype, device)


def verify(name_or_path: str | None = None, prompt: str = DEFAULT_PROMPT, num_tokens: int | None = None,
           dtype: torch.dtype = torch.float32, device: str = "cpu", tolerance: float | None = None) -> Report:
    """Load a checkpoint into nanogemma and transformers, run both on the prompt, and compare every step."""
    if dtype == torch.float16:
        raise NanogemmaError("float16 overflows in Gemma 3: verify in float32 or bfloat16")
    model, encode, ref = load_pair(name_or_path, dtype, device)
    ids = input_ids(encode, prompt, num_tokens, model.config)
    report = verify_models(model, ref, ids, tolerance)
    import transformers

    text = "random token ids (no tokenizer found)" if encode is None else "tokens"
    report.notes = [f"nanogemma vs transformers {transformers.__version__} (sdpa attention), "
                    f"{ids.shape[1]} {text}, {str(dtype).removeprefix('torch.')}, {device}",
                    "relative = max |ours - ref| / max |ref|; attention and MLP rows are each branch's output "
                    "(after its post-norm)", ""]
    return report
