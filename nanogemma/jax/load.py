"""Loading and saving weights for the JAX model: the same sources as PyTorch, read into numpy.

Every source ends as a dict of numpy arrays in nanogemma's names, checked strictly against the config
(`check_state`: every parameter present, every tensor used, every shape right, or one clear error), then
moved to JAX arrays of the asked dtype:

* **GGUF** — through the same safetensors cache as `nanogemma.weights` (`~/.cache/nanogemma/weights/
  <sha>-v1.safetensors`, config json in its metadata), memory-mapped as numpy arrays. On a cold
  cache the GGUF is dequantised in numpy by the `gguf` package and the cache written, byte-compatible
  with the one PyTorch writes, so either backend's first load serves the other.
* **Hugging Face folders** — config.json through `from_hf_config`, tensors through `ours_from_hf`.
* **nanogemma run folders** — `nanogemma.json` ({"model": config, ...}) + `model.safetensors`.

bfloat16 checkpoints arrive as `ml_dtypes.bfloat16` arrays, which JAX takes as they are.

Nothing here imports torch: the name maps, config parsing, path rules and GGUF dequantisation come from
`nanogemma.weight_files` and `nanogemma.gguf_files`, which the PyTorch loaders use too, and the
tokenizer is torch-free. So `import nanogemma.jax` and `load()` work on a machine without torch (`tests/test_jax_load.py` checks it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from .. import gguf_files as G
from .. import weight_files as W
from ..config import GemmaConfig, from_hf_config
from ..errors import NanogemmaError
from .model import JaxGemma, Params, param_shapes

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
RUN_META, RUN_WEIGHTS = "nanogemma.json", "model.safetensors"


def _dtype(dtype: str | Any) -> Any:
    if isinstance(dtype, str):
        if dtype == "float16":
            raise NanogemmaError("float16 overflows in Gemma 3 (activations exceed 65,504): use float32 or bfloat16")
        if dtype not in DTYPES:
            raise NanogemmaError(f"unknown dtype '{dtype}'; choose float32 or bfloat16")
        return DTYPES[dtype]
    return dtype


# ------------------------------------------------------------------------------------------ checking


def check_state(cfg: GemmaConfig, state: dict[str, Any], source: str = "checkpoint") -> None:
    """Raise a NanogemmaError unless `state` holds exactly the parameters `cfg` implies, with their shapes."""
    W.check_tensors(param_shapes(cfg), state, source)


def to_params(cfg: GemmaConfig, state: dict[str, Any], dtype: str | Any = "float32",
              source: str = "checkpoint") -> Params:
    """A checked state dict (numpy arrays, or torch tensors) -> JAX parameters of `dtype`."""
    check_state(cfg, state, source)
    dt = _dtype(dtype)
    # Always a copy: on CPU, jnp.asarray may alias a suitably aligned numpy buffer — a memory-mapped file or
    # a torch tensor's storage — which could then change or vanish under the JAX array (or be donated).
    return {k: jnp.array(_numpy(state[k]), dtype=dt, copy=True) for k in param_shapes(cfg)}


def _numpy(x: Any) -> np.ndarray:
    """numpy arrays pass through; torch tensors (used by tests and the CLI bridge) become numpy, bf16 included."""
    if isinstance(x, np.ndarray):
        return x
    if type(x).__module__.startswith("torch"):
        import ml_dtypes
        import torch

        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return x.numpy()
    return np.asarray(x)


# ------------------------------------------------------------------------------------------ reading


_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _read_safetensors(file: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors of a safetensors file as read-only numpy views of the memory-mapped file, and its metadata.

    The format is an 8-byte little-endian header length, a JSON header ({name: {dtype, shape,
    data_offsets}}, "__metadata__"), then the raw bytes. Mapping instead of reading means the only copy of
    the weights is the one into JAX's buffers: half the peak memory and time of reading the file first.
    """
    if not file.is_file():
        raise NanogemmaError(f"{file} is missing")
    try:
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > file.stat().st_size - 8:
                raise ValueError("the header length is past the end of the file")
            header = json.loads(f.read(n))
        data = np.memmap(file, dtype=np.uint8, mode="r", offset=8 + n) if file.stat().st_size > 8 + n else None
        meta = header.pop("__metadata__", None) or {}
        tensors = {}
        for name, info in header.items():
            begin, end = info["data_offsets"]
            dtype = np.dtype(_ST_DTYPES[info["dtype"]])
            tensors[name] = data[begin:end].view(dtype).reshape(info["shape"]) if end > begin else \
                np.zeros(info["shape"], dtype)
        return tensors, meta
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise NanogemmaError(f"{file} is not a readable safetensors file ({type(e).__name__}: {e})") from None


def read_gguf(path: Path) -> tuple[GemmaConfig, dict[str, np.ndarray]]:
    """Dequantise a Gemma 3 GGUF into (config, float32 numpy state), through the same code as PyTorch."""
    return G.read_gguf_arrays(path)


