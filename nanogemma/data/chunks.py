"""Chunks: small, picklable descriptions of a run of documents, turned into texts inside a worker.

The main process only cuts the input into chunks (raw bytes of whole lines or whole documents, a Parquet
row group, a batch of strings); decoding, splitting, tokenizing all happen in the workers. A chunk's
documents depend only on the chunk, so the output is the same whatever the number of workers.

Invalid UTF-8 never stops a run: each invalid byte sequence becomes U+FFFD, and the bytes are counted so
that the pipeline can report them.

The readers below share a shape on purpose (`duplicates` pairs them): each format's values come from its
own library and need their own checks, and a common helper would hide which check belongs to which format.
"""

from __future__ import annotations

import codecs
import gzip
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import NanogemmaError

CHUNK_BYTES = 1 << 20  # about 250k GPT-2 tokens: big enough to amortise the hand-off, small enough to balance
CHUNK_ROWS = 2048  # documents per chunk for sources that yield strings
MAX_DOCUMENT_BYTES = 1 << 28  # a longer "document" means a wrong delimiter: stop before memory runs out

_bad = [0]  # bytes replaced by the error handler below, since the last reset (one decode at a time)


def _count_and_replace(exc: UnicodeError) -> tuple[str, int]:
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    _bad[0] += exc.end - exc.start
    return "\ufffd", exc.end


codecs.register_error("nanogemma-count", _count_and_replace)


def decode_utf8(data: bytes) -> tuple[str, int]:
    """(text, number of invalid bytes), each invalid sequence replaced by U+FFFD."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        _bad[0] = 0
        return data.decode("utf-8", "nanogemma-count"), _bad[0]


_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class Docs:
    """What reading a chunk gives: the documents and the problems met on the way."""

    texts: list[str] = field(default_factory=list)
    bad_bytes: int = 0  # invalid UTF-8 bytes (or lone surrogates from JSON escapes), replaced by U+FFFD
    empty: int = 0  # empty documents skipped

    def add(self, text: str | None) -> None:
        if text is None or not text.strip():
            self.empty += 1
        else:
            self.texts.append(text)


@dataclass(frozen=True)
class TextChunk:
    """Whole lines (delimiter None: one document per line), whole delimited documents of a text file, or
    (`whole`) the whole file as one document."""

    origin: str
    data: bytes
    delimiter: str | None
    whole: bool = False

    def read(self) -> Docs:
        text, bad = decode_utf8(self.data)
        docs = Docs(bad_bytes=bad)
        if self.whole:
            docs.add(text.strip())
        elif self.delimiter is None:
            parts = text.split("\n")
            if parts and parts[-1] == "":  # the final newline ends the last line, it opens no new one
                parts.pop()
            for line in parts:
                docs.add(line[:-1] if line.endswith("\r") else line)
        else:
            parts = text.split(self.delimiter)
            last = parts.pop()  # after the chunk's last delimiter: a final document without one, or nothing
            for part in parts:
                docs.add(part.strip())
            if last.strip():
                docs.add(last.strip())
        return docs


@dataclass(frozen=True)
class JsonlChunk:
    """Whole lines of a JSON-lines file; `field` holds each document's text."""

    origin: str
    data: bytes
    field: str
    first_line: int  # 1-based number of the chunk's first line in its file, for messages

    def read(self) -> Docs:
        text, bad = decode_utf8(self.data)
        docs = Docs(bad_bytes=bad)
        for n, line in enumerate(text.split("\n"), self.first_line):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise NanogemmaError(f"{self.origin} line {n} is not valid JSON ({e.msg}); fix or remove it") from None
            if not isinstance(record, dict):
                raise NanogemmaError(f"{self.origin} line {n} is not a JSON object; each line must be {{...}}")
            if self.field not in record:
                keys = ", ".join(map(str, list(record)[:12])) or "none"
                raise NanogemmaError(f"{self.origin} line {n} has no field {self.field!r} (it has: {keys}); "
                                     "name the text field with --text-column")
            value = record[self.field]
            if value is not None and not isinstance(value, str):
                raise NanogemmaError(f"{self.origin} line {n}: field {self.field!r} is "
                                     f"{type(value).__name__}, not text; name the text field with --text-column")
            if value and _SURROGATE.search(value):  # "\ud800" escapes decode to characters UTF-8 cannot hold
                docs.bad_bytes += len(_SURROGATE.findall(value))
                value = _SURROGATE.sub("\ufffd", value)
            docs.add(value)
        return docs


@dataclass(frozen=True)
class ParquetChunk:
    """One row group of a Parquet file's text column."""

    origin: str
    path: str
    row_group: int
    column: str

    def read(self) -> Docs:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            col = pq.ParquetFile(self.path).read_row_group(self.row_group, columns=[self.column]).column(0)
        except (OSError, pa.ArrowException) as e:
            raise NanogemmaError(f"{self.origin}: cannot read row group {self.row_group} ({e})") from None
        docs = Docs()
        binary = pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type)
        for value in col.to_pylist():
            if binary and value is not None:
                value, bad = decode_utf8(value)
                docs.bad_bytes += bad
            docs.add(value)
        return docs


@dataclass(frozen=True)
class ListChunk:
    """Documents already in memory (a batch from the `datasets` library)."""

    origin: str
    texts: list

    def read(self) -> Docs:
        docs = Docs()
        for value in self.texts:
            if value is not None and not isinstance(value, str):
                raise NanogemmaError(f"{self.origin}: the text column holds {type(value).__name__}, not text; "
                                     "name the text column with --text-column")
            docs.add(value)
        return docs


@dataclass(frozen=True)
class SyntheticChunk:
    """Stories start .. start+count-1 of a split of the synthetic grammar."""

    origin: str
    seed: int
    split: str
    start: int
    count: int

    def read(self) -> Docs:
        from .synthetic import stories

        return Docs(texts=list(stories(self.count, self.seed, self.split, self.start)))


Chunk = TextChunk | JsonlChunk | ParquetChunk | ListChunk | SyntheticChunk


def split_file(path: Path, separator: bytes, block: int = CHUNK_BYTES) -> Iterator[tuple[bytes, int]]:
    """Cut a (possibly gzipped) file into blocks that end just after a separator: (bytes, lines before them).

    Memory holds one block, or one document when a document is longer than a block. Cutting after an
    ASCII separator, or after a whole UTF-8 delimiter, never cuts a UTF-8 character in two.
    """
    opener = gzip.open if path.name.endswith(".gz") else open
    lines = 0
    buf = bytearray()
    try:
        with opener(path, "rb") as f:
            while True:
                data = f.read(block)
                if not data:
                    break
                searched = max(0, len(buf) - len(separator) + 1)
                buf += data
                cut = buf.rfind(separator, searched)
                if cut < 0:
                    if len(buf) > MAX_DOCUMENT_BYTES:
                        raise NanogemmaError(f"{path}: no {separator.decode(errors='replace')!r} in the first "
                                             f"{len(buf):,} bytes; is the --delimiter right?")
                    continue
                cut += len(separator)
                piece = bytes(buf[:cut])
                del buf[:cut]
                yield piece, lines
                lines += piece.count(b"\n")
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise NanogemmaError(f"{path} is not a valid gzip file ({e}); re-download or decompress it") from None
    if buf:
        yield bytes(buf), lines
