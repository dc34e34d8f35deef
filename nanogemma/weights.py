"""Loading weights: GGUF files, Hugging Face checkpoints, nanogemma run folders, and the default 270M model.

Every loader produces a `GemmaConfig` and a state dict in nanogemma's parameter names, then `build_model`
fills a model strictly: every parameter must be supplied and every tensor of the file used, with shapes
checked; otherwise one error names the offending tensor.

The file formats themselves (name maps, path rules, GGUF dequantisation) live in `weight_files.py` and
`gguf_files.py`, shared with the JAX side. Dequantising the 270M GGUF takes a while (most of it parsing the 262,144-entry vocabulary),
so the result is cached as safetensors keyed by the file's SHA-256: later loads memory-map the cache and
skip the GGUF parser.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .config import GemmaConfig, from_hf_config
from .errors import NanogemmaError
from .files import read_json
from .flags import check_device
from .gguf_files import load_gguf_cached, read_gguf_arrays, release_gguf
from .machine import keep_freed_memory
from .model import Gemma
from .weight_files import (
    check_tensors,
    config_from,
    hf_state_dict,
    ours_from_hf,
    resolve_model,
    safetensors_damage,
    safetensors_files,
)

__all__ = ["build_model", "hf_state_dict", "load", "load_gguf", "load_hf", "load_state", "read_gguf"]


# --------------------------------------------------------------------------------------------- building


@contextlib.contextmanager
def _no_default_init() -> Iterator[None]:
    """Skip nn.Embedding's N(0, 1) fill while building on the meta device: the checkpoint replaces it anyway,
    and `normal_` on a meta tensor imports torch._dynamo — a second of every start-up."""
    reset = nn.Embedding.reset_parameters
    nn.Embedding.reset_parameters = lambda self: None
    try:
        yield
    finally:
        nn.Embedding.reset_parameters = reset


def build_model(cfg: GemmaConfig, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu", source: str = "checkpoint") -> Gemma:
    """Instantiate without allocating random weights, then assign `state` strictly."""
    with torch.device("meta"), _no_default_init():
        model = Gemma(cfg)
    check_tensors({k: tuple(p.shape) for k, p in model.state_dict().items()}, state, source)
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, assign=True)
    model.reset_rope()  # the frequency buffers were created on the meta device: compute them for real
    return model.eval()


# ------------------------------------------------------------------------------------------------- GGUF


def read_gguf(path: Path) -> tuple[GemmaConfig, dict[str, torch.Tensor]]:
    """Parse and dequantise a Gemma 3 GGUF into (config, float32 state dict in nanogemma names)."""
    cfg, arrays = read_gguf_arrays(path)
    return cfg, {k: torch.from_numpy(a) for k, a in arrays.items()}


def load_gguf(path: str | Path) -> tuple[GemmaConfig, dict[str, torch.Tensor]]:
    """GGUF -> (config, state), through the safetensors cache keyed by the file's SHA-256."""
    cfg, state = load_gguf_cached(path, _read_cache)
    return cfg, {k: torch.as_tensor(v) for k, v in state.items()}  # numpy arrays from a cold load: no copy


