"""The Gemma 3 tokenizer, built on the `tokenizers` library from a GGUF file or a Hugging Face folder.

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
(see `_derive_merges`) and caches the finished `tokenizer.json` under the nanogemma cache directory, keyed
by the file's SHA-256: the first build takes a while (mostly the GGUF parser), later loads ~1 s.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend
from tokenizers.models import BPE

from .errors import NanogemmaError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4  # SentencePiece piece types (GGUF uses the same numbers)
_BUILD_VERSION = 2  # bump when the built tokenizer changes, to invalidate caches
_SPECIAL_NAMES = {"bos": "<bos>", "eos": "<eos>", "unk": "<unk>", "pad": "<pad>"}


class Tokenizer:
    """Text <-> token ids, exactly as the reference Gemma 3 tokenizer does it."""

    def __init__(self, backend: _Backend, *, bos_id: int, eos_id: int, pad_id: int, unk_id: int,
                 add_bos_token: bool = True) -> None:
        self.backend = backend
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos_id, eos_id, pad_id, unk_id
        self.add_bos_token = add_bos_token  # False for models that want no <bos>: then encode never adds it
        self.start_of_turn_id = backend.token_to_id("<start_of_turn>")
        self.end_of_turn_id = backend.token_to_id("<end_of_turn>")

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id})"

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (the model's embedding rows)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text become their ids."""
        return self._with_bos(self.backend.encode(text, add_special_tokens=False).ids, add_bos)

    def encode_batch(self, texts: list[str], add_bos: bool = True) -> list[list[int]]:
        """`encode` for many texts at once, in parallel inside `tokenizers`."""
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
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        """Id of a piece as the vocabulary spells it (spaces as "▁"), or None."""
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        """Piece of an id, or None when out of range."""
        return self.backend.id_to_token(i)

    def save(self, folder: str | Path) -> None:
        """Write a Hugging Face tokenizer folder: `AutoTokenizer.from_pretrained(folder)` gives the same ids."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        spec = json.loads(self.backend.to_str())
        merges = spec["model"].get("merges") or []
        if merges and all(isinstance(m, list) and " " not in m[0] + m[1] for m in merges):
            # The older "a b" spelling of merges, unambiguous when no piece holds a space, parses 0.2 s
            # faster than ["a", "b"] pairs: a fifth of every start's tokenizer load.
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
        from .weight_files import cache_dir, file_digest

        path = Path(path).expanduser()
        if not path.is_file():
            raise NanogemmaError(f"GGUF file not found: {path}")
        cached = cache_dir() / "tokenizers" / f"{file_digest(path)[:32]}-v{_BUILD_VERSION}"
        if (cached / "tokenizer_config.json").is_file():
            return cls.from_hf(cached)
        backend, ids = _read_gguf_tokenizer(path)
        tok = cls(backend, **ids)
        try:  # best effort: a read-only cache only costs speed
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=".tmp-"))
            tmp.chmod(0o755)
            tok.save(tmp)
            try:
                tmp.rename(cached)  # atomic: readers see the whole folder or none
            except OSError:  # another process finished first
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass
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
                config.update(json.loads((folder / name).read_text(encoding="utf-8")))
        names = {}
        for key, default in _SPECIAL_NAMES.items():
            name = config.get(f"{key}_token") or default
            names[key] = name.get("content", default) if isinstance(name, dict) else name
        if (folder / "tokenizer.json").is_file():
            backend = _Backend.from_file(str(folder / "tokenizer.json"))
        elif (folder / "tokenizer.model").is_file():
            pieces, types = _read_sentencepiece(folder / "tokenizer.model")
            backend = _build(pieces, types, unk=names["unk"], bos=names["bos"])
        else:
            raise NanogemmaError(f"{folder} holds neither tokenizer.json nor tokenizer.model: "
                                 "copy the model's tokenizer files there, or pass a .gguf file")
        ids = {f"{key}_id": backend.token_to_id(name) for key, name in names.items()}
        ids["pad_id"] = ids["eos_id"] if ids["pad_id"] is None else ids["pad_id"]
        missing = [names[k[:-3]] for k, v in ids.items() if v is None]
        if missing:
            raise NanogemmaError(f"{folder}: the vocabulary lacks {', '.join(missing)}; "
                                 "name the special tokens in tokenizer_config.json")
        return cls(backend, **ids, add_bos_token=bool(config.get("add_bos_token", True)))


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


def _derive_merges(pieces: list[str]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary, best first.

    SentencePiece BPE repeatedly joins the adjacent pair whose joined piece ranks best, so every way of
    cutting a piece into two known pieces is a merge with that piece's rank; within one piece, longer left
    parts come first. The rank is the position in the vocabulary, not the stored score: normal pieces are
    stored best-first either way, but Gemma scores its whitespace runs ("▁▁".."▁" * 31, near the top)
    -1000, which would turn "  a" into "▁" "▁a" instead of "▁▁" "a". This is how the reference builds them;
    it matches SentencePiece itself except on runs of over 31 spaces, which SentencePiece cuts greedily.
    """
    known = set(pieces)
    return [(p[:k], p[k:]) for p in pieces for k in range(len(p) - 1, 0, -1) if p[:k] in known and p[k:] in known]


