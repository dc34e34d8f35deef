"""The tokenizer against the reference (transformers reading the same GGUF), on a varied corpus."""

from __future__ import annotations

import json
import random
import re
import types as types_module

import pytest
from texts import CORPUS  # tests/ is on sys.path (pytest's rootdir import mode)

from nanogemma import tokenizer as tokenizer_module
from nanogemma.errors import NanogemmaError
from nanogemma.tokenizer import SentencePieceEngine, Tokenizer, load_tokenizer

# ----------------------------------------------------------------------------------------------- corpus

NO_ROUND_TRIP = "\u2581"  # a literal "▁" is Gemma's spelling of a space: it decodes to " "


def test_corpus_is_large():
    assert len(CORPUS) >= 300


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tok(gguf_path) -> Tokenizer:
    return Tokenizer.from_gguf(gguf_path)


@pytest.fixture(scope="module")
def ref_ids(ref_tokenizer) -> list[list[int]]:
    return [ref_tokenizer(s).input_ids for s in CORPUS]


def _report(name: str, ok: list[bool]) -> str:
    bad = [repr(s)[:60] for s, good in zip(CORPUS, ok, strict=True) if not good]
    return f"{name}: {sum(ok)}/{len(ok)} match; first mismatches: {bad[:5]}"


# ----------------------------------------------------------------------------------------------- parity


