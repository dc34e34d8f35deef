"""Helpers shared by several test modules (fixtures live in conftest.py): tiny models, a tiny model with
Gemma's real tokenizer as a Hugging Face folder, and the command line in a subprocess."""

from __future__ import annotations

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
