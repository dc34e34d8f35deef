"""The run folder on disk: checkpoints written atomically, and everything `nanogemma.load` needs.

    RUN_DIR/
      train.toml              the resolved settings (feed back with --config; --resume reads it)
      nanogemma.json          the run's model: config, step, validation loss  ┐ `nanogemma.load(RUN_DIR)`,
      model.safetensors       its weights (the best checkpoint, else the last) ┘ `generate --model RUN_DIR`
      tokenizer.json, tokenizer_config.json, special_tokens_map.json   the data's tokenizer, HF format
      metrics.jsonl           one JSON object per logged step / evaluation
      tensorboard/            when tensorboard is installed
      last/                   the newest checkpoint: resumable, and loadable as a model itself
      best/                   the checkpoint of the lowest validation loss so far (same contents)

A checkpoint folder holds `nanogemma.json`, `model.safetensors` (float32 master weights, nanogemma
names), `trainer.pt` (optimizer, schedule, step, random-generator, data-sampler and gradient-scaler state)
and links to the tokenizer files, so `--model RUN_DIR/last` works too. While `best` is the `last` checkpoint
its files are hard links to `last`'s, and the run folder's model files are links too: nothing identical is
stored twice, and the end of a run prints the folder's size (`disk_usage`).

**Atomic writes.** A checkpoint is written whole into `.tmp-<name>/`, then swapped in with two renames:
`last` -> `.old-last`, `.tmp-last` -> `last`, then `.old-last` is deleted. A crash can leave `.tmp-last`
(ignored and replaced next time) or, between the renames, only `.old-last`, which `find_checkpoint` then
uses: at every moment a complete checkpoint exists under one of the two names. The files at the top of the
run folder are hard links to the checkpoint's files, each swapped in with one `os.replace`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..errors import NanogemmaError
from ..files import atomic_path, atomic_write, read_json
from .config import SETTINGS, TrainConfig, to_toml

FORMAT = "nanogemma-run"
VERSION = 1
MODEL_META = "nanogemma.json"
WEIGHTS = "model.safetensors"
TRAINER = "trainer.pt"
METRICS = "metrics.jsonl"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def write_text(path: Path, text: str) -> None:
    """Write a text file under a temporary name, then rename: readers see the old file or the new one."""
    atomic_write(path, text)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link (no extra disk, instant) when the filesystem allows, else copy; atomic either way."""
    if dst.exists() and os.path.samefile(src, dst):
        return  # already that file (renaming a link onto itself would leave the temporary name behind)
    with atomic_path(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_settings(run_dir: Path, cfg: TrainConfig) -> None:
    """train.toml: the run's settings (`resume` is how a command was started, not a setting of the run)."""
    write_text(run_dir / SETTINGS, to_toml(cfg.replace(resume=False)))


def find_checkpoint(run_dir: Path, name: str = "last") -> Path | None:
    """The complete checkpoint folder called `name`, or its previous version if a swap was cut short."""
    for candidate in (run_dir / name, run_dir / f".old-{name}"):
        if (candidate / TRAINER).is_file() and (candidate / WEIGHTS).is_file():
            return candidate
    return None


def model_meta(model_cfg: dict, train_cfg: TrainConfig, data: dict, step: int, tokens: int,
               val_loss: float | None, name: str) -> dict[str, Any]:
    """The `nanogemma.json` of a checkpoint: what `nanogemma.weights.load_state` reads, plus provenance."""
    return {"format": FORMAT, "version": VERSION, "model": model_cfg, "checkpoint": name, "step": step,
            "tokens": tokens, "val_loss": val_loss, "data": data, "train": train_cfg.to_dict(),
            "saved": time.strftime("%Y-%m-%dT%H:%M:%S")}


def save_checkpoint(run_dir: Path, name: str, weights: dict[str, torch.Tensor], trainer: dict[str, Any],
                    meta: dict[str, Any]) -> Path:
    """Write checkpoint `name` (last / best) atomically; returns its folder."""
    final, tmp, old = run_dir / name, run_dir / f".tmp-{name}", run_dir / f".old-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        weights = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in weights.items()}
        save_file(weights, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        torch.save(trainer, tmp / TRAINER)
        (tmp / MODEL_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        for f in TOKENIZER_FILES:
            if (run_dir / f).is_file():
                _link_or_copy(run_dir / f, tmp / f)
        mode = 0o666 & ~_umask()
        for f in tmp.iterdir():  # the rename below publishes the folder: its bytes must be on disk first
            if not f.is_symlink():
                f.chmod(mode)  # safetensors writes owner-only files; a run folder is shared like any output
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    except BaseException:  # a full disk: the incomplete folder goes, the previous checkpoint stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _swap_in(tmp, final, old)


def _swap_in(tmp: Path, final: Path, old: Path) -> Path:
    """Publish the complete folder `tmp` as `final`; the previous version stays at `old` until then."""
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def publish(run_dir: Path, checkpoint: Path) -> None:
    """Make RUN_DIR itself load as `checkpoint`'s model: weights first, then the metadata that describes them."""
    _link_or_copy(checkpoint / WEIGHTS, run_dir / WEIGHTS)
    _link_or_copy(checkpoint / MODEL_META, run_dir / MODEL_META)


def disk_usage(run_dir: Path) -> int:
    """Bytes the run folder takes, each file counted once however many names link to it (`best` and
    `last` share their files while they are the same checkpoint, and RUN_DIR's model is a link)."""
    seen, total = set(), 0
    for f in Path(run_dir).rglob("*"):
        if f.is_symlink() or not f.is_file():
            continue
        st = f.stat()
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    try:
        return torch.load(checkpoint / TRAINER, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which, and what to do
        raise NanogemmaError(f"{checkpoint / TRAINER} cannot be read ({type(e).__name__}: {e}); "
                             "resume from another checkpoint or start a new run") from None


def read_model_meta(folder: Path) -> dict[str, Any]:
    return read_json(folder / MODEL_META, "checkpoint metadata", "resume from another checkpoint or start a new run")


def trim_metrics(run_dir: Path, step: int) -> None:
    """On resume, drop the records of steps after the checkpoint: they are about to be redone."""
    path = run_dir / METRICS
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    write_text(path, "".join(line + "\n" for line in keep))


def clone_checkpoint(run_dir: Path, src: str, dst: str, meta_changes: dict[str, Any]) -> Path:
    """Checkpoint `dst` as a copy of `src` made of hard links (its own nanogemma.json), swapped in atomically."""
    source, final, tmp, old = run_dir / src, run_dir / dst, run_dir / f".tmp-{dst}", run_dir / f".old-{dst}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in source.iterdir():
        if f.name != MODEL_META:
            _link_or_copy(f, tmp / f.name)
    meta = {**read_model_meta(source), **meta_changes}
    (tmp / MODEL_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return _swap_in(tmp, final, old)
