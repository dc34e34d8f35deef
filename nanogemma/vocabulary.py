"""Stored vocabularies -> a `tokenizers` backend, and back: what `tokenizer.py` builds its Tokenizer from.

* A GGUF's SentencePiece vocabulary (pieces, scores, types) holds no merge list: `_derive_merges` finds
  the merges its scores imply, `_build` assembles Gemma's BPE (byte fallback, special and user-defined
  pieces matched whole, no pre-splitting) on the `tokenizers` library.
* A GGUF written by `nanogemma export --to gguf` for a GPT-2 / `bpe:N` model holds a byte-level BPE with
  its merges (`_read_gguf_byte_level`).
* A `tokenizer.model` is a SentencePiece protobuf: `_proto` reads its wire format (no protobuf library
  needed), `_read_sentencepiece` its pieces; `_sentencepiece_model` writes one for the fast engine.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend
from tokenizers.models import BPE

from .errors import NanogemmaError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # SentencePiece piece types, as in GGUF


def _space_run(n: int) -> list[int]:
    """Chunk lengths the reference's BPE cuts n spaces into: for k = 2..31 in turn, join adjacent chunks
    that add up to k, leftmost first (a join only makes chunks longer than k, so one pass per k is enough)."""
    chunks = [1] * n
    for k in range(2, 32):
        joined, i = [], 0
        while i < len(chunks):
            if i + 1 < len(chunks) and chunks[i] + chunks[i + 1] == k:
                joined.append(k)
                i += 2
            else:
                joined.append(chunks[i])
                i += 1
        chunks = joined
    return chunks


def _sentencepiece_model(pieces: list[str], types: list[int], tok: Any) -> bytes:
    """A SentencePiece `ModelProto`: BPE with byte fallback, no dummy prefix, whitespace kept as is (`tok`: the
    `tokenizer.Tokenizer` whose special ids it records)."""

    def varint(n: int) -> bytes:
        out = bytearray()
        while n > 0x7F:
            out.append(n & 0x7F | 0x80)
            n >>= 7
        return bytes(out) + bytes([n])

    def field(number: int, value: bytes | int) -> bytes:  # an int as a varint, bytes length-prefixed
        if isinstance(value, int):
            return varint(number << 3) + varint(value)
        return varint(number << 3 | 2) + varint(len(value)) + value

    out = bytearray()
    for i, (piece, kind) in enumerate(zip(_spell_spaces(pieces), types, strict=True)):
        score = varint(2 << 3 | 5) + struct.pack("<f", -float(i))  # rank by position, as `_derive_merges`
        out += field(1, field(1, piece.encode("utf-8")) + score + field(3, kind))
    ids = (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id)  # TrainerSpec: BPE, byte fallback, special ids
    out += field(2, field(3, 2) + field(35, 1) + b"".join(field(40 + k, i) for k, i in enumerate(ids)))
    out += field(3, field(1, b"identity") + field(3, 0) + field(4, 0))  # NormalizerSpec
    return bytes(out)


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


def _spell_spaces(pieces: list[str]) -> list[str]:
    """A run of spaces may be stored with real spaces; the model sees spaces as "▁", so spell it that way."""
    return ["▁" * len(p) if " " in p and not p.strip() else p for p in pieces]


def _build(pieces: list[str], types: list[int], unk: str, bos: str | None) -> _Backend:
    """A `tokenizers` BPE with byte fallback over `pieces`, with Gemma's normalizer and decoder."""
    pieces = _spell_spaces(pieces)
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


def _read_gguf_tokenizer(path: Path) -> tuple[_Backend, dict[str, Any], list[str], list[int]]:
    """(backend, special ids..., pieces, piece types) from a GGUF's `tokenizer.ggml.*` metadata."""
    from .gguf_files import open_gguf

    reader = open_gguf(path)

    def field(key: str, default: Any = None) -> Any:
        f = reader.fields.get(f"tokenizer.ggml.{key}")
        return default if f is None else f.contents()

    if "tokenizer.ggml.tokens" not in reader.fields:
        raise NanogemmaError(f"{path} has no tokenizer inside; pass a tokenizer folder with tokenizer.json")
    model = field("model")
    if model == "gpt2" and field("pre") == "gpt-2":
        return _read_gguf_byte_level(path, field)
    if model != "llama":
        raise NanogemmaError(f"{path}: tokenizer type {model!r} is not supported (SentencePiece 'llama', "
                             "or 'gpt2' with GPT-2's pre-tokenizer)")
    pieces, types = _gguf_tokens(reader, field)
    ids = {k: int(field(name, d)) for k, name, d in (("bos_id", "bos_token_id", 2), ("eos_id", "eos_token_id", 1),
                                                       ("unk_id", "unknown_token_id", 3),
                                                       ("pad_id", "padding_token_id", 0))}
    if field("add_space_prefix", False):
        raise NanogemmaError(f"{path}: tokenizers that prepend a space are not supported (Gemma's does not)")
    backend = _build(pieces, types, unk=pieces[ids["unk_id"]], bos=pieces[ids["bos_id"]])
    return backend, {**ids, "add_bos_token": bool(field("add_bos_token", True))}, pieces, types


def _gguf_tokens(reader, field: Callable[..., Any]) -> tuple[list[str], list[int]]:
    tokens = reader.fields["tokenizer.ggml.tokens"]
    pieces = [bytes(tokens.parts[i]).decode("utf-8") for i in tokens.data]
    return pieces, list(field("token_type", [NORMAL] * len(pieces)))


def _read_gguf_byte_level(path: Path, field: Callable[..., Any]) -> tuple[_Backend, dict[str, Any], list[str], list[int]]:
    """A GGUF 'gpt2' tokenizer (byte-level BPE, GPT-2's pre-tokenizer), as `nanogemma export --to gguf`
    writes for models trained on GPT-2 or `bpe:N` data: tokens and merges spelled in GPT-2's byte alphabet."""
    from .gguf_files import open_gguf

    reader = open_gguf(path)
    pieces, types = _gguf_tokens(reader, field)
    merges = reader.fields.get("tokenizer.ggml.merges")
    if merges is None:
        raise NanogemmaError(f"{path}: its 'gpt2' tokenizer has no merges (tokenizer.ggml.merges)")
    pairs = [tuple(bytes(merges.parts[i]).decode("utf-8").split(" ", 1)) for i in merges.data]
    usable = [i for i, t in enumerate(types) if t != UNUSED]  # UNUSED rows only pad to the embedding
    backend = _Backend(BPE({pieces[i]: i for i in usable}, pairs))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    # Added tokens that are in the vocabulary keep their ids; they are matched whole in raw text.
    backend.add_special_tokens([AddedToken(pieces[i], normalized=False, special=True)
                                for i in usable if types[i] in (UNKNOWN, CONTROL)])
    backend.add_tokens([AddedToken(pieces[i], normalized=False, special=False)
                        for i in usable if types[i] == USER_DEFINED])
    if any(backend.token_to_id(pieces[i]) != i for i in usable):
        raise NanogemmaError(f"{path}: its 'gpt2' tokenizer lists a token twice")
    eos = int(field("eos_token_id", 0))
    ids = {"bos_id": int(field("bos_token_id", eos)), "eos_id": eos, "unk_id": int(field("unknown_token_id", eos)),
           "pad_id": int(field("padding_token_id", eos))}
    add_bos = bool(field("add_bos_token", False))
    if add_bos:
        bos = pieces[ids["bos_id"]]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, ids["bos_id"])])
    return backend, {**ids, "add_bos_token": add_bos}, pieces, types


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
