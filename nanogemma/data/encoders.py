"""The tokenizers a dataset can be prepared with, behind one interface that training and sampling reuse.

Specs (the `--tokenizer` values):

* `gpt2`: GPT-2's byte-pair encoding through tiktoken (50,257 ids, stored as uint16). Each document is
  written as `text <|endoftext|>`. The vocabulary comes from tiktoken's own download or cache; when that
  fails (no network), from a ranks file named by `--tokenizer-file` or `$NANOGEMMA_GPT2_TIKTOKEN`. A copy is
  saved beside the token files, so a prepared folder never needs the network again.
* `gemma`: the official Gemma 3 tokenizer (`nanogemma.tokenizer`; 262,144 ids, so uint32). Gemma was
  trained on documents that start with `<bos>`, so each document is written as `<bos> text <eos>`.
* `bpe:N`: a byte-level BPE of N ids (`<|endoftext|>` included) trained with the `tokenizers` library on
  the training split, saved as `tokenizer.json` beside the token files. Documents: `text <|endoftext|>`.

Text is always encoded as plain text: a document that happens to contain "<|endoftext|>" or "<eos>" gets
the tokens of those characters, never the special id, so only the pipeline places document boundaries.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import shutil
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from ..errors import NanogemmaError

ENDOFTEXT = "<|endoftext|>"
GPT2_RANKS_ENV = "NANOGEMMA_GPT2_TIKTOKEN"
GPT2_RANKS_FILE = "gpt2.tiktoken"
# GPT-2's pre-tokenizer: contractions, letter runs, digit runs, punctuation runs (each with an optional
# leading space), then whitespace, where a run of spaces leaves its last space to the next word.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
BPE_FILE = "tokenizer.json"
GEMMA_DIR = "gemma-tokenizer"
MIN_BPE = 257  # 256 byte tokens + <|endoftext|>


class DataTokenizer(ABC):
    """Text <-> ids plus the document framing used in the token files."""

    spec: str
    vocab_size: int
    eot_id: int  # written after every document
    bos_id: int | None = None  # written before every document (gemma only)

    @abstractmethod
    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text, as plain text (no framing, special-token names not special)."""

    @abstractmethod
    def decode(self, ids: list[int] | np.ndarray) -> str:
        """The text of ids (special tokens spelled out)."""

    @abstractmethod
    def save(self, folder: Path) -> list[str]:
        """Write the files needed to load this tokenizer again into `folder`; return their names."""

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    @property
    def dtype(self) -> np.dtype:
        """uint16 when every id fits, else uint32."""
        return np.dtype(np.uint16 if self.vocab_size <= 1 << 16 else np.uint32)

    @property
    def framing_tokens(self) -> int:
        return 1 + (self.bos_id is not None)

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        """One flat array: for each text, [bos] ids eot."""
        flat: list[int] = []
        pre = [] if self.bos_id is None else [self.bos_id]
        for ids in self.encode_batch(texts):
            flat += pre
            flat += ids
            flat.append(self.eot_id)
        return np.array(flat, dtype=self.dtype)

    def split_documents(self, tokens: np.ndarray) -> list[list[int]]:
        """Cut a token stream at the end-of-text ids and drop the framing: the ids of each document."""
        ends = np.flatnonzero(tokens == self.eot_id)
        docs, start = [], 0
        for end in ends:
            doc = tokens[start:end].tolist()
            if self.bos_id is not None and doc[:1] == [self.bos_id]:
                doc = doc[1:]
            docs.append(doc)
            start = end + 1
        return docs

    def decode_documents(self, tokens: np.ndarray) -> list[str]:
        """The texts of the documents in a token stream."""
        return [self.decode(d) for d in self.split_documents(tokens)]

    def describe(self) -> dict:
        doc = ("<bos> " if self.bos_id is not None else "") + "text " + self.decode([self.eot_id])
        return {"spec": self.spec, "vocab_size": self.vocab_size, "eot_id": self.eot_id,
                "bos_id": self.bos_id, "document": doc}