def _read_cache(path: Path) -> tuple[GemmaConfig, dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        cfg = GemmaConfig.from_dict(json.loads(f.metadata()["nanogemma_config"]))
        return cfg, {k: f.get_tensor(k) for k in f.keys()}


def read_safetensors(file: Path, keep: Callable[[str], str | None] = lambda k: k) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file (memory-mapped), named by `keep` (None: skip); damage (a
    truncated file, a bad header) is a NanogemmaError that names the file."""
    state = {}
    try:
        with safe_open(str(file), framework="pt") as f:
            for k in f.keys():
                name = keep(k)
                if name is not None:
                    state[name] = f.get_tensor(k)
    except NanogemmaError:
        raise
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise safetensors_damage(file, e) from None
    return state


# ---------------------------------------------------------------------------------------- Hugging Face


def load_hf(folder: str | Path) -> tuple[GemmaConfig, dict[str, torch.Tensor]]:
    """A Hugging Face Gemma 3 folder -> (config, state). Tensors are memory-mapped, not copied."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise NanogemmaError(f"{folder} has no config.json; is it a Hugging Face model folder?")
    cfg = config_from(from_hf_config, read_json(cfg_path, "model config", "download the model's config.json "
                                                "again"), cfg_path)
    state: dict[str, torch.Tensor] = {}
    for file in safetensors_files(folder):
        state.update(read_safetensors(file, ours_from_hf))
    if cfg.tie_embeddings:
        head = state.pop("lm_head.weight", None)
        if head is not None and not torch.equal(head, state.get("embed.weight", head)):
            raise NanogemmaError(f"{folder}: lm_head differs from the embedding but config says they are tied")
    return cfg, state


# ---------------------------------------------------------------------------------------------- entry


def load_state(name_or_path: str | Path | None = None) -> tuple[GemmaConfig, dict[str, torch.Tensor], Path]:
    """Config and weights (float32 or the checkpoint's dtype) without building a model."""
    kind, path = resolve_model(name_or_path)
    if kind == "gguf":
        cfg, state = load_gguf(path)
    elif kind == "hf":
        cfg, state = load_hf(path)
    else:
        meta_path = path / "nanogemma.json"
        meta = read_json(meta_path, "run metadata", "restore the run folder, or load RUN_DIR/last")
        cfg = config_from(GemmaConfig.from_dict, meta.get("model"), meta_path)
        state = _load_safetensors(path / "model.safetensors")
        if meta.get("lora"):  # a LoRA run holds adapters only: the model is its base with them merged in
            from .lora import LoRAConfig, merged_state

            state = merged_state(lora_base_state(meta["lora"], path), state, LoRAConfig.from_dict(meta["lora"]))
    return cfg, state, path


def lora_base_state(lora: dict, run: Path) -> dict[str, torch.Tensor]:
    """The frozen weights a LoRA run's adapters go on: its `--init-from` model, which its metadata names."""
    try:
        return load_state(lora["base"])[1]
    except NanogemmaError as e:
        raise NanogemmaError(f"{run} is a LoRA run on {lora['base']}, which cannot be loaded: {e}") from None


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise NanogemmaError(f"{file} is missing")
    return read_safetensors(file)


def load(name_or_path: str | Path | None = None, dtype: torch.dtype = torch.float32,
         device: str | torch.device = "cpu",
         prepare: Callable[[Gemma, threading.Event], object] | None = None):
    """Load a model and its tokenizer: `model, tok = nanogemma.load()`.

    `name_or_path`: None or "gemma3-270m" (the official 270M weights, from the `[weights]` extra), a .gguf
    file, a Hugging Face folder, or a nanogemma run folder.

    `prepare(model, go)`, if given, runs on a second thread while the tokenizer loads. Reading the
    262K-piece vocabulary holds the GIL (briefly from nanogemma's cached SentencePiece model, longer where
    `tokenizers` parses a tokenizer.json), so only a torch op already running (they release
    the GIL) proceeds alongside: `quantize.pack_model` sets `go` just before reordering the output head,
    and the tokenizer waits for that (or for `prepare` to return), so that the load cannot take the GIL
    first.
    """
    from .tokenizer import load_tokenizer

    if dtype == torch.float16:
        raise NanogemmaError("float16 overflows in Gemma 3 (activations exceed 65,504): use float32 or bfloat16")
    check_device(str(device))
    keep_freed_memory()  # decoding reuses large blocks step after step: keep them rather than fault them in anew
    try:
        cfg, state, path = load_state(name_or_path)
        model = build_model(cfg, state, dtype=dtype, device=device, source=str(path))
        with ThreadPoolExecutor(1) as pool:
            go = threading.Event()
            prepared = pool.submit(prepare, model, go) if prepare else None
            if prepared:
                prepared.add_done_callback(lambda _: go.set())
                go.wait()
            tok = load_tokenizer(path)
            if prepared:
                prepared.result()  # re-raises what went wrong there
    finally:
        release_gguf()
    if tok.vocab_size > cfg.vocab_size:
        raise NanogemmaError(f"{path}: the tokenizer has {tok.vocab_size} tokens but the model only "
                             f"{cfg.vocab_size} embeddings; they do not belong together")
    return model, tok


def load_for_inference(name_or_path: str | None, dtype: str = "float32", device: str = "cpu",
                       quantize: str | None = None, pack: bool = True, adapter: str | Path | None = None):
    """`nanogemma.load` plus the optional int8 conversion, else float32 packing: what `generate`, `chat`
    and `bench` run. Pass `pack=False` for a model that torch.compile will trace (it cannot trace packed
    weights). `adapter`, a LoRA folder (peft's or a LoRA run), is merged into the weights first."""
    from .quantize import calibration_text, pack_model, quantize_model

    def prepare(model: Gemma, go: threading.Event) -> None:
        if adapter is not None:
            from .lora import add_adapter

            add_adapter(model, adapter)
        if not quantize:
            if pack:
                pack_model(model, go)
        elif quantize != "int8":  # dynamic int8 is converted after loading: its calibration needs the tokenizer
            quantize_model(model, quantize)  # the tokenizer waits for it: letting it start earlier measured no gain

    model, tok = load(name_or_path, dtype=getattr(torch, dtype), device=device, prepare=prepare)
    if quantize == "int8":  # dynamic int8 calibrates its input scales on a short text: it needs the tokenizer
        quantize_model(model, quantize, calibration=torch.tensor(tok.encode(calibration_text())))
    return model, tok