def test_special_ids(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (2, 1, 0, 3)
    assert (tok.start_of_turn_id, tok.end_of_turn_id) == (105, 106)
    assert tok.vocab_size == 262144
    assert tok.id_to_token(106) == "<end_of_turn>" and tok.token_to_id("<start_of_turn>") == 105
    assert tok.token_to_id("▁") is not None and tok.token_to_id("not a piece at all") is None
    assert tok.id_to_token(10**7) is None


def test_encode_parity(tok, ref_tokenizer, ref_ids):
    assert all(ids[0] == ref_tokenizer.bos_token_id == 2 for ids in ref_ids)  # the reference adds <bos>
    ok = [tok.encode(s) == ids for s, ids in zip(CORPUS, ref_ids, strict=True)]
    assert all(ok), _report("encode(add_bos=True)", ok)
    ok = [tok.encode(s, add_bos=False) == ref_tokenizer(s, add_special_tokens=False).input_ids for s in CORPUS]
    assert all(ok), _report("encode(add_bos=False)", ok)


def test_encode_batch(tok, ref_ids):
    assert tok.encode_batch(CORPUS) == ref_ids
    assert tok.encode_batch(CORPUS, add_bos=False) == [ids[1:] for ids in ref_ids]


def test_decode_parity(tok, ref_tokenizer, ref_ids):
    ok = [tok.decode(ids) == ref_tokenizer.decode(ids) for ids in ref_ids]
    assert all(ok), _report("decode", ok)
    ok = [tok.decode(ids, skip_special=True) == ref_tokenizer.decode(ids, skip_special_tokens=True) for ids in ref_ids]
    assert all(ok), _report("decode(skip_special=True)", ok)


def test_decode_arbitrary_ids(tok, ref_tokenizer):
    """Any id sequence, including stray UTF-8 bytes that do not form a character, decodes like the reference."""
    rng = random.Random(0)
    pools = [range(262144), range(238, 494), range(0, 300)]  # anything; byte pieces; specials and whitespace
    seqs = [[rng.choice(pools[k % 3]) for _ in range(rng.randint(1, 12))] for k in range(300)]
    bad = [ids for ids in seqs if tok.decode(ids) != ref_tokenizer.decode(ids)]
    assert not bad, f"decode of random ids: {len(seqs) - len(bad)}/{len(seqs)} match; first: {bad[:3]}"


def test_decode_accepts_tensors(tok):
    torch = pytest.importorskip("torch")
    ids = tok.encode("Hello world")
    assert tok.decode(torch.tensor(ids)) == tok.decode(ids) == "<bos>Hello world"
    assert tok.decode(torch.tensor(ids), skip_special=True) == "Hello world"
    assert tok.decode(torch.tensor(ids[1])) == "Hello"


def test_round_trip(tok):
    texts = [s for s in CORPUS if NO_ROUND_TRIP not in s]
    ok = [tok.decode(tok.encode(s, add_bos=False)) == s for s in texts]
    assert all(ok), f"round trip: {sum(ok)}/{len(ok)} match"
    assert tok.decode(tok.encode("a\u2581b", add_bos=False)) == "a b"


def test_byte_fallback_never_unk(tok):
    ids = tok.encode("\U000f0000\x00\U00030000", add_bos=False)  # characters without a piece of their own
    assert [tok.id_to_token(i) for i in ids] == [f"<0x{b:02X}>" for b in "\U000f0000\x00\U00030000".encode()]


# ----------------------------------------------------------------------------------------------- engines


def test_cached_load_uses_sentencepiece(gguf_path):
    """A start reads the cached SentencePiece model; the `tokenizers` object is loaded only when asked for."""
    first = Tokenizer.from_gguf(gguf_path)  # builds the cache on a new machine
    assert isinstance(first.fast, SentencePieceEngine)
    again = Tokenizer.from_gguf(gguf_path)
    assert isinstance(again.fast, SentencePieceEngine) and callable(again._backend)
    assert again.encode("Hi <start_of_turn>") == [2, 10979, 236743, 105]
    assert again.backend.get_vocab_size(with_added_tokens=True) == again.vocab_size == 262144
    assert not callable(again._backend)


def test_damaged_sentencepiece_cache_falls_back_to_tokenizer_json(tok, tmp_path):
    tok.save(tmp_path)
    (tmp_path / SentencePieceEngine.FILE).write_bytes(b"\x0a\xff damaged")
    again = Tokenizer.from_hf(tmp_path)
    assert again.fast is None and again.encode("Hi <start_of_turn>") == [2, 10979, 236743, 105]


def test_engines_agree_on_random_text(tok):
    """The SentencePiece engine against the `tokenizers` object: text made of the pieces where they could
    part (specials, spaces, bytes, user-defined tags), and random ids decoded."""
    rng = random.Random(1)
    alphabet = [*" \n\t<>_/abé日😀\u0301▁", "<start_of_turn>", "<eos>", "<unused5>", "<unk>", "<mask>", "<b>",
                "<table>", "[multimodal]", "<0x41>", "  ", " " * 33, "\n\n", "<start_of_turn", "<<eos>>"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(3000)]
    bad = [t for t in texts if tok.fast.encode(t) != tok.backend.encode(t, add_special_tokens=False).ids]
    assert not bad, f"encode: {len(texts) - len(bad)}/{len(texts)} agree; first: {bad[:3]}"
    pools = [range(262144), range(0, 600), range(236000, 262144)]
    seqs = [[rng.choice(pools[k % 3]) for _ in range(rng.randint(1, 30))] for k in range(1500)]
    for skip in (False, True):
        bad = [s for s in seqs if tok.fast.decode(s, skip) != tok.backend.decode(s, skip_special_tokens=skip)]
        assert not bad, f"decode(skip_special={skip}): first disagreements {bad[:3]}"
    assert tok.pieces() == [p for p, _ in sorted(tok.backend.get_vocab().items(), key=lambda kv: kv[1])]


def test_long_space_runs(tok, ref_tokenizer):
    """Runs of over 31 spaces, where SentencePiece alone would cut 31 + rest: cut as the reference cuts them."""
    texts = [f"x{' ' * n}y" for n in range(1, 140)] + [" " * n for n in range(30, 300, 7)] + ["a" + " " * 64]
    ok = [tok.encode(t) == ref_tokenizer(t).input_ids for t in texts]
    assert all(ok), f"{sum(ok)}/{len(ok)} match"


def test_engine_is_only_written_when_it_agrees(tok, tmp_path):
    """`SentencePieceEngine.write` checks the model it writes against the `tokenizers` ids, and keeps
    nothing when they differ, or when the specials cannot be found in text by their "<...>" shape."""
    pieces, types = tok.pieces(), _piece_types(tok)
    wrong = types_module.SimpleNamespace(unk_id=3, bos_id=2, eos_id=1, pad_id=0, encode=lambda text, add_bos: [])
    path = tmp_path / SentencePieceEngine.FILE
    assert SentencePieceEngine.write(path, pieces, types, wrong) is None and not path.exists()
    odd = [*pieces[:4], "[mask]", *pieces[5:]]  # a control token not spelled <...>
    assert SentencePieceEngine.write(path, odd, types, tok) is None and not path.exists()


# ----------------------------------------------------------------------------------------------- folders


def test_hf_folder_round_trip(tok, ref_ids, tmp_path):
    tok.save(tmp_path)
    merges = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))["model"]["merges"]
    assert merges[0] == "\n \n" and all(isinstance(m, str) for m in merges)  # the spelling that parses faster
    again = Tokenizer.from_hf(tmp_path)
    assert again.encode_batch(CORPUS) == ref_ids
    assert (again.bos_id, again.eos_id, again.pad_id, again.unk_id, again.end_of_turn_id) == (2, 1, 0, 3, 106)
    assert load_tokenizer(tmp_path).encode("Hi there") == tok.encode("Hi there")

    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    ok = [hf(s).input_ids == ids for s, ids in zip(CORPUS, ref_ids, strict=True)]
    assert all(ok), _report("transformers on the saved folder", ok)
    assert hf.decode(ref_ids[10]) == tok.decode(ref_ids[10])


