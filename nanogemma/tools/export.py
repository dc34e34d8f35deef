"""`nanogemma export RUN_DIR --to hf OUT_DIR`: a trained model as a Hugging Face Gemma 3 checkpoint.

The output folder is what `transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)` and
`AutoTokenizer.from_pretrained(OUT_DIR)` expect:

* `config.json` — `Gemma3ForCausalLM`'s configuration (`nanogemma.config.to_hf_config`), with the
  special-token ids of the run's own tokenizer;
* `model.safetensors` — the weights under HF names (`nanogemma.weights.hf_state_dict`). Both formats
  store RMSNorm weights as offsets from one, so no value changes: only names do. A tied head is stored
  once, as the embedding, and `tie_word_embeddings` tells transformers to reuse it;
* `generation_config.json` — the bos / eos / pad ids;
* the tokenizer files the source holds (`tokenizer.json`, `tokenizer_config.json`, ...), or for a GGUF
  (the default model is one) the tokenizer inside it, written in the Hugging Face format. A Gemma
  tokenizer (one with `<start_of_turn>` / `<end_of_turn>`) without a chat template gets Gemma's, so
  `apply_chat_template` works on the export.

The source can be any model `nanogemma.load` reads: a run folder (its best model), a checkpoint inside it
(`RUN_DIR/last`), a Hugging Face folder or a GGUF file. A LoRA run (`train --lora-rank N`) exports with its
adapters merged into the weights; `--to peft` writes the adapters alone as a peft folder instead
(`export_peft`: `adapter_config.json` + `adapter_model.safetensors`, for `peft.PeftModel.from_pretrained`
on transformers' Gemma 3). The folder is assembled under a temporary name and
renamed into place, so OUT_DIR is either complete or absent.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import to_hf_config
from ..errors import NanogemmaError
from ..files import atomic_path, clean_orphans, readable

FORMATS = ("hf", "peft")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja")


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
    hf["torch_dtype"] = dtype
    weights = {k: v.to(getattr(torch, dtype)).contiguous() for k, v in hf_state_dict(state).items()}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_orphans(out_dir.parent)  # what an export killed before its rename left
    with atomic_path(out_dir, folder=True) as tmp:  # complete or absent, even on a full disk
        copied, tok = _write_tokenizer(tmp, tok_source, path)
        if tok is not None:
            hf.update({"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id})
        elif copied:
            hf.update(_special_ids(tmp))
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")
        gen = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
        readable(tmp)
    if not copied:
        print(f"nanogemma: warning: {tok_source} holds no tokenizer files; {out_dir} has none either",
              flush=True)
    return out_dir


def _write_tokenizer(tmp: Path, tok_source: Path, path: Path):
    """The source's tokenizer files into `tmp` (a GGUF's own tokenizer, written out, when there are none),
    with a chat template; returns the names written (none when the source has no tokenizer) and the
    tokenizer when it was loaded here."""
    from ..tokenizer import gguf_tokenizer_folder, load_tokenizer

    copied = [f for f in TOKENIZER_FILES if (tok_source / f).is_file()]
    for f in copied:
        shutil.copyfile(tok_source / f, tmp / f)  # follows a hub snapshot's links to the blobs
    tok = None
    if not copied and path.is_file() and path.suffix == ".gguf":
        try:
            tok = load_tokenizer(path)
        except NanogemmaError:  # a GGUF without a tokenizer: warned about below
            return [], None
        cached = gguf_tokenizer_folder(path)
        if all((cached / f).is_file() for f in TOKENIZER_FILES[:3]):  # the loader's own HF-format copy
            for f in TOKENIZER_FILES[:3]:
                shutil.copyfile(cached / f, tmp / f)
        else:
            tok.save(tmp)
        copied = sorted(p.name for p in tmp.iterdir())
    if copied:
        _add_chat_template(tmp, tok)
    return copied, tok


def _add_chat_template(folder: Path, tok=None) -> None:
    """Give a Gemma tokenizer without a chat template Gemma's (the turns `nanogemma chat` feeds; a GGUF's
    own template is not read, since parsing its metadata means parsing the whole vocabulary). Tokenizers
    without Gemma's turn tokens (GPT-2, bpe:N data) get none."""
    from ..tokenizer import load_tokenizer
    from .export_gguf import GEMMA_CHAT_TEMPLATE

    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    if config.get("chat_template") or (folder / "chat_template.jinja").is_file():
        return
    tok = tok or load_tokenizer(folder)
    if None in (tok.start_of_turn_id, tok.end_of_turn_id):
        return
    config["chat_template"] = GEMMA_CHAT_TEMPLATE
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


def export_peft(source: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write the adapters of the LoRA run at `source` as a peft adapter folder; returns the folder."""
    from ..lora import read_run_adapter, save_peft

    found = read_run_adapter(source) if Path(source).is_dir() else None
    if found is None:
        raise NanogemmaError(f"{source} is not a LoRA run (made by `nanogemma train --lora-rank N`): it has no "
                             "adapters to export; use --to hf for its full weights")
    cfg, state, base = found
    return save_peft(out_dir, cfg, state, base, overwrite)
