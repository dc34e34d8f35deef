"""Helpers shared by several test modules (fixtures live in conftest.py): tiny models, a tiny model with
Gemma's real tokenizer as a Hugging Face folder, the command line in a subprocess, a byte tokenizer, and
files laid out as other tools write them (Parquet shards as on the hub, GGUF as llama.cpp's converter)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from nanogemma.config import get_preset, to_hf_config
from nanogemma.model import Gemma


def tiny_model(seed: int = 0, **changes) -> Gemma:
    model = Gemma(get_preset("tiny").replace(**changes)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 1 else 0.05))
    return model


def write_tiny_hf(folder: Path) -> Path:
    """A random tiny Gemma 3 with the real 262,144-token tokenizer, as a Hugging Face folder."""
    from safetensors.torch import save_file

    from nanogemma.tokenizer import load_tokenizer
    from nanogemma.weights import hf_state_dict

    cfg = get_preset("tiny").replace(vocab_size=262_144, max_seq_len=512)
    m = Gemma(cfg).init_weights(seed=0)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(to_hf_config(cfg)))
    save_file({k: v.contiguous() for k, v in hf_state_dict(m.state_dict()).items()}, str(folder / "model.safetensors"))
    load_tokenizer().save(folder)
    return folder


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nanogemma", *args], input=stdin, capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})  # tiny models


def write_hub_cache(cache: Path, repo_id: str, files: Path, commit: str = "0" * 40) -> Path:
    """A Hugging Face hub cache as `huggingface_hub` lays it out and reads it offline:
    `models--ORG--NAME/refs/main` (the commit), `blobs/` (the contents) and `snapshots/COMMIT/` (links to the
    blobs). The files are those of the folder `files`; returns the snapshot folder."""
    import hashlib

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for f in sorted(files.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        if not blob.exists():
            blob.write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


class ByteTok:
    """Token 10 + b for byte b; <pad> 0, <eos> 1, <bos> 2, <end_of_turn> 5. Other ids decode to nothing."""

    bos_id, eos_id, pad_id, end_of_turn_id = 2, 1, 0, 5

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return [2] * add_bos + [10 + b for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(i - 10 for i in ids if 10 <= i < 266).decode("utf-8", errors="replace")


# ------------------------------------------------------------------------------------------ files
DOCS = ["Once upon a time there was a cat.", "Ünïcödé — ok ✓ 😀", "  leading space kept", "The end."]


def write_parquet(path, texts, column="text", **extra):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({column: texts, **extra}), path, row_group_size=2)


def hub_layout(root):
    """A folder laid out as the hub stores roneneldan/TinyStories: Parquet shards under data/."""
    write_parquet(root / "data" / "train-00000-of-00002.parquet", DOCS[:2], id=[0, 1])
    write_parquet(root / "data" / "train-00001-of-00002.parquet", DOCS[2:], id=[2, 3])
    write_parquet(root / "data" / "validation-00000-of-00001.parquet", ["A val story.", "Another one."], id=[4, 5])
    return root


def write_gguf(path, cfg, state, qtype=None, arch="gemma3", drop=(), extra=None, fields=None):
    """A GGUF the way llama.cpp's converter lays it out: reversed shapes, norms stored as 1 + w (F32 unless
    `qtype` says otherwise); `extra` adds tensors, `fields` metadata (name -> value)."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    from nanogemma.gguf_files import gguf_name_map

    qtype = Q.F32 if qtype is None else qtype
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_global_base)
    w.add_sliding_window(cfg.sliding_window)
    for name, value in (fields or {}).items():
        w.add_key_value(name, value, _gguf_type(value))
    ours_to_gguf = {v: k for k, v in gguf_name_map(cfg.num_layers).items()}
    for ours, t in state.items():
        name = ours_to_gguf[ours]
        if name in drop:
            continue
        arr = t.float().numpy()
        if "norm" in name:
            w.add_tensor(name, arr + 1.0)
        elif qtype == Q.F32:
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, quantize(arr, qtype), raw_dtype=qtype)
    for name, arr in (extra or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _gguf_type(value):
    from gguf import GGUFValueType as V

    if isinstance(value, list):
        return V.ARRAY
    return {str: V.STRING, float: V.FLOAT32, int: V.INT32, bool: V.BOOL}[type(value)]


def load_bench(name: str):
    """bench/NAME.py as a module (the bench scripts are not a package)."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