def _piece_types(tok: Tokenizer) -> list[int]:
    """SentencePiece piece types of the vocabulary, as a Gemma `tokenizer.model` holds them."""
    added = tok.backend.get_added_tokens_decoder()
    kinds = []
    for i, piece in enumerate(tok.pieces()):
        if i in added:
            kind = 3 if added[i].special else 4  # CONTROL, USER_DEFINED
        elif re.fullmatch(r"<0x[0-9A-F]{2}>", piece):
            kind = 6  # BYTE
        else:
            kind = 4 if len(piece) > 1 and set(piece) == {"▁"} else 1  # whitespace runs are user-defined
        kinds.append(2 if piece == "<unk>" else kind)
    return kinds


def _sentencepiece_model(tok: Tokenizer) -> bytes:
    """A SentencePiece ModelProto with the tokenizer's vocabulary (BPE, byte fallback, no dummy prefix)."""
    return tokenizer_module._sentencepiece_model(tok.pieces(), _piece_types(tok), tok)


def test_sentencepiece_model_folder(tok, ref_ids, tmp_path):
    """A folder with only `tokenizer.model` gives the same ids, and so does SentencePiece itself."""
    (tmp_path / "tokenizer.model").write_bytes(_sentencepiece_model(tok))
    from_model = Tokenizer.from_hf(tmp_path)
    assert from_model.encode_batch(CORPUS) == ref_ids
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    # Two known differences, where we follow the reference: SentencePiece never reads control tokens in
    # text, and it cuts a run of more than 31 spaces greedily (31 + rest) where BPE merges cut it elsewhere.
    texts = [s for s in CORPUS if not re.search(r"<[a-z_]+\d*>| {32}", s)]
    ok = [sp.encode(s) == ids for s, ids in zip(texts, tok.encode_batch(texts, add_bos=False), strict=True)]
    assert all(ok), f"SentencePiece: {sum(ok)}/{len(ok)} match"


# ----------------------------------------------------------------------------------------------- errors


def test_missing_paths(tmp_path):
    with pytest.raises(NanogemmaError, match="not found"):
        load_tokenizer(tmp_path / "nope.gguf")
    with pytest.raises(NanogemmaError, match="not found"):
        Tokenizer.from_gguf(tmp_path / "nope.gguf")
    with pytest.raises(NanogemmaError, match="not found"):
        Tokenizer.from_hf(tmp_path / "nope")


def test_folder_without_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3_text"}))
    for load in (Tokenizer.from_hf, load_tokenizer):
        with pytest.raises(NanogemmaError, match="neither tokenizer.json nor tokenizer.model"):
            load(tmp_path)


def test_gguf_without_tokenizer(tmp_path):
    gguf = pytest.importorskip("gguf")
    np = pytest.importorskip("numpy")
    path = tmp_path / "weights-only.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(NanogemmaError, match="no tokenizer"):
        Tokenizer.from_gguf(path)
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf file at all" * 4)
    with pytest.raises(NanogemmaError, match="not a readable GGUF"):
        load_tokenizer(tmp_path / "broken.gguf")


def test_bad_sentencepiece_model(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\xff\xff\xff")
    with pytest.raises(NanogemmaError, match="SentencePiece"):
        Tokenizer.from_hf(tmp_path)
