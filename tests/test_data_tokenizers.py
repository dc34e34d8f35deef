"""The data tokenizers: gpt2 (tiktoken, with the offline ranks-file fallback), gemma and bpe:N."""

from __future__ import annotations

import numpy as np
import pytest

from nanogemma.data import encoders
from nanogemma.data.encoders import load_gpt2, parse_spec, train_bpe
from nanogemma.data.synthetic import stories
from nanogemma.errors import NanogemmaError

TEXTS = ["Hello world", "Ünïcödé — ✓ 😀\n\ttabs", "a literal <|endoftext|> and <eos> stay text", "  x  "]


@pytest.fixture
def offline(monkeypatch):
    """tiktoken cannot download (as on a machine without network), and no ranks file is configured."""
    def fail(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setattr("tiktoken.get_encoding", fail)
    monkeypatch.delenv(encoders.GPT2_RANKS_ENV, raising=False)


@pytest.fixture(scope="module")
def gemma(gguf_path):
    return encoders.load_gemma()


def test_gpt2_from_ranks_file_and_env(offline, monkeypatch, gpt2_tiktoken_file):
    tok = load_gpt2(gpt2_tiktoken_file)
    assert tok.encode("Hello world") == [15496, 995]
    assert (tok.vocab_size, tok.eot_id, tok.dtype) == (50257, 50256, np.uint16)
    monkeypatch.setenv(encoders.GPT2_RANKS_ENV, str(gpt2_tiktoken_file))
    assert load_gpt2().encode("Hello world") == [15496, 995]


def test_gpt2_error_says_what_to_do(offline):
    with pytest.raises(NanogemmaError) as e:
        load_gpt2()
    msg = str(e.value)
    assert "\n" not in msg and "tiktoken could not download its vocabulary" in msg
    assert "--tokenizer-file" in msg and encoders.GPT2_RANKS_ENV in msg


def test_gpt2_rejects_a_wrong_ranks_file(offline, tmp_path):
    bad = tmp_path / "r.tiktoken"
    bad.write_text("SGVsbG8= 0\n")
    with pytest.raises(NanogemmaError, match="is not the GPT-2 vocabulary"):
        load_gpt2(bad)
    bad.write_text("QQ== not-a-rank\n")
    with pytest.raises(NanogemmaError, match="is not a tiktoken ranks file"):
        load_gpt2(bad)
    with pytest.raises(NanogemmaError, match="ranks file not found"):
        load_gpt2(tmp_path / "missing")


def test_gpt2_saved_copy_is_the_official_file(offline, tmp_path, gpt2_tiktoken_file):
    tok = load_gpt2(gpt2_tiktoken_file)
    assert tok.save(tmp_path) == ["gpt2.tiktoken"]
    assert (tmp_path / "gpt2.tiktoken").read_bytes() == gpt2_tiktoken_file.read_bytes()
    # As when the vocabulary came from tiktoken's download: written out from the encoding itself.
    (tmp_path / "x").mkdir()
    encoders.Gpt2Tokenizer(tok.enc).save(tmp_path / "x")
    assert (tmp_path / "x" / "gpt2.tiktoken").read_bytes() == gpt2_tiktoken_file.read_bytes()


def test_batched_encoding_equals_one_by_one(offline, gpt2_tiktoken_file):
    tok = load_gpt2(gpt2_tiktoken_file)
    texts = list(stories(50)) + ["trailing spaces  ", "  ", "\n\nnewlines\n", "x" * 500, "end 123 456"]
    one_by_one = np.array([i for t in texts for i in [*tok.enc.encode_ordinary(t), 50256]], dtype=np.uint16)
    assert np.array_equal(tok.encode_documents(texts), one_by_one)
    assert np.array_equal(tok.encode_documents(TEXTS), tok.encode_documents(TEXTS[:2]).tolist() +
                          tok.encode_documents(TEXTS[2:]).tolist())  # one spells <|endoftext|>: per document


def test_documents_round_trip_and_special_names_stay_text(offline, gpt2_tiktoken_file):
    tok = load_gpt2(gpt2_tiktoken_file)
    flat = tok.encode_documents(TEXTS)
    assert (flat == tok.eot_id).sum() == len(TEXTS)
    assert tok.decode_documents(flat) == TEXTS


@pytest.mark.parametrize("spec", ["gpt3", "bpe", "bpe:100", "bpe:x", "BPE:512", ""])
def test_unknown_tokenizer(spec):
    with pytest.raises(NanogemmaError, match="unknown tokenizer|between 257"):
        parse_spec(spec)


def test_bpe_is_deterministic_and_round_trips(tmp_path):
    corpus = list(stories(400, seed=1))
    a, b = train_bpe(iter(corpus), 300), train_bpe(iter(corpus), 300)
    assert a.vocab_size == 300 and a.eot_id == 0 and a.dtype == np.uint16
    assert a.encode_batch(corpus[:50]) == b.encode_batch(corpus[:50])
    assert a.decode_documents(a.encode_documents(TEXTS)) == TEXTS  # byte level: any text, even unseen
    assert a.save(tmp_path) == ["tokenizer.json"]
    again = encoders.load_saved("bpe:300", tmp_path)
    assert again.encode(TEXTS[2]) == a.encode(TEXTS[2]) and 0 not in again.encode(TEXTS[2])


def test_gemma_framing_and_round_trip(gemma):
    assert (gemma.vocab_size, gemma.bos_id, gemma.eot_id, gemma.dtype) == (262144, 2, 1, np.uint32)
    flat = gemma.encode_documents(TEXTS)
    assert flat[0] == 2 and flat[-1] == 1 and (flat == 1).sum() == len(TEXTS) and (flat == 2).sum() == len(TEXTS)
    assert gemma.decode_documents(flat) == TEXTS
    # The same ids as the project's tokenizer on ordinary text (no special-token names in it).
    assert gemma.encode("Hello world\n\nagain") == gemma.tok.encode("Hello world\n\nagain", add_bos=False)


def test_load_data_tokenizer_needs_a_folder_for_bpe(tmp_path):
    with pytest.raises(NanogemmaError, match="load it from the prepared folder"):
        encoders.load_data_tokenizer("bpe:512")
    with pytest.raises(NanogemmaError, match="is not a prepared data folder"):
        encoders.load_data_tokenizer(folder=tmp_path)
