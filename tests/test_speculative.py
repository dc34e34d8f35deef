"""Self-speculative decoding returns the full model's tokens: greedy token for token, sampling in distribution.

Tiny models (window 8) cover every draft length and draft vocabulary, with rejections rolling the cache
back across many ring wraps; the real 270M model is checked against plain greedy decoding.
"""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model
from reference import assert_same_greedy

from nanogemma.decoding import SamplingParams, stop_ids_for
from nanogemma.errors import NanogemmaError
from nanogemma.generation import Decoder
from nanogemma.model import Gemma
from nanogemma.speculative import Speculation, accept_or_resample, common_token_ids

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> Gemma:
    return tiny_model()


def prompt(n: int) -> list[int]:
    return torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist()


def decode(model, ids, n, spec=None, params=None, compile=False):
    d = Decoder(model, [ids], n, params, speculation=spec, compile=compile)
    return [row[0] for row in d], d.stats


@pytest.mark.parametrize("k", [1, 2, 5, 8])
@pytest.mark.parametrize("draft_vocab", [16, 128, 512])  # mostly rejected ... never rejected
@pytest.mark.parametrize("n", [3, 21])  # prompts below and above the window of 8
def test_greedy_tokens_equal_plain_decoding(model, k, draft_vocab, n):
    ids = prompt(n)
    plain, _ = decode(model, ids, 120)
    spec, stats = decode(model, ids, 120, Speculation(list(range(draft_vocab)), k))
    assert len(set(plain)) > 10
    if draft_vocab == 512:  # S is the whole vocabulary: every logit is plain decoding's own, bit for bit
        assert spec == plain
        assert stats.accepted == stats.drafted  # nothing to reject
    else:  # tokens outside S are scored by the k-row product, which may round differently from one row
        assert_same_greedy(model, ids, spec, plain, what=f"k={k}, S={draft_vocab}")
        assert stats.accepted < stats.drafted  # rejections happened, so rollbacks were exercised


def test_repetition_penalty_and_stop_ids(model):
    ids = prompt(9)
    params = SamplingParams(repetition_penalty=1.3)
    plain, _ = decode(model, ids, 100, params=params)
    spec, _ = decode(model, ids, 100, Speculation(list(range(64)), 4), params=params)
    assert spec == plain
    stop = plain[40]
    first = plain.index(stop)
    d = Decoder(model, [ids], 100, params, speculation=Speculation(list(range(64)), 4), stop_ids={stop})
    assert [row[0] for row in d] == plain[:first]


def test_compiled_step_with_speculation(model):
    """The compiled decode step returns hidden states; rollbacks work on the static cache too."""
    torch._dynamo.reset()
    ids = prompt(13)
    plain, _ = decode(model, ids, 40)
    spec, _ = decode(model, ids, 40, Speculation(list(range(100)), 4), compile="eager")
    assert_same_greedy(model, ids, spec, plain, what="compiled")  # static shapes: other sums than eager's


def test_int8_check_uses_the_drafts_logits_for_s(model):
    """fbgemm's int8 rounds activations once per call, so a k-row check rounds differently from one-row
    decoding; the check takes S's columns from the drafts' one-row products instead. With S the whole
    vocabulary every column does, so speculative int8 is plain int8, token for token, and no draft fails.

    This holds by construction on every CPU: the drafts run the blocks exactly as plain decoding does, on a
    cache of the same layout (the ring keeps W slots; rejected drafts are undone from a log), and score with
    the same kernel on the same rows. It once failed on AVX-512 when speculation gave the rings k extra
    slots: after the first wrap the same keys sat in other slots, so attention summed them in another order,
    and int8's rounding of the activations turned that last-bit difference into another token."""
    import copy

    from nanogemma.quantize import quantize_model

    q = quantize_model(copy.deepcopy(model), "int8")
    ids = prompt(13)
    plain, _ = decode(q, ids, 100)
    spec, stats = decode(q, ids, 100, Speculation(list(range(512)), 6))
    assert spec == plain
    assert stats.accepted == stats.drafted