class Gpt2Tokenizer(DataTokenizer):
    spec, eot_id = "gpt2", 50256

    def __init__(self, encoding, ranks_file: Path | None = None) -> None:
        self.enc = encoding
        self.vocab_size = encoding.n_vocab
        self.ranks_file = ranks_file  # where the vocabulary was read from, if from a file

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.enc.encode_ordinary(t) for t in texts]

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        # One call for the whole batch, straight into an array: "a<|endoftext|>b<|endoftext|>" with the
        # special token allowed. tiktoken cuts the text at special tokens before its regex and BPE run, so
        # each document is encoded exactly as on its own. Only valid when no document spells the special
        # token itself, which the count checks.
        joined = ENDOFTEXT.join(texts) + ENDOFTEXT
        if joined.count(ENDOFTEXT) == len(texts):
            try:
                ids = self.enc.encode_to_numpy(joined, allowed_special={ENDOFTEXT}, disallowed_special=())
                return ids.astype(self.dtype)
            except UnicodeEncodeError:  # lone surrogates: the per-document path below copes with them
                pass
        return super().encode_documents(texts)

    def decode(self, ids: list[int] | np.ndarray) -> str:
        return self.enc.decode(list(map(int, ids)))

    def save(self, folder: Path) -> list[str]:
        if self.ranks_file is not None:
            shutil.copyfile(self.ranks_file, folder / GPT2_RANKS_FILE)
        else:  # from tiktoken's download: write its format, one "base64(token bytes) rank" line per token
            lines = (base64.b64encode(self.enc.decode_single_token_bytes(i)).decode() + f" {i}\n"
                     for i in range(self.eot_id))
            (folder / GPT2_RANKS_FILE).write_text("".join(lines), encoding="ascii")
        return [GPT2_RANKS_FILE]


class GemmaDataTokenizer(DataTokenizer):
    spec = "gemma"

    def __init__(self, tok) -> None:
        self.tok = tok
        self.backend = tok.backend
        self.backend.encode_special_tokens = True  # "<eos>" written in a document stays text
        self.vocab_size, self.eot_id, self.bos_id = tok.vocab_size, tok.eos_id, tok.bos_id

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: list[int] | np.ndarray) -> str:
        return self.tok.decode(list(map(int, ids)))

    def save(self, folder: Path) -> list[str]:
        self.tok.save(folder / GEMMA_DIR)
        return sorted(f"{GEMMA_DIR}/{p.name}" for p in (folder / GEMMA_DIR).iterdir())


class BpeTokenizer(DataTokenizer):
    def __init__(self, backend, spec: str) -> None:
        self.backend = backend
        self.backend.encode_special_tokens = True
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)  # < N when the corpus ran out of pairs
        self.spec = spec
        self.eot_id = backend.token_to_id(ENDOFTEXT)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: list[int] | np.ndarray) -> str:
        return self.backend.decode(list(map(int, ids)), skip_special_tokens=False)

    def save(self, folder: Path) -> list[str]:
        self.backend.save(str(folder / BPE_FILE))
        return [BPE_FILE]


def parse_spec(spec: str) -> tuple[str, int | None]:
    """("gpt2", None), ("gemma", None) or ("bpe", N); anything else is a user error."""
    m = re.fullmatch(r"bpe:(\d+)", spec.strip())
    if m:
        n = int(m.group(1))
        if not MIN_BPE <= n <= 1 << 32:
            raise NanogemmaError(f"bpe:{n}: the vocabulary size must be between {MIN_BPE} and 2**32")
        return "bpe", n
    if spec in ("gpt2", "gemma"):
        return spec, None
    raise NanogemmaError(f"unknown tokenizer {spec!r}: use gpt2, gemma or bpe:N (a BPE of N tokens trained here)")


def _read_ranks(path: Path) -> dict[bytes, int]:
    """A tiktoken ranks file: one "base64(token) rank" line per token. (Read here rather than with tiktoken's
    loader, which caches local files by path name in a temporary folder and so can serve stale contents.)"""
    ranks = {}
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        if line.strip():
            try:
                token, rank = line.split()
                ranks[binascii.a2b_base64(token, strict_mode=True)] = int(rank)
            except ValueError:  # binascii.Error is a ValueError
                raise NanogemmaError(f"{path} is not a tiktoken ranks file (line {n}: {line[:40]!r})") from None
    return ranks