def _build(pieces: list[str], types: list[int], unk: str, bos: str | None) -> _Backend:
    """A `tokenizers` BPE with byte fallback over `pieces`, with Gemma's normalizer and decoder."""
    # A run of spaces may be stored with real spaces; the model sees spaces as "▁", so spell it that way.
    pieces = ["▁" * len(p) if " " in p and not p.strip() else p for p in pieces]
    vocab = {p: i for i, p in enumerate(pieces)}
    backend = _Backend(BPE(vocab, _derive_merges(pieces), unk_token=unk, fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.add_special_tokens([AddedToken(p, normalized=False, special=True)
                                for p, t in zip(pieces, types, strict=True) if t in (UNKNOWN, CONTROL)])
    # User-defined pieces ("\n\n", "<table>") are matched whole in the raw text, where spaces are still
    # spaces, so whitespace runs ("▁▁▁") are left to the merges, which build them first anyway.
    backend.add_tokens([AddedToken(p, normalized=False, special=False)
                        for p, t in zip(pieces, types, strict=True) if t == USER_DEFINED and "▁" not in p])
    if bos is not None:  # so that the saved tokenizer.json adds <bos> in transformers too
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, vocab[bos])])
    return backend


def _read_gguf_tokenizer(path: Path) -> tuple[_Backend, dict[str, Any]]:
    """(backend, special ids...) from a GGUF's `tokenizer.ggml.*` metadata."""
    from .weight_files import open_gguf

    reader = open_gguf(path)

    def field(key: str, default: Any = None) -> Any:
        f = reader.fields.get(f"tokenizer.ggml.{key}")
        return default if f is None else f.contents()

    if "tokenizer.ggml.tokens" not in reader.fields:
        raise NanogemmaError(f"{path} has no tokenizer inside; pass a tokenizer folder with tokenizer.json")
    if (model := field("model")) != "llama":
        raise NanogemmaError(f"{path}: tokenizer type {model!r} is not supported (only SentencePiece 'llama')")
    tokens = reader.fields["tokenizer.ggml.tokens"]
    pieces = [bytes(tokens.parts[i]).decode("utf-8") for i in tokens.data]
    types = list(field("token_type", [NORMAL] * len(pieces)))
    ids = {k: int(field(name, d)) for k, name, d in (("bos_id", "bos_token_id", 2), ("eos_id", "eos_token_id", 1),
                                                       ("unk_id", "unknown_token_id", 3),
                                                       ("pad_id", "padding_token_id", 0))}
    if field("add_space_prefix", False):
        raise NanogemmaError(f"{path}: tokenizers that prepend a space are not supported (Gemma's does not)")
    backend = _build(pieces, types, unk=pieces[ids["unk_id"]], bos=pieces[ids["bos_id"]])
    return backend, {**ids, "add_bos_token": bool(field("add_bos_token", True))}


def _proto(buf: memoryview) -> Iterator[tuple[int, Any]]:
    """(field number, value) pairs of one protobuf message: ints for varints, bytes otherwise."""
    pos = 0

    def varint() -> int:
        nonlocal pos
        value = shift = 0
        while True:
            b = buf[pos]
            pos += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return value

    while pos < len(buf):
        key = varint()
        wire = key & 7
        if wire == 0:
            yield key >> 3, varint()
            continue
        size = varint() if wire == 2 else {1: 8, 5: 4}.get(wire)
        if size is None:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield key >> 3, buf[pos:pos + size]
        pos += size


def _read_sentencepiece(path: Path) -> tuple[list[str], list[int]]:
    """Pieces and piece types of a SentencePiece `tokenizer.model` (a protobuf `ModelProto`), no dependency."""
    pieces, types = [], []
    settings = {"model_type": 1, "add_dummy_prefix": 1, "remove_extra_whitespaces": 1}  # protobuf defaults
    # TrainerSpec (field 2) {3: model_type}; NormalizerSpec (field 3) {3: add_dummy_prefix, 4: remove_extra_ws}
    wanted = {(2, 3): "model_type", (3, 3): "add_dummy_prefix", (3, 4): "remove_extra_whitespaces"}
    try:
        for field, value in _proto(memoryview(path.read_bytes())):
            if field == 1:  # SentencePiece {1: piece, 2: score, 3: type}
                entry = dict(_proto(value))
                pieces.append(bytes(entry[1]).decode("utf-8"))
                types.append(entry.get(3, NORMAL))
            elif field in (2, 3):
                settings.update({wanted[field, f]: v for f, v in _proto(value) if (field, f) in wanted})
    except (ValueError, IndexError, KeyError, UnicodeDecodeError) as e:
        raise NanogemmaError(f"{path} is not a valid SentencePiece model ({e}); provide tokenizer.json") from None
    if settings["model_type"] != 2 or settings["add_dummy_prefix"] or settings["remove_extra_whitespaces"]:
        raise NanogemmaError(f"{path}: only Gemma-style SentencePiece models are supported (BPE, no dummy "
                             f"prefix, whitespace kept; got {settings}); provide tokenizer.json instead")
    return pieces, types
