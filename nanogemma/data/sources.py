"""Where documents come from: local files and folders, a Hugging Face dataset, or the synthetic grammar.

`open_source(specs, ...)` reads the `--source` values:

* `synthetic:N` — N stories of the story grammar (`synthetic.py`), of which a `val_fraction` (at least one)
  form the validation split, drawn from their own random stream.
* existing files or folders — `.txt` and other plain-text files (`.py`, `.md`, `.rst`, ...: any file
  that is UTF-8 text by its content, or those `glob` picks), `.jsonl` (one JSON object per line, text in
  `text_column`), `.parquet` (text in column `text_column`), each optionally gzip-compressed (`.txt.gz`,
  ...). A folder is searched recursively, in name order.
  How a text file splits into documents (`delimiter`): "auto" (the default) looks at the file's start:
  text with blank lines (prose, code) is one document per file (per paragraph past 64 MB), text with
  `<|endoftext|>` markers is split at them, and text without blank lines is one record per line;
  "file", "paragraph" or "line" choose a rule, any other string separates documents. The rule used is
  recorded per file (meta.json, and `prepare`'s summary).
  Files are assigned to splits by their path, as the Hugging Face hub lays datasets out: a folder named
  `train` / `training` (or the `--split` name), or a file whose name starts or ends with that word
  (`train-00000-of-00002.parquet`, `TinyStories-train.txt`), is for training; `validation` / `valid` /
  `val` / `dev` (or the `--val-split` name) for validation; `test` files are left out; other files are
  training files. Only whole folder names and the ends of file names count, so `libjpeg-dev/` is no
  validation folder. `--val-split none` turns names off. With no training file, every file is for training.
* `hf:NAME` or `owner/name` (not an existing path) — a dataset through the `datasets` library, streamed.
  This is a thin adapter: it yields batches of strings, and everything after that is shared. `hf:FOLDER`
  reads a local folder laid out as on the hub, which is how the adapter is tested offline.

A source has a validation split when its files or dataset provide one; otherwise the pipeline holds out a
deterministic fraction of the training documents.
"""

from __future__ import annotations

import fnmatch
import gzip
import os
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import NanogemmaError
from .chunks import (
    CHUNK_ROWS,
    Chunk,
    JsonlChunk,
    ListChunk,
    ParquetChunk,
    SyntheticChunk,
    TextChunk,
    split_file,
)

DEFAULT_SOURCE = "roneneldan/TinyStories"
KINDS = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}
_VAL_WORDS = ("validation", "valid", "val", "dev")
TEXT_RULES = ("auto", "file", "paragraph", "line")
STRUCTURED = {".csv", ".tsv", ".json", ".xml"}  # text, but records in a format: not taken as plain text
WHOLE_FILE_LIMIT = 1 << 26  # a text file past this is cut at its paragraphs rather than kept as one document
_SNIFF = 1 << 20


class Source(ABC):
    """A stream of documents for the training split and, when `has_val`, the validation split."""

    has_val: bool = False

    @property
    def may_hold_out(self) -> bool:
        """Whether the held-out fraction may be used (known before `open`, unlike `has_val`)."""
        return not self.has_val

    def open(self) -> None:  # noqa: B027 - only remote sources have work to do here
        """Connect to the data, when that is costly; `has_val` is known after this."""

    @abstractmethod
    def chunks(self, split: str) -> Iterator[Chunk]:
        """The chunks of split "train" or "val", in a fixed order."""

    @abstractmethod
    def recipe(self) -> dict:
        """Everything that determines the documents: prepared folders compare it to skip or refuse a re-run."""

    def describe(self) -> dict:
        """What meta.json says about the source."""
        return self.recipe()

    def warnings(self) -> list[str]:
        return []

    def close(self) -> None:  # noqa: B027 - most sources have nothing to clean up
        """Remove temporary files."""


@dataclass(frozen=True)
class InputFile:
    path: Path
    kind: str  # txt, jsonl, parquet
    split: str  # train, val, test


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    name = name[:-3] if name.endswith(".gz") else name
    return KINDS.get(Path(name).suffix)


def _head(path: Path, n: int = _SNIFF) -> bytes:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            return f.read(n)
    except (gzip.BadGzipFile, EOFError) as e:
        raise NanogemmaError(f"{path} is not a valid gzip file ({e})") from None
    except OSError as e:
        raise NanogemmaError(f"{path} cannot be read ({e})") from None


def _looks_like_text(path: Path) -> bool:
    """UTF-8 text without NUL bytes in its first 64 KB (a character cut at the end is allowed)."""
    try:
        head = _head(path, 1 << 16)
    except NanogemmaError:
        return False
    if b"\0" in head:
        return False
    for cut in range(4):  # the sample may end inside a character
        try:
            head[:len(head) - cut].decode("utf-8")
            return True
        except UnicodeDecodeError:
            continue
    return False


