"""The Gemma 3 tokenizer, from a GGUF file or a Hugging Face folder, on the `tokenizers` library.

How Gemma tokenizes:

* SentencePiece-style BPE over a 262,144-piece vocabulary. Spaces are spelled "▁" (U+2581) inside pieces,
  and, unlike Llama, no "▁" is prepended to the text: "Hello" and " Hello" are different tokens.
* Nothing is pre-split: runs of spaces, newlines and tabs have their own pieces ("▁▁▁", "\\n\\n").
* Byte fallback: a character with no piece is written as its UTF-8 bytes, pieces "<0x00>".."<0xFF>", so no
  text ever maps to <unk>, and decoding glues the bytes back into the character.
* Special tokens (<pad> 0, <eos> 1, <bos> 2, <unk> 3, <start_of_turn> 105, <end_of_turn> 106, ...) are
  matched whole in raw text, before BPE; "user-defined" pieces such as "\\n\\n" or "<table>" likewise.
  `encode` puts <bos> in front by default; the chat format is `<start_of_turn>user\\n...<end_of_turn>\\n`.

A GGUF stores the pieces, their scores and types, but no merge list, so `from_gguf` derives the merges
(see `vocabulary._derive_merges`) and caches the finished `tokenizer.json` under the nanogemma cache directory, keyed
by the file's SHA-256, with a SentencePiece model of the same vocabulary beside it. The first build takes
a while (mostly the GGUF parser). Loading the `tokenizer.json` with `tokenizers` is a large share of a
cold start's wait for the first token, so later starts encode and decode with the `sentencepiece` library
instead (`SentencePieceEngine`), which loads the same vocabulary about ten times faster and gives the same
ids (load times: docs/BENCHMARKS.md); the
`tokenizers` object is loaded only when something needs it (data preparation, export).

A GGUF may also hold a byte-level BPE (`tokenizer.ggml.model` "gpt2" with GPT-2's pre-tokenizer), which is
what `nanogemma export --to gguf` writes for models trained on GPT-2 or `bpe:N` data; it is read back here
with its merges (`vocabulary._read_gguf_byte_level`).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _Backend

from .errors import NanogemmaError
from .files import atomic_path, clean_orphans, manifest_ok, read_json, write_manifest
from .vocabulary import (  # the vocabulary formats: GGUF pieces, SentencePiece protobuf
    BYTE,
    CONTROL,
    UNKNOWN,
    _build,
    _read_gguf_tokenizer,
    _read_sentencepiece,
    _sentencepiece_model,
    _space_run,
)

_BUILD_VERSION = 3  # bump when the built tokenizer changes, to invalidate caches
_SPECIAL_NAMES = {"bos": "<bos>", "eos": "<eos>", "unk": "<unk>", "pad": "<pad>"}


class Tokenizer:
    """Text <-> token ids, exactly as the reference Gemma 3 tokenizer does it.

    `backend` is the `tokenizers` object, or a function that loads it on first use. `fast`, when given, is
    a `SentencePieceEngine` with the same vocabulary that does the encoding and decoding instead.
    """

    def __init__(self, backend: _Backend | Callable[[], _Backend], *, bos_id: int, eos_id: int, pad_id: int,
                 unk_id: int, add_bos_token: bool = True, fast: SentencePieceEngine | None = None) -> None:
        self._backend = backend
        self.fast = fast
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos_id, eos_id, pad_id, unk_id
        self.add_bos_token = add_bos_token  # False for models that want no <bos>: then encode never adds it
        self.start_of_turn_id = self.token_to_id("<start_of_turn>")
        self.end_of_turn_id = self.token_to_id("<end_of_turn>")

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id})"

    @property
    def backend(self) -> _Backend:
        """The `tokenizers.Tokenizer` (data preparation and export use it directly)."""
        if callable(self._backend):
            self._backend = self._backend()
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (the model's embedding rows)."""
        if self.fast is not None:
            return len(self.fast)
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text become their ids."""
        if self.fast is not None:
            return self._with_bos(self.fast.encode(text), add_bos)
        return self._with_bos(self.backend.encode(text, add_special_tokens=False).ids, add_bos)

    def encode_plain(self, text: str) -> list[int]:
        """Ids of `text` with every character as text: "<start_of_turn>" written in it becomes the pieces of
        those characters, not the control token (transformers' `split_special_tokens=True`)."""
        if self.fast is not None:
            return self.fast._encode_plain(text)
        backend = self.backend
        before = backend.encode_special_tokens
        backend.encode_special_tokens = True
        try:
            return backend.encode(text, add_special_tokens=False).ids
        finally:
            backend.encode_special_tokens = before

    def encode_batch(self, texts: list[str], add_bos: bool = True) -> list[list[int]]:
        """`encode` for many texts at once."""
        if self.fast is not None:
            return [self._with_bos(self.fast.encode(t), add_bos) for t in texts]
        encs = self.backend.encode_batch(list(texts), add_special_tokens=False)
        return [self._with_bos(e.ids, add_bos) for e in encs]

    def _with_bos(self, ids: list[int], add_bos: bool) -> list[int]:
        return [self.bos_id, *ids] if add_bos and self.add_bos_token else ids

    def decode(self, ids: Sequence[int] | Any, skip_special: bool = False) -> str:
        """Text of `ids` (a list or a 0/1-d tensor); special tokens are kept unless `skip_special`."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        if self.fast is not None:
            return self.fast.decode(list(ids), skip_special)
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        """Id of a piece as the vocabulary spells it (spaces as "▁"), or None."""
        return self.fast.piece_id(token) if self.fast is not None else self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        """Piece of an id, or None when out of range."""
        if self.fast is not None:
            return self.fast.sp.id_to_piece(i) if 0 <= i < len(self.fast) else None
        return self.backend.id_to_token(i)

    def pieces(self) -> list[str]:
        """Every piece, indexed by id."""
        if self.fast is not None:
            return self.fast.sp.id_to_piece(list(range(len(self.fast))))
        return [p for p, _ in sorted(self.backend.get_vocab().items(), key=lambda item: item[1])]

    def save(self, folder: str | Path) -> None:
        """Write a Hugging Face tokenizer folder: `AutoTokenizer.from_pretrained(folder)` gives the same ids."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        spec = json.loads(self.backend.to_str())
        merges = spec["model"].get("merges") or []
        if merges and all(isinstance(m, list) and " " not in m[0] + m[1] for m in merges):
            # The older "a b" spelling of merges, unambiguous when no piece holds a space, parses faster
            # than ["a", "b"] pairs: a visible share of every start's tokenizer load.
            spec["model"]["merges"] = [f"{a} {b}" for a, b in merges]
        (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
        special = {f"{k}_token": self.backend.id_to_token(getattr(self, f"{k}_id")) for k in _SPECIAL_NAMES}
        config = {
            "tokenizer_class": "GemmaTokenizer",
            **special,
            "add_bos_token": self.add_bos_token,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "padding_side": "left",
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
        (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False))

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """The tokenizer embedded in a GGUF file; built once, then loaded from the cache."""
        from .weight_files import cache_unwritable

        path = Path(path).expanduser()
        if not path.is_file():
            raise NanogemmaError(f"GGUF file not found: {path}")
        cached = gguf_tokenizer_folder(path)
        manifest = cached / _MANIFEST
        if cached.is_dir():
            # Every file is checked against the sizes and digests recorded when the folder was built (cheaply:
            # see files.manifest_ok); damage found is rebuilt once, here, not met again at every start.
            if manifest_ok(manifest):
                try:
                    return cls.from_hf(cached)
                except NanogemmaError:
                    pass
            if manifest.is_file():  # (a cache from before digests were recorded is rebuilt once, quietly)
                print(f"nanogemma: warning: the tokenizer cache {cached} was damaged: rebuilding it from {path}",
                      file=sys.stderr)
        backend, ids, pieces, types = _read_gguf_tokenizer(path)
        tok = cls(backend, **ids)
        try:  # best effort: a read-only cache only costs speed (and says so)
            cached.parent.mkdir(parents=True, exist_ok=True)
            clean_orphans(cached.parent)
            with atomic_path(cached, folder=True) as tmp:  # readers see the whole folder or none
                tmp.chmod(0o755)
                tok.save(tmp)
                tok.fast = SentencePieceEngine.write(tmp / SentencePieceEngine.FILE, pieces, types, tok)
                write_manifest(tmp / _MANIFEST, sorted(f for f in tmp.iterdir() if f.name != _MANIFEST))
        except OSError as e:
            cache_unwritable(cached, e)
        return tok

    @classmethod
    def from_hf(cls, folder: str | Path) -> Tokenizer:
        """A Hugging Face tokenizer folder: `tokenizer.json`, or failing that `tokenizer.model`."""
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise NanogemmaError(f"tokenizer folder not found: {folder}")
        config: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
            if (folder / name).is_file():
                config.update(read_json(folder / name, "tokenizer file", "restore the tokenizer files"))
        names = {}
        for key, default in _SPECIAL_NAMES.items():
            name = config.get(f"{key}_token") or default
            names[key] = name.get("content", default) if isinstance(name, dict) else name
        fast = None
        if (folder / "tokenizer.json").is_file() and (folder / SentencePieceEngine.FILE).is_file():
            # Only nanogemma's own cache holds this file next to tokenizer.json (a Hugging Face folder's
            # tokenizer.model is named tokenizer.model): the same vocabulary, checked when it was written.
            try:
                fast = SentencePieceEngine(folder / SentencePieceEngine.FILE)
            except (ImportError, RuntimeError, OSError):  # no sentencepiece, or a damaged file: tokenizer.json
                pass
        if fast is not None:
            backend: _Backend | Callable[[], _Backend] = lambda: _read_tokenizer_json(folder / "tokenizer.json")
        elif (folder / "tokenizer.json").is_file():
            backend = _read_tokenizer_json(folder / "tokenizer.json")
        elif (folder / "tokenizer.model").is_file():
            pieces, types = _read_sentencepiece(folder / "tokenizer.model")
            backend = _build(pieces, types, unk=names["unk"], bos=names["bos"])
        else:
            raise NanogemmaError(f"{folder} holds neither tokenizer.json nor tokenizer.model: "
                                 "copy the model's tokenizer files there, or pass a .gguf file")
        token_to_id = fast.piece_id if fast is not None else backend.token_to_id
        ids = {f"{key}_id": token_to_id(name) for key, name in names.items()}
        ids["pad_id"] = ids["eos_id"] if ids["pad_id"] is None else ids["pad_id"]
        missing = [names[k[:-3]] for k, v in ids.items() if v is None]
        if missing:
            raise NanogemmaError(f"{folder}: the vocabulary lacks {', '.join(missing)}; "
                                 "name the special tokens in tokenizer_config.json")
        return cls(backend, **ids, add_bos_token=bool(config.get("add_bos_token", True)), fast=fast)

_MANIFEST = "nanogemma-manifest.json"  # a cached tokenizer folder's file sizes and digests


def _read_tokenizer_json(path: Path) -> _Backend:
    """`tokenizers`' reading of a tokenizer.json; a damaged file is one line naming it."""
    try:
        return _Backend.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
        raise NanogemmaError(f"{path} is damaged or not a tokenizer.json ({str(e)[:120]}); restore the "
                             "tokenizer files (a cached one is rebuilt when its GGUF is loaded again)") from None


class SentencePieceEngine:
    """Gemma's BPE run by the `sentencepiece` library, giving the reference's ids.

    SentencePiece merges the adjacent pair whose joined piece scores best, as `tokenizers` merges by rank,
    so with each piece scored by minus its position the two agree, byte fallback and user-defined pieces
    included. Two differences remain, and are closed here:

    * SentencePiece never reads a control token such as <start_of_turn> in text; the reference does. The
      text is cut at every "<...>" that names a control token, and the rest encoded around it.
    * It cuts a run of more than 31 spaces greedily, 31 first; the reference's merges join the smallest
      adjacent chunks first ("▁▁" ranks above "▁▁▁", and so on up to 31), which `_space_run` replays.
    """

    FILE = "nanogemma-sentencepiece.model"
    _CANDIDATE = re.compile(r"<[^<>]+>")
    _SPACE_RUN = re.compile("[ ▁]{32,}")  # a literal "▁" is a space too
    _CHECK = ("Hello world <start_of_turn>user\n  x\t\t¿Qué? 日本語 😀 <0x41> " + " " * 45 + "<eos>\n\n")

    def __init__(self, model_file: str | Path) -> None:
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self._size = self.sp.get_piece_size()
        self._runs = [self.piece_id("▁" * k) for k in range(32)]

    def __len__(self) -> int:
        return self._size

    @classmethod
    def write(cls, path: Path, pieces: list[str], types: list[int], tok: Tokenizer) -> SentencePieceEngine | None:
        """Write the model for this vocabulary and return its engine, if it gives `tok`'s ids; else None."""
        specials = [p for p, t in zip(pieces, types, strict=True) if t in (UNKNOWN, CONTROL)]
        if not all(cls._CANDIDATE.fullmatch(p) for p in specials) or types.count(BYTE) != 256:
            return None
        path.write_bytes(_sentencepiece_model(pieces, types, tok))
        try:
            engine = cls(path)
            if all(engine.encode(t) == tok.encode(t, add_bos=False) for t in (cls._CHECK, *specials[:50])):
                return engine
        except (ImportError, RuntimeError, OSError):
            pass
        path.unlink()
        return None

    def piece_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)  # the <unk> id when the piece is unknown
        return i if 0 <= i < self._size and self.sp.id_to_piece(i) == piece else None

    def encode(self, text: str) -> list[int]:
        ids, start = [], 0
        for m in self._CANDIDATE.finditer(text):
            i = self.piece_id(m.group())
            if i is not None and (self.sp.is_control(i) or self.sp.is_unknown(i)):
                ids += self._encode_plain(text[start:m.start()])
                ids.append(i)
                start = m.end()
        return ids + self._encode_plain(text[start:])

    def _encode_plain(self, text: str) -> list[int]:
        ids, start = [], 0
        for m in self._SPACE_RUN.finditer(text):
            ids += self.sp.encode(text[start:m.start()])
            ids += [self._runs[k] for k in _space_run(m.end() - m.start())]
            start = m.end()
        return ids + self.sp.encode(text[start:])

    def decode(self, ids: list[int], skip_special: bool) -> str:
        """As the reference: "▁" is a space, byte pieces join into characters (U+FFFD per byte if they do
        not form one), special tokens are written out unless skipped, ids out of range are dropped."""
        ids = [i for i in ids if 0 <= i < self._size]
        if skip_special:  # before joining bytes: bytes on either side of a skipped token form one character
            ids = [i for i in ids if not (self.sp.is_control(i) or self.sp.is_unknown(i))]
        out, pending = [], bytearray()
        for i, piece in zip(ids, self.sp.id_to_piece(ids), strict=True):
            if piece.startswith("<0x") and self.sp.is_byte(i):
                pending.append(int(piece[3:-1], 16))
                continue
            if pending:
                out.append(_bytes_to_text(pending))
                pending.clear()
            out.append(piece.replace("▁", " "))
        if pending:
            out.append(_bytes_to_text(pending))
        return "".join(out)


def _bytes_to_text(data: bytearray) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(data)


def gguf_tokenizer_folder(path: str | Path) -> Path:
    """Where `Tokenizer.from_gguf` caches a GGUF's tokenizer as a Hugging Face folder (it exists once the
    tokenizer was loaded, unless the cache is read-only): export copies it rather than writing it again."""
    from .weight_files import cache_dir, file_digest

    return cache_dir() / "tokenizers" / f"{file_digest(path)[:32]}-v{_BUILD_VERSION}"


def load_tokenizer(source: str | Path | None = None) -> Tokenizer:
    """None -> the default 270M GGUF; a .gguf file; or a folder with tokenizer files (or one .gguf)."""
    if source is None:
        from .weight_files import default_gguf_path

        return Tokenizer.from_gguf(default_gguf_path())
    path = Path(source).expanduser()
    if path.is_file():
        return Tokenizer.from_gguf(path)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not any((path / n).is_file() for n in ("tokenizer.json", "tokenizer.model")) and len(ggufs) == 1:
            return Tokenizer.from_gguf(ggufs[0])
        return Tokenizer.from_hf(path)
    raise NanogemmaError(f"tokenizer source not found: {path} (pass a .gguf file or a tokenizer folder)")
