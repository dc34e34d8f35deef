"""A prepared data folder on disk, and the rules that make `prepare` safe to interrupt and to re-run.

A finished folder holds `train.bin`, `val.bin` (flat arrays of token ids, uint16 or uint32, native
little-endian, no header), the tokenizer files and `meta.json`, which is written last: a folder is finished
exactly when its meta.json is there. A run writes everything under `.partial/` first, with the arguments
that define it in `.partial/recipe.json`, then moves the files into place and writes meta.json. So:

* a killed run leaves `.partial/` (and at worst some moved files but no meta.json): nothing that looks
  finished, and the next run starts over;
* a finished folder whose meta.json has the same recipe is left alone ("nothing to do");
* a folder with a different recipe, or with token files that no run of ours left, is refused unless
  `overwrite`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from ..errors import NanogemmaError
from ..files import read_json, regular_file, sha256_file  # noqa: F401 - sha256_file: prepare uses store's

TOKEN_DTYPES = ("uint16", "uint32")

META = "meta.json"
STAGING = ".partial"
SPLIT_FILES = {"train": "train.bin", "val": "val.bin"}
MASK_FILES = {"train": "train.mask.bin", "val": "val.mask.bin"}  # chat data: 1 byte per token, 1 = trained
_OURS = ("train.bin", "val.bin", "train.mask.bin", "val.mask.bin", "gpt2.tiktoken", "tokenizer.json",
         "gemma-tokenizer")


def read_meta(folder: str | Path) -> dict:
    """The meta.json of a prepared folder, as a dict."""
    path = Path(folder) / META
    if not path.exists():
        raise NanogemmaError(f"{folder} is not a prepared data folder (no {META}); "
                             f"run `nanogemma prepare --out {folder}` first")
    fix = "prepare the folder again with --overwrite"
    meta = read_json(path, "data description", fix)
    # What readers rely on, checked once here: the token type and a file and a count per split.
    if meta.get("dtype") not in TOKEN_DTYPES:
        raise NanogemmaError(f"{path} is damaged: dtype {meta.get('dtype')!r} is not one of "
                             f"{', '.join(TOKEN_DTYPES)}; {fix}")
    splits = meta.get("splits")
    if not isinstance(splits, dict) or not splits or not all(
            isinstance(i, dict) and isinstance(i.get("file"), str) and isinstance(i.get("tokens"), int)
            and not isinstance(i.get("tokens"), bool) and i["tokens"] >= 0 for i in splits.values()):
        raise NanogemmaError(f"{path} is damaged: no valid 'splits' (a file and a token count per split); {fix}")
    return meta


def read_tokens(folder: str | Path, split: str = "train") -> np.memmap:
    """The token ids of a split, memory-mapped (read-only, nothing loaded until used)."""
    meta = read_meta(folder)
    info = meta["splits"].get(split)
    if info is None:
        raise NanogemmaError(f"{folder} has no split {split!r} (it has: {', '.join(meta['splits'])})")
    path = Path(folder) / info["file"]
    if not path.exists():
        raise NanogemmaError(f"{path} is missing; prepare the folder again with --overwrite")
    regular_file(path, "token file")
    # A truncated, extended or re-typed file must not train (or evaluate) in silence: its size is the
    # token count times the type's width, exactly.
    size, want = path.stat().st_size, info["tokens"] * np.dtype(meta["dtype"]).itemsize
    if size != want:
        raise NanogemmaError(f"{path} holds {size:,} bytes, but {META} describes {info['tokens']:,} {meta['dtype']} "
                             f"tokens ({want:,} bytes): the file is damaged or not this folder's; prepare the "
                             "folder again with --overwrite")
    if info["tokens"] == 0:
        return np.zeros(0, dtype=meta["dtype"])
    return np.memmap(path, dtype=meta["dtype"], mode="r")


def check_ids(tokens: np.ndarray, vocab_size: int, where: str) -> None:
    """Refuse token ids at or beyond `vocab_size` (read in blocks: memory stays flat on a large corpus)."""
    block = 1 << 26
    for start in range(0, len(tokens), block):
        top = int(np.max(tokens[start:start + block]))
        if top >= vocab_size:
            at = start + int(np.argmax(np.asarray(tokens[start:start + block]) >= vocab_size))
            raise NanogemmaError(f"{where} holds token id {top} (first bad one at token {at:,}), beyond the "
                                 f"tokenizer's {vocab_size:,} ids: the file is damaged or not this folder's; "
                                 "prepare the folder again with --overwrite")


def read_mask(folder: str | Path, split: str = "train") -> np.memmap | None:
    """The loss mask of a split (uint8, one per token, 1 = a target the loss trains on), or None for text data."""
    meta = read_meta(folder)
    info = meta["splits"].get(split, {})
    if "mask" not in info:
        return None
    path = Path(folder) / info["mask"]
    if not path.is_file() or path.stat().st_size != info["tokens"]:
        raise NanogemmaError(f"{path} is missing or does not match the token file; prepare the folder again "
                             "with --overwrite")
    return np.memmap(path, dtype=np.uint8, mode="r")


def verify(folder: str | Path) -> None:
    """Check every file of a prepared folder against the sizes and checksums in its meta.json."""
    meta = read_meta(folder)
    for name, digest in (meta.get("checksums") or {}).items():
        path = Path(folder) / name
        if not path.is_file() or sha256_file(path) != digest:
            raise NanogemmaError(f"{path} does not match its checksum in {META}; prepare again with --overwrite")


def _sizes_ok(folder: Path, meta: dict) -> bool:
    """The cheap check done on every re-run (checksums are for `verify`)."""
    try:
        itemsize = np.dtype(meta["dtype"]).itemsize
        for info in meta["splits"].values():
            if (folder / info["file"]).stat().st_size != info["tokens"] * itemsize:
                return False
            if "mask" in info and (folder / info["mask"]).stat().st_size != info["tokens"]:
                return False
        return all((folder / name).exists() for name in meta["checksums"])
    except (OSError, KeyError, TypeError):
        return False


def _differences(old: dict, new: dict) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    parts = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        parts.append(f"{k}: {a} -> {b}" if not isinstance(a, dict) and not isinstance(b, dict) else k)
    return "; ".join(parts) or "unknown"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def begin(folder: Path, recipe: dict, overwrite: bool) -> Path | None:
    """Get `folder` ready for a run: None if it is already prepared with `recipe`, else the staging folder."""
    recipe = json.loads(json.dumps(recipe))  # compare as meta.json will hold it
    folder.mkdir(parents=True, exist_ok=True)
    meta_path = folder / META
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            meta = {}
        old = meta.get("recipe") if isinstance(meta, dict) else None
        if old == recipe and _sizes_ok(folder, meta):
            return None
        if old != recipe and not overwrite:
            why = _differences(old, recipe) if isinstance(old, dict) else f"its {META} is not ours"
            raise NanogemmaError(f"{folder} already holds data prepared with other arguments ({why}); "
                                 "pass --overwrite to replace it, or choose another --out")
        meta_path.unlink()  # first, so that the folder stops looking finished
    else:
        found = [n for n in _OURS if (folder / n).exists()]
        if found and not (folder / STAGING).exists() and not overwrite:
            raise NanogemmaError(f"{folder} holds {found[0]} but no {META}, so not from a finished run of "
                                 "nanogemma prepare; pass --overwrite to replace it, or choose another --out")
    for name in _OURS:
        _remove(folder / name)
    staging = folder / STAGING
    _remove(staging)
    staging.mkdir()
    (staging / "recipe.json").write_text(json.dumps(recipe, indent=1))
    return staging


def finish(folder: Path, staging: Path, meta: dict, names: list[str]) -> None:
    """Move the staged files into place, then write meta.json (atomically), then drop the staging folder."""
    tops = dict.fromkeys(n.split("/")[0] for n in names)
    for top in tops:
        (staging / top).replace(folder / top)
    tmp = staging / META
    tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(folder / META)
    shutil.rmtree(staging, ignore_errors=True)


class TokenWriter:
    """Appends token arrays to a file, counting tokens and documents and hashing as it goes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "wb")  # noqa: SIM115 - closed by close()
        self.sha = hashlib.sha256()
        self.tokens = self.documents = 0

    def write(self, tokens: np.ndarray, documents: int) -> None:
        data = memoryview(np.ascontiguousarray(tokens)).cast("B")
        self.file.write(data)
        self.sha.update(data)
        self.tokens += len(tokens)
        self.documents += documents

    def close(self) -> None:
        self.file.close()