def text_rule(path: Path, delimiter: str | None) -> tuple[str, str | None]:
    """(rule, separator) of a text file: "file", "paragraph", "line", or "delimiter" with its separator."""
    if delimiter in (None, "auto"):
        head = _head(path)
        if b"<|endoftext|>" in head:
            return "delimiter", "<|endoftext|>"
        if re.search(rb"\n[ \t\r]*\n", head):
            return ("paragraph", None) if path.stat().st_size > WHOLE_FILE_LIMIT else ("file", None)
        return "line", None
    if delimiter in ("file", "paragraph", "line"):
        return delimiter, None
    if delimiter == "\n":
        return "line", None
    return "delimiter", delimiter


def describe_rule(rule: str, separator: str | None) -> str:
    return {"file": "one document per file", "paragraph": "one document per paragraph (blank lines)",
            "line": "one document per line"}.get(rule, f"documents separated by {separator!r}")


def _split_of(path: Path, root: Path, train_name: str, val_name: str | None) -> str:
    """The split a file's path names: a whole folder name, or the first or last word of the file's name."""
    if val_name is not None and val_name.lower() == "none":
        return "train"
    rel = path.relative_to(root) if path != root else Path(path.name)
    name = rel.name.lower()
    stem = Path(name[:-3] if name.endswith(".gz") else name).stem
    words = [w for w in re.split(r"[^a-z0-9]+", stem) if w]
    names = {p.lower() for p in rel.parts[:-1]} | {stem} | ({words[0], words[-1]} if words else set())
    train_words = {train_name.lower()} | ({"train", "training"} if train_name == "train" else set())
    val_words = {val_name.lower()} if val_name else set(_VAL_WORDS)
    if names & val_words:
        return "val"
    if names & train_words:
        return "train"
    return "test" if names & {"test", "testing"} else "train"