def _gpt2_from_ranks(path: Path) -> Gpt2Tokenizer:
    import tiktoken

    if not path.is_file():
        raise NanogemmaError(f"GPT-2 ranks file not found: {path}")
    ranks = _read_ranks(path)
    if len(ranks) != 50256 or ranks.get(b"Hello") != 15496:
        raise NanogemmaError(f"{path} is not the GPT-2 vocabulary ({len(ranks)} ranks; GPT-2 has 50,256)")
    enc = tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={ENDOFTEXT: 50256})
    return Gpt2Tokenizer(enc, path)


def load_gpt2(ranks_file: str | Path | None = None) -> Gpt2Tokenizer:
    """GPT-2 from tiktoken's download or cache, else from `ranks_file`, else from $NANOGEMMA_GPT2_TIKTOKEN."""
    import tiktoken

    try:
        return Gpt2Tokenizer(tiktoken.get_encoding("gpt2"))
    except Exception as e:  # no network: requests' ConnectionError, or anything else on the way
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
    for candidate in (ranks_file, os.environ.get(GPT2_RANKS_ENV)):
        if candidate:
            return _gpt2_from_ranks(Path(candidate).expanduser())
    raise NanogemmaError(
        f"cannot load the gpt2 tokenizer: tiktoken could not download its vocabulary ({reason}); give a local "
        f"copy of gpt2.tiktoken with --tokenizer-file PATH or the environment variable {GPT2_RANKS_ENV}")


def load_gemma(source: str | Path | None = None) -> GemmaDataTokenizer:
    """The official Gemma 3 tokenizer (default model), or one from a saved folder / .gguf."""
    from ..tokenizer import load_tokenizer

    return GemmaDataTokenizer(load_tokenizer(None if source is None else str(source)))


def train_bpe(texts, vocab_size: int) -> BpeTokenizer:
    """A byte-level BPE with GPT-2's pre-tokenizer, trained on an iterable of texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[ENDOFTEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer=trainer)
    return BpeTokenizer(backend, f"bpe:{vocab_size}")


def load_bpe(path: Path, spec: str) -> BpeTokenizer:
    from tokenizers import Tokenizer

    if not path.is_file():
        raise NanogemmaError(f"BPE tokenizer file not found: {path}")
    try:
        return BpeTokenizer(Tokenizer.from_file(str(path)), spec)
    except Exception as e:
        raise NanogemmaError(f"{path} is not a tokenizers JSON file ({e})") from None


def load_saved(spec: str, folder: Path, names: list[str] | None = None) -> DataTokenizer:
    """The tokenizer saved in a prepared folder (or under the temporary names of a run in progress)."""
    kind, n = parse_spec(spec)
    names = names or []
    if kind == "gpt2":
        return _gpt2_from_ranks(folder / (names[0] if names else GPT2_RANKS_FILE))
    if kind == "bpe":
        tok = load_bpe(folder / (names[0] if names else BPE_FILE), spec)
        if tok.vocab_size > n:
            raise NanogemmaError(f"{folder}: the saved BPE has {tok.vocab_size} ids, more than {spec}")
        return tok
    saved = folder / GEMMA_DIR
    return load_gemma(saved if saved.is_dir() else None)


def load_data_tokenizer(spec: str | None = None, folder: str | Path | None = None) -> DataTokenizer:
    """The tokenizer of a prepared folder (read from its meta.json), or a fresh one for `spec`.

    With a folder, the tokenizer is loaded from the files saved there, so training, sampling and evaluation
    use exactly the ids in the token files; `spec`, if given, must match the folder's.
    """
    if folder is not None:
        from .store import read_meta

        meta = read_meta(Path(folder))
        saved = meta["tokenizer"]["spec"]
        if spec is not None and parse_spec(spec)[0] != parse_spec(saved)[0]:
            raise NanogemmaError(f"{folder} was prepared with the {saved} tokenizer, not {spec}")
        return load_saved(saved, Path(folder), meta["tokenizer"].get("files"))
    if spec is None:
        raise NanogemmaError("give a tokenizer spec or a prepared data folder")
    kind, _ = parse_spec(spec)
    if kind == "bpe":
        raise NanogemmaError(f"{spec} is trained by `nanogemma prepare`: load it from the prepared folder")
    return load_gpt2() if kind == "gpt2" else load_gemma()