def load_gguf(path: Path) -> tuple[GemmaConfig, dict[str, np.ndarray]]:
    """GGUF -> (config, state) through the SHA-256-keyed safetensors cache shared with `nanogemma.weights`."""
    return G.load_gguf_cached(path, _read_cache)


def _read_cache(file: Path) -> tuple[GemmaConfig, dict[str, np.ndarray]]:
    state, meta = _read_safetensors(file)
    return GemmaConfig.from_dict(json.loads(meta["nanogemma_config"])), state


def load_hf(folder: Path) -> tuple[GemmaConfig, dict[str, np.ndarray]]:
    """A Hugging Face Gemma 3 folder -> (config, state), tensors memory-mapped by safetensors."""
    cfg_path = folder / "config.json"
    try:
        cfg = from_hf_config(json.loads(cfg_path.read_text(encoding="utf-8")))
    except (ValueError, json.JSONDecodeError) as e:
        raise NanogemmaError(f"{cfg_path}: {e}") from None
    state: dict[str, np.ndarray] = {}
    for file in W.safetensors_files(folder):
        tensors, _ = _read_safetensors(file)
        for k, arr in tensors.items():
            ours = W.ours_from_hf(k)
            if ours is not None:
                state[ours] = arr
    if cfg.tie_embeddings:
        head = state.pop("lm_head.weight", None)
        if head is not None and not np.array_equal(head, state.get("embed.weight", head)):
            raise NanogemmaError(f"{folder}: lm_head differs from the embedding but config says they are tied")
    return cfg, state


def load_run(folder: Path) -> tuple[GemmaConfig, dict[str, np.ndarray]]:
    """A nanogemma run folder (written by either backend's training) -> (config, state)."""
    try:
        meta = json.loads((folder / RUN_META).read_text(encoding="utf-8"))
        cfg = GemmaConfig.from_dict(meta["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise NanogemmaError(f"{folder / RUN_META} does not describe a model ({type(e).__name__}: {e})") from None
    if meta.get("lora"):
        raise NanogemmaError(f"{folder} is a LoRA run (its weights are adapters only): write the merged model with "
                             f"`nanogemma export {folder} --to hf DIR` and load DIR with the JAX backend")
    state, _ = _read_safetensors(folder / RUN_WEIGHTS)
    return cfg, state


def read_state(name_or_path: str | Path | None = None) -> tuple[GemmaConfig, dict[str, np.ndarray], Path]:
    """(config, numpy state in nanogemma names, resolved path) of any source `nanogemma.load` accepts."""
    kind, path = W.resolve_model(name_or_path)
    reader = {"gguf": load_gguf, "hf": load_hf, "run": load_run}[kind]
    cfg, state = reader(Path(path))
    return cfg, state, Path(path)


def load_params(name_or_path: str | Path | None = None,
                dtype: str | Any = "float32") -> tuple[GemmaConfig, Params, Path]:
    """(config, JAX parameters, path), strictly: every parameter filled, every shape checked."""
    dt = _dtype(dtype)
    cfg, state, path = read_state(name_or_path)
    return cfg, to_params(cfg, state, dt, source=str(path)), path


def load(name_or_path: str | Path | None = None, dtype: str | Any = "float32"):
    """(JaxGemma, tokenizer) from any source `nanogemma.load` accepts: `model, tok = nanogemma.jax.load()`."""
    from ..tokenizer import load_tokenizer

    try:
        cfg, params, path = load_params(name_or_path, dtype)
        tok = load_tokenizer(path)
    finally:
        G.release_gguf()
    if tok.vocab_size > cfg.vocab_size:
        raise NanogemmaError(f"{path}: the tokenizer has {tok.vocab_size} tokens but the model only "
                             f"{cfg.vocab_size} embeddings; they do not belong together")
    return JaxGemma(cfg, params), tok


# ------------------------------------------------------------------------------------------ saving


def save_run(folder: str | Path, cfg: GemmaConfig, params: Params, meta: dict[str, Any] | None = None) -> Path:
    """Write a run folder: `model.safetensors` (nanogemma names) and `nanogemma.json` ({"model": ..., **meta}).

    The weights are written first and the json last (each atomically), so a folder with a nanogemma.json
    always has the weights it describes. `nanogemma.load(folder)` and `load_params(folder)` both read it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    check_state(cfg, params, "parameters")
    arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in params.items()}
    tmp = folder / f".{RUN_WEIGHTS}.tmp{os.getpid()}"
    save_file(arrays, str(tmp), metadata={"format": "nanogemma"})
    os.replace(tmp, folder / RUN_WEIGHTS)
    doc = {"model": cfg.to_dict(), **(meta or {})}
    tmp = folder / f".{RUN_META}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, folder / RUN_META)
    return folder


def check_device(device: str) -> None:
    """Refuse --device cuda when JAX sees no GPU (one clear line, not a JAX traceback later)."""
    if device.startswith("cuda") and jax.default_backend() == "cpu":
        raise NanogemmaError("--device cuda was asked for, but JAX sees no GPU (install jax[cuda12]); "
                             "use --device cpu")