class LocalSource(Source):
    def __init__(self, paths: list[Path], *, text_column: str, delimiter: str | None, split: str,
                 val_split: str | None, glob: str | None = None) -> None:
        self.text_column, self.delimiter = text_column, delimiter
        self._notes: list[str] = []
        self._temp: dict[Path, Path] = {}
        files: list[InputFile] = []
        for root in paths:
            if root.is_file():
                if _kind(root) is None and (root.suffix.lower() in STRUCTURED or not _looks_like_text(root)):
                    raise NanogemmaError(f"{root}: unsupported file type; use text files, .jsonl or .parquet "
                                         "(optionally .gz)")
                found = {root: _kind(root) or "txt"}
            else:
                found = self._scan(root, glob)
            files += [InputFile(p, kind, _split_of(p, root, split, val_split)) for p, kind in found.items()]
        if not any(f.split == "train" for f in files):  # e.g. only a "valid" file: use it for training
            files = [InputFile(f.path, f.kind, "train") for f in files]
        tests = [f for f in files if f.split == "test"]
        if tests:
            self._notes.append(f"left out {len(tests)} test file(s), e.g. {tests[0].path.name}")
        self.files = [f for f in files if f.split != "test"]
        self.has_val = any(f.split == "val" for f in self.files)
        for f in self.files:
            if f.kind == "parquet":
                self._check_parquet(f.path)
        self.rules = {f.path: text_rule(f.path, delimiter) for f in self.files if f.kind == "txt"}

    def _scan(self, root: Path, glob: str | None) -> dict[Path, str]:
        """The files of a folder to read, with their kind: by extension, else plain text by content, or
        those matching `glob` (against the path inside the folder, or the file name)."""
        found = sorted(p for p in root.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(root).parts))
        if glob:
            rel = lambda p: p.relative_to(root).as_posix()  # noqa: E731
            chosen = {p: _kind(p) or "txt" for p in found if fnmatch.fnmatch(rel(p), glob)
                      or fnmatch.fnmatch(p.name, glob)}
            if not chosen:
                raise NanogemmaError(f"no file in {root} matches --glob {glob!r}")
            return chosen
        chosen, by_content, skipped = {}, [], []
        for p in found:
            if _kind(p) is not None:
                chosen[p] = _kind(p)
            elif p.suffix.lower() not in STRUCTURED and _looks_like_text(p):
                chosen[p] = "txt"
                by_content.append(p)
            else:
                skipped.append(p)
        if not chosen:
            raise NanogemmaError(f"{root} holds no text, .jsonl or .parquet files (optionally .gz)")
        if by_content:
            kinds = sorted({p.suffix or p.name for p in by_content})
            self._notes.append(f"{root}: read {len(by_content)} other file(s) as plain text by their content "
                               f"({', '.join(kinds[:6])}); choose files with --glob")
        if skipped:
            self._notes.append(f"{root}: ignored {len(skipped)} file(s) that are not text, e.g. {skipped[0].name}")
        return chosen

    def _parquet_path(self, path: Path) -> Path:
        """A gzipped Parquet file is decompressed once to a temporary file (Parquet needs random access)."""
        if not path.name.endswith(".gz"):
            return path
        if path not in self._temp:
            fd, tmp = tempfile.mkstemp(suffix=".parquet", prefix="nanogemma-")
            with os.fdopen(fd, "wb") as out, gzip.open(path, "rb") as src:
                try:
                    shutil.copyfileobj(src, out, 1 << 20)
                except (gzip.BadGzipFile, EOFError, OSError) as e:
                    raise NanogemmaError(f"{path} is not a valid gzip file ({e})") from None
            self._temp[path] = Path(tmp)
        return self._temp[path]

    def _check_parquet(self, path: Path):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(self._parquet_path(path))
        except (OSError, pa.ArrowException) as e:
            raise NanogemmaError(f"{path} is not a readable Parquet file ({e})") from None
        schema = pf.schema_arrow
        if self.text_column not in schema.names:
            raise NanogemmaError(f"{path} has no column {self.text_column!r} (it has: {', '.join(schema.names)}); "
                                 "name the text column with --text-column")
        t = schema.field(self.text_column).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)
                or pa.types.is_large_binary(t)):
            raise NanogemmaError(f"{path}: column {self.text_column!r} holds {t}, not text; "
                                 "name the text column with --text-column")
        return pf

    def chunks(self, split: str) -> Iterator[Chunk]:
        for f in self.files:
            if f.split != split:
                continue
            origin = str(f.path)
            if f.kind == "parquet":
                path = self._parquet_path(f.path)
                for i in range(self._check_parquet(f.path).num_row_groups):
                    yield ParquetChunk(origin, str(path), i, self.text_column)
            elif f.kind == "jsonl":
                for data, lines in split_file(f.path, b"\n"):
                    yield JsonlChunk(origin, data, self.text_column, lines + 1)
            else:
                rule, sep = self.rules[f.path]
                if rule == "file":
                    yield TextChunk(origin, _head(f.path, WHOLE_FILE_LIMIT * 8), None, whole=True)
                elif rule == "line":
                    for data, _ in split_file(f.path, b"\n"):
                        yield TextChunk(origin, data, None)
                else:
                    sep = "\n\n" if rule == "paragraph" else sep
                    for data, _ in split_file(f.path, sep.encode("utf-8")):
                        yield TextChunk(origin, data, sep)

    def total_bytes(self) -> int:
        return sum(f.path.stat().st_size for f in self.files)

    def split_bytes(self, split: str) -> int | None:
        """Input bytes of a split, for the progress bar: None where chunks do not carry their bytes
        (Parquet) or the file is compressed (its size is not the text's)."""
        files = [f for f in self.files if f.split == split]
        if any(f.kind == "parquet" or f.path.name.endswith(".gz") for f in files):
            return None
        return sum(f.path.stat().st_size for f in files)

    def recipe(self) -> dict:
        kinds = {f.kind for f in self.files}
        r: dict = {"kind": "files", "files": []}
        for f in self.files:
            st = f.path.stat()
            entry = {"path": str(f.path.resolve()), "split": f.split, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
            if f.path in self.rules:
                entry["documents"] = describe_rule(*self.rules[f.path])
            r["files"].append(entry)
        if "txt" in kinds:
            r["delimiter"] = self.delimiter
        if kinds & {"jsonl", "parquet"}:
            r["text_column"] = self.text_column
        return r

    def describe(self) -> dict:
        r = self.recipe()
        r["files"] = [{k: v for k, v in f.items() if k != "mtime_ns"} for f in r["files"]]
        return r

    def warnings(self) -> list[str]:
        return self._notes

    def close(self) -> None:
        for tmp in self._temp.values():
            tmp.unlink(missing_ok=True)
        self._temp.clear()


class HubSource(Source):
    """A dataset through `datasets.load_dataset(name, config, streaming=True)`; nothing else is special.

    Nothing is fetched until `open()`, so that re-running a finished job needs no network.
    """

    def __init__(self, name: str, *, config: str | None, text_column: str, split: str,
                 val_split: str | None) -> None:
        self.name, self.config, self.text_column, self.split = name, config, text_column, split
        self.requested_val_split = val_split
        self.dataset = None

    @property
    def may_hold_out(self) -> bool:
        return self.requested_val_split is None

    def open(self) -> None:
        if self.dataset is not None:
            return
        try:
            import datasets
        except ImportError:
            raise NanogemmaError("Hugging Face datasets need the `datasets` package: "
                                 "pip install 'nanogemma[data]'") from None
        name, split, val_split, column = self.name, self.split, self.requested_val_split, self.text_column
        try:
            dataset = datasets.load_dataset(name, self.config, streaming=True)
        except Exception as e:  # connection, missing repo, bad config: all user-facing
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise NanogemmaError(f"cannot open Hugging Face dataset {name!r} ({first}); check the name and the "
                                 "network, or prepare local files with --source PATH") from None
        splits = list(dataset)
        for s, flag in ((split, "--split"), (val_split, "--val-split")):
            if s is not None and s not in splits:
                raise NanogemmaError(f"dataset {name!r} has no split {s!r} (it has: {', '.join(splits)}); "
                                     f"choose one with {flag}")
        self.val_split = val_split or next((s for s in _VAL_WORDS if s in splits and s != split), None)
        self.has_val = self.val_split is not None
        for s in (split, self.val_split):
            features = getattr(dataset[s], "features", None) if s else None
            if features is not None and column not in features:
                raise NanogemmaError(f"dataset {name!r} split {s!r} has no column {column!r} (it has: "
                                     f"{', '.join(features)}); name the text column with --text-column")
        self.dataset = dataset

    def chunks(self, split: str) -> Iterator[Chunk]:
        self.open()
        name = self.split if split == "train" else self.val_split
        origin = f"{self.name}[{name}]"
        try:
            for batch in self.dataset[name].select_columns([self.text_column]).iter(batch_size=CHUNK_ROWS):
                yield ListChunk(origin, batch[self.text_column])
        except (KeyError, ValueError) as e:
            raise NanogemmaError(f"{origin}: no column {self.text_column!r} ({e}); "
                                 "name the text column with --text-column") from None

    def recipe(self) -> dict:
        return {"kind": "huggingface", "dataset": self.name, "config": self.config, "split": self.split,
                "val_split": self.requested_val_split, "text_column": self.text_column}

    def describe(self) -> dict:
        self.open()
        return self.recipe() | {"val_split": self.val_split}


class SyntheticSource(Source):
    has_val = True

    def __init__(self, n: int, seed: int, val_fraction: float) -> None:
        self.n, self.seed = n, seed
        self.n_val = min(n - 1, max(1, round(n * val_fraction)))
        self.n_train = n - self.n_val

    def chunks(self, split: str) -> Iterator[Chunk]:
        total = self.n_train if split == "train" else self.n_val
        for start in range(0, total, CHUNK_ROWS):
            yield SyntheticChunk(f"synthetic[{split}]", self.seed, split, start, min(CHUNK_ROWS, total - start))

    def recipe(self) -> dict:
        from .synthetic import GRAMMAR_VERSION

        return {"kind": "synthetic", "stories": self.n, "train_stories": self.n_train,
                "val_stories": self.n_val, "seed": self.seed, "grammar_version": GRAMMAR_VERSION}


def open_source(specs: str | list[str] | None = None, *, text_column: str = "text", delimiter: str | None = None,
                split: str = "train", val_split: str | None = None, hf_config: str | None = None,
                seed: int = 0, val_fraction: float = 0.01, glob: str | None = None) -> Source:
    """The source named by one or more `--source` values (see the module docstring)."""
    specs = [DEFAULT_SOURCE] if not specs else [specs] if isinstance(specs, str) else list(specs)
    if delimiter == "":
        raise NanogemmaError("--delimiter must not be empty (use file, paragraph or line, or leave it out: auto)")
    if len(specs) == 1 and specs[0].startswith("synthetic:"):
        m = re.fullmatch(r"synthetic:([\d_]+)", specs[0])
        n = int(m.group(1)) if m else 0
        if n < 2:
            raise NanogemmaError(f"{specs[0]!r}: write synthetic:N with N >= 2 stories, e.g. synthetic:10000")
        return SyntheticSource(n, seed, val_fraction)
    if len(specs) == 1 and (specs[0].startswith("hf:") or not Path(specs[0]).expanduser().exists()):
        name = specs[0].removeprefix("hf:")
        if specs[0].startswith("hf:") or re.fullmatch(r"[\w.-]+/[\w.-]+", name):
            return HubSource(name, config=hf_config, text_column=text_column, split=split, val_split=val_split)
    missing = [s for s in specs if not Path(s).expanduser().exists()]
    if missing:
        raise NanogemmaError(f"source not found: {missing[0]} (give files or folders, synthetic:N, "
                             "or a Hugging Face dataset name such as roneneldan/TinyStories)")
    return LocalSource([Path(s).expanduser() for s in specs], text_column=text_column, delimiter=delimiter,
                       split=split, val_split=val_split, glob=glob)