def test_batches_ignore_speculation(model):
    a, b = prompt(5), prompt(12)
    d = Decoder(model, [a, b], 20, speculation=Speculation(list(range(100)), 4))
    assert d.speculation is None
    assert len(list(d)) == 20


def test_accept_or_resample_gives_p():
    """Draft from q, apply the rule: the result is distributed as p (total variation < 0.01 over 40,000 draws)."""
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05, 0.0])
    q = torch.tensor([0.1, 0.4, 0.1, 0.0, 0.2, 0.2])
    g = torch.Generator().manual_seed(0)
    drafts = torch.multinomial(q, 40_000, replacement=True, generator=g).tolist()
    counts = torch.zeros(6)
    for d in drafts:
        counts[accept_or_resample(p, q, d, g)] += 1
    tv = 0.5 * (counts / counts.sum() - p).abs().sum()
    assert tv < 0.01
    assert counts[5] == 0  # a token p rules out never appears, even when drafted


def test_sampling_matches_plain_sampling_in_distribution(model):
    """First two sampled tokens: speculative and plain sampling agree in distribution (400 seeds each)."""
    ids = prompt(6)
    params = lambda seed: SamplingParams(temperature=1.0, top_k=6, seed=seed)  # noqa: E731
    spec = Speculation(list(range(3, 300)), 3)
    plain_counts, spec_counts = {}, {}
    for seed in range(400):
        a, _ = decode(model, ids, 2, params=params(seed))
        b, _ = decode(model, ids, 2, spec, params(seed))
        plain_counts[a[1]] = plain_counts.get(a[1], 0) + 1
        spec_counts[b[1]] = spec_counts.get(b[1], 0) + 1
    tokens = set(plain_counts) | set(spec_counts)
    tv = 0.5 * sum(abs(plain_counts.get(t, 0) - spec_counts.get(t, 0)) for t in tokens) / 400
    assert tv < 0.15, (plain_counts, spec_counts)
    same_seed = [decode(model, ids, 30, spec, params(7))[0] for _ in range(2)]
    assert same_seed[0] == same_seed[1]  # seeds reproduce


def test_common_token_ids(model_and_tok):
    _, tok = model_and_tok
    ids = common_token_ids(tok, 1000)
    pieces = {tok.id_to_token(i) for i in ids}
    assert {",", ".", "a", "▁the"} <= pieces  # frequent pieces and the single characters at the vocabulary's end
    assert tok.eos_id in ids and tok.end_of_turn_id in ids
    assert not any(p.startswith("<unused") for p in pieces)
    with pytest.raises(NanogemmaError, match="--draft-tokens"):
        Speculation.for_tokenizer(tok, draft_tokens=0)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["float32", "int8-wo"])
def test_real_model_greedy_equals_plain(model_and_tok, mode):
    """The 270M model: 64 greedy tokens with speculation equal plain greedy decoding, and most drafts land."""
    from nanogemma.quantize import quantize_model

    model, tok = model_and_tok
    if mode != "float32":
        import copy

        model = quantize_model(copy.deepcopy(model), mode)
    text = "Once upon a time, in a small village by the sea, there lived"
    ids = tok.encode(text)
    plain = [row[0] for row in Decoder(model, [ids], 64, stop_ids=stop_ids_for(tok))]
    spec = Speculation.for_tokenizer(tok)
    d = Decoder(model, [ids], 64, speculation=spec, stop_ids=stop_ids_for(tok))
    fast = [row[0] for row in d]
    reference = None
    if mode != "float32":  # the quantized model's error is measured against float32 (float64 would not add)
        float_model = model_and_tok[0]

        def reference(prefix):
            with torch.no_grad():
                ids_ = torch.tensor([prefix])
                return model(ids_, last_only=True)[0, -1].double(), float_model(ids_, last_only=True)[0, -1].double()
    assert_same_greedy(model, ids, fast, plain, reference, what=mode)
    rate = d.stats.accepted / d.stats.drafted
    print(f"\n[speculative] {mode}: {d.stats.accepted}/{d.stats.drafted} drafts accepted ({rate:.0%})")
    assert rate > 0.6


