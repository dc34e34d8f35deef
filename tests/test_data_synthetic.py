"""The synthetic story grammar: deterministic by seed, entropy and expected token count checked against
samples, token counts additive over pieces (what makes the per-token floor exact), and `synthetic:N`."""

from __future__ import annotations

import hashlib
import math
import statistics

import pytest

from nanogemma.data import prepare, read_tokens
from nanogemma.data import synthetic as syn
from nanogemma.data.encoders import load_gpt2, train_bpe


@pytest.fixture(scope="module")
def gpt2(gpt2_tiktoken_file):
    return load_gpt2(gpt2_tiktoken_file)


def test_deterministic_by_seed_split_and_index():
    a = list(syn.stories(50, seed=7))
    assert a == list(syn.stories(50, seed=7)) and a != list(syn.stories(50, seed=8))
    assert a[10:20] == list(syn.stories(10, seed=7, start=10))  # any range, anywhere: chunks need this
    assert not set(a) & set(syn.stories(50, seed=7, split="val"))
    s = syn.story(7, "train", 3)
    assert "".join(s.pieces) == s.text and s.text.startswith("Once upon a time, there was a ")
    # Pinned: if this changes, the grammar changed, and GRAMMAR_VERSION must be bumped.
    digest = hashlib.sha256("\n".join(syn.stories(20)).encode()).hexdigest()[:16]
    assert (syn.GRAMMAR_VERSION, digest) == (1, "5357394ad68417f6"), digest


def test_entropy_matches_sampled_log_probabilities():
    h = syn.entropy_per_document()
    nll = [-syn.story(1, "train", i).logprob for i in range(4000)]
    sem = statistics.stdev(nll) / math.sqrt(len(nll))
    assert abs(statistics.mean(nll) - h) < 5 * sem, (statistics.mean(nll), h, sem)
    assert 30 < h < 50


def test_expected_tokens_match_samples(gpt2):
    count = lambda t: len(gpt2.encode(t))
    e = syn.expected_tokens(count, framing=1)
    sizes = [count(syn.story(2, "train", i).text) + 1 for i in range(3000)]
    sem = statistics.stdev(sizes) / math.sqrt(len(sizes))
    assert abs(statistics.mean(sizes) - e) < 5 * sem, (statistics.mean(sizes), e)


def test_token_counts_are_additive_for_gpt2_and_bpe(gpt2):
    assert syn.token_counts_are_additive(lambda t: len(gpt2.encode(t)), samples=300)
    bpe = train_bpe(syn.stories(300, seed=5), 400)
    assert syn.token_counts_are_additive(lambda t: len(bpe.encode(t)), samples=300)
    # A tokenizer that merges across words would not be: the check notices.
    assert not syn.token_counts_are_additive(lambda t: len(t.replace(" a ", " ").split()), samples=50)


def test_grammar_rules_are_enforced():
    with pytest.raises(ValueError, match="same number of words"):
        syn.Slot.make("a big tree|house")
    with pytest.raises(ValueError, match="same number of words"):
        syn.Slot.make("dog|cat.")
    with pytest.raises(ValueError, match="must follow a space"):
        syn._pieces("One day,{name} left.")


def test_prepare_synthetic_records_the_floor(gpt2_tiktoken_file, tmp_path, monkeypatch):
    def offline(name):
        raise ConnectionError("offline")

    monkeypatch.setattr("tiktoken.get_encoding", offline)
    r = prepare("synthetic:600", tmp_path / "out", tokenizer_file=gpt2_tiktoken_file, workers=2, val_fraction=0.05)
    s = r.meta["synthetic"]
    assert s["exact"] and s["entropy_nats_per_token"] == pytest.approx(
        s["entropy_nats_per_document"] / s["expected_tokens_per_document"])
    assert r.meta["splits"]["val"]["documents"] == 30 and r.meta["splits"]["train"]["documents"] == 570
    tok = load_gpt2(gpt2_tiktoken_file)
    assert tok.decode_documents(read_tokens(tmp_path / "out", "val")) == list(syn.stories(30, split="val"))
    tokens = r.meta["splits"]["train"]["tokens"] / 570
    assert abs(tokens - s["expected_tokens_per_document"]) < 3
