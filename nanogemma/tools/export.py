"""`nanogemma export RUN_DIR --to hf OUT_DIR`: a trained model as a Hugging Face Gemma 3 checkpoint.

The output folder is what `transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)` and
`AutoTokenizer.from_pretrained(OUT_DIR)` expect:

* `config.json` — `Gemma3ForCausalLM`'s configuration (`nanogemma.config.to_hf_config`), with the
  special-token ids of the run's own tokenizer;
* `model.safetensors` — the weights under HF names (`nanogemma.weights.hf_state_dict`). Both formats
  store RMSNorm weights as offsets from one, so no value changes: only names do. A tied head is stored
  once, as the embedding, and `tie_word_embeddings` tells transformers to reuse it;
* `generation_config.json` — the bos / eos / pad ids;
* the tokenizer files the run folder holds (`tokenizer.json`, `tokenizer_config.json`, ...).

The source can be any model `nanogemma.load` reads: a run folder (its best model), a checkpoint inside it
(`RUN_DIR/last`), a Hugging Face folder or a GGUF file. The folder is assembled under a temporary name and
renamed into place, so OUT_DIR is either complete or absent.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import to_hf_config
from ..errors import NanogemmaError
from ..files import clean_orphans, temp_name

FORMATS = ("hf",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def _special_ids(source: Path) -> dict[str, int]:
    """bos / eos / pad ids of the tokenizer stored with the model (Gemma's when there is none)."""
    try:
        from ..tokenizer import load_tokenizer

        tok = load_tokenizer(source)
        return {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    except NanogemmaError:
        return {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}


def export_hf(source: str | Path | None, out_dir: str | Path, dtype: str = "float32",
              overwrite: bool = False) -> Path:
    """Write a Hugging Face Gemma 3 folder for the model at `source`; returns the folder."""
    from ..weights import hf_state_dict, load_state

    if dtype not in ("float32", "bfloat16"):
        raise NanogemmaError(f"export dtype must be float32 or bfloat16, got {dtype!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise NanogemmaError(f"{out_dir} exists and is not empty; pass --overwrite or choose another folder")
    cfg, state, path = load_state(source)
    tok_source = path if path.is_dir() else path.parent
    hf = to_hf_config(cfg)
    special = _special_ids(tok_source) if any((tok_source / f).is_file() for f in TOKENIZER_FILES) else {}
    hf.update(special)
    hf["torch_dtype"] = dtype
    weights = {k: v.to(getattr(torch, dtype)).contiguous() for k, v in hf_state_dict(state).items()}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_orphans(out_dir.parent)  # what an export killed before its rename left
    tmp = temp_name(out_dir)
    tmp.mkdir()
    try:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")
        gen = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
        copied = [f for f in TOKENIZER_FILES if (tok_source / f).is_file()]
        for f in copied:
            shutil.copy2(tok_source / f, tmp / f)
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not copied:
        print(f"nanogemma: warning: {tok_source} holds no tokenizer files; {out_dir} has none either",
              flush=True)
    return out_dir