@pytest.mark.parametrize("stop_at", [1, 6, 7, 8])  # the round's first, middle and last tokens (k = 4)
def test_stopping_mid_round_leaves_the_cache_as_plain_decoding_would(model, stop_at):
    """A caller that stops reading at token j finds the cache holding the prompt and tokens 0..j-1 only."""
    from nanogemma.generation import Session
    from nanogemma.speculative import DraftHead, SpeculativeDecoder

    ids = prompt(11)
    session = Session(model, 1, 200, spare=4)
    decoder = SpeculativeDecoder(session, DraftHead(model, range(512)), SamplingParams(), 4)
    run = decoder.run(ids, session.prefill([ids]), 100)
    got = [next(run) for _ in range(stop_at + 1)]
    run.close()
    assert session.length == len(ids) + stop_at
    ref = Session(model, 1, 200)
    ref.prefill([ids + got[:-1]])
    last = torch.tensor([got[-1]])
    torch.testing.assert_close(session.step(last), ref.step(last), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------- prompt lookup
def looping_prompt(n: int, period: int = 5) -> list[int]:
    """A prompt that repeats itself, so the text offers drafts from the first decoding step on."""
    return (prompt(period) * (n // period + 1))[:n]


def test_text_index_proposes_what_followed_the_latest_occurrence():
    from nanogemma.speculative import TextIndex

    text = TextIndex([1, 2, 3, 4, 9, 2, 3, 5, 6, 2, 3])
    assert text.propose(3) == [5, 6, 2]  # the latest earlier "2 3" (the 3-gram "6 2 3" never occurred)
    assert text.propose(0) == []
    text.extend([7])
    assert text.propose(2) == []  # "3 7" and "2 3 7" never occurred
    text.extend([1, 2, 3])
    assert text.propose(4) == [4, 9, 2, 3]  # "1 2 3" did: the 3-gram wins over the later "2 3"
    assert TextIndex([5]).propose(2) == []


@pytest.mark.parametrize("k", [1, 3, 6])
@pytest.mark.parametrize("n", [4, 23])  # prompts below and above the window of 8
def test_lookup_greedy_tokens_equal_plain_decoding(model, k, n):
    """Drafts checked k + 1 rows at a time, rejected ones rolled back across ring wraps: plain greedy's
    tokens, up to a float32 tie (the k + 1-row products round in another order than one-row steps)."""
    ids = looping_prompt(n) if n > 4 else prompt(n)
    plain, _ = decode(model, ids, 120)
    fast, stats = decode(model, ids, 120, Speculation([], k, lookup=True))
    assert_same_greedy(model, ids, fast, plain, what=f"lookup k={k}")
    assert stats.passes > 0 and 0 < stats.accepted < stats.drafted  # drafts were kept and rejected


def test_lookup_with_penalty_stops_and_compiled_steps(model):
    ids = looping_prompt(17)
    params = SamplingParams(repetition_penalty=1.3)
    plain, _ = decode(model, ids, 60, params=params)
    fast, _ = decode(model, ids, 60, Speculation([], 4, lookup=True), params=params)
    assert_same_greedy(model, ids, fast, plain, what="penalty")
    stop = plain[30]
    d = Decoder(model, [ids], 60, params, speculation=Speculation([], 4, lookup=True), stop_ids={stop})
    assert [row[0] for row in d] == plain[:plain.index(stop)]
    torch._dynamo.reset()
    compiled, _ = decode(model, ids, 40, Speculation([], 4, lookup=True), params, compile="eager")
    assert_same_greedy(model, ids, compiled, plain[:40], what="compiled")


def test_lookup_sampling_matches_plain_sampling_in_distribution(model):
    """Tokens 1 and 2 of a looping prompt, where the text drafts from the first step: a draft kept with
    probability p, else a draw from p without it, is a draw from p (400 seeds)."""
    ids = looping_prompt(12, period=4)
    params = lambda seed: SamplingParams(temperature=1.0, top_k=4, seed=seed)  # noqa: E731
    spec = Speculation([], 3, lookup=True)
    runs = [(decode(model, ids, 3, params=params(seed))[0], decode(model, ids, 3, spec, params(seed))[0])
            for seed in range(400)]
    for position in (1, 2):
        plain_counts, fast_counts = {}, {}
        for a, b in runs:
            plain_counts[a[position]] = plain_counts.get(a[position], 0) + 1
            fast_counts[b[position]] = fast_counts.get(b[position], 0) + 1
        tokens = set(plain_counts) | set(fast_counts)
        tv = 0.5 * sum(abs(plain_counts.get(t, 0) - fast_counts.get(t, 0)) for t in tokens) / 400
        assert tv < 0.15, (position, plain_counts, fast_counts)


def count_head_passes(monkeypatch) -> list[int]:
    """Record the k of every pass of the head's drafts (`SpeculativeDecoder._head_pass`)."""
    from nanogemma.speculative import SpeculativeDecoder

    calls, head_pass = [], SpeculativeDecoder._head_pass
    monkeypatch.setattr(SpeculativeDecoder, "_head_pass",
                        lambda self, last, k: calls.append(k) or head_pass(self, last, k))
    return calls


@pytest.mark.parametrize("n", [4, 23])
def test_lookup_with_head_drafts_greedy_tokens_equal_plain_decoding(model, n, monkeypatch):
    """Lookup with the head over S where the text offers nothing: the text's passes and the head's both run,
    and greedy gives plain decoding's tokens (up to a float32 tie)."""
    ids = prompt(n)
    plain, _ = decode(model, ids, 120)
    calls = count_head_passes(monkeypatch)
    fast, stats = decode(model, ids, 120, Speculation(list(range(0, 512, 2)), 3, lookup=True))
    assert_same_greedy(model, ids, fast, plain, what=f"lookup+head n={n}")
    assert calls and stats.passes > 0  # both kinds of pass ran
    assert 0 < stats.accepted < stats.drafted


@pytest.mark.parametrize("head", [False, True])
@pytest.mark.parametrize("stop_at", [9, 12, 15, 20])  # after the first passes: some stop mid-pass
def test_lookup_stopping_mid_pass_leaves_the_cache_as_plain_decoding_would(model, stop_at, head, monkeypatch):
    from nanogemma.generation import Session
    from nanogemma.speculative import DraftHead, LookupDecoder

    ids = prompt(15) if head else looping_prompt(15)  # a prompt that does not repeat: the head drafts first
    calls = count_head_passes(monkeypatch)
    session = Session(model, 1, 200, spare=5)
    decoder = LookupDecoder(session, SamplingParams(), 4, draft=DraftHead(model, range(0, 512, 3)) if head else None)
    run = decoder.run(ids, session.prefill([ids]), 100)
    got = [next(run) for _ in range(stop_at + 1)]
    run.close()
    assert bool(calls) == head and (head or decoder.passes > 0)
    assert session.length == len(ids) + stop_at
    ref = Session(model, 1, 200)
    ref.prefill([ids + got[:-1]])
    last = torch.tensor([got[-1]])
    torch.testing.assert_close(session.step(last), ref.step(last), rtol=0, atol=1e-5)
    with pytest.raises(NanogemmaError, match="spare >= draft tokens \\+ 1"):
        LookupDecoder(Session(model, 1, 50, spare=4), SamplingParams(), 4)


@pytest.mark.slow
def test_real_model_lookup_equals_plain(model_and_tok):
    """The 270M model, float32: 96 greedy tokens with prompt lookup equal plain decoding's (up to a tie),
    on a prompt the model continues by repeating itself, and most drafts land."""
    model, tok = model_and_tok
    ids = tok.encode("Monday: rain. Tuesday: rain. Wednesday: rain. Thursday: rain. Friday:")
    plain = [row[0] for row in Decoder(model, [ids], 96, stop_ids=set())]
    d = Decoder(model, [ids], 96, speculation=Speculation.for_tokenizer(tok, lookup=True), stop_ids=set())
    fast = [row[0] for row in d]
    assert_same_greedy(model, ids, fast, plain, what="lookup")
    print(f"\n[lookup] {d.stats.accepted}/{d.stats.drafted} drafts accepted in {d.stats.passes} passes")
    assert d.stats.accepted > 0.5 * d.stats.drafted
