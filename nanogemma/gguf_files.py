"""GGUF files without torch: parsing, the config in their metadata, names, and dequantisation to numpy.

llama.cpp's format, read through the `gguf` package, for both backends (`weights.py`, `jax/load.py`) and the
exporter (`tools/export_gguf.py`, which writes the names read here):

* `open_gguf` parses once per load (the 262,144-entry vocabulary is most of a cold load), over a plain
  ndarray view of the file's map (`gguf_reader_class`);
* `gguf_config` reads the shape from the metadata, with llama.cpp's defaults where a key is absent;
* `read_gguf_arrays` dequantises into float32 arrays under nanogemma's names, with two conversions besides
  dequantisation: dimensions are listed fastest-first (so reversed from PyTorch's), and llama.cpp stores
  RMSNorm weights as `1 + w`, where our norms hold `w`;
* `load_gguf_cached` caches the dequantised weights as safetensors keyed by the file's SHA-256.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .config import GLOBAL, SLIDING, GemmaConfig, layer_pattern
from .errors import NanogemmaError
from .files import atomic_path, clean_orphans, manifest_ok, write_manifest
from .weight_files import LAYER_NAMES, TOP_NAMES, cache_dir, cache_unwritable, file_digest

_GGUF_NORMS = ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm", "attn_q_norm", "attn_k_norm")
CACHE_VERSION = 1  # bump when the cached layout or config semantics change
_GGUF_HEAD = ("lm_head.weight", "output.weight")  # present only when the head is not tied to the embedding


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
    names = {f"{g}.weight": f"{ours}.weight" for ours, g, _ in TOP_NAMES}
    names[_GGUF_HEAD[1]] = _GGUF_HEAD[0]
    for i in range(num_layers):
        for ours, g, _ in LAYER_NAMES:
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
