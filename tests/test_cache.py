"""The KV cache is exact: cached generation equals full recomputation, token for token.

Random `tiny` models (window 8, so a few dozen tokens wrap the sliding rings many times) cover prompts
shorter than, equal to and longer than the window, chunked prefill with every chunk size, batches of
different lengths and the compiled decode step. The last test runs the real 270M model past two windows.
"""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model
from reference import assert_same_greedy
from texts import PROMPTS

from nanogemma.cache import KVCache, cache_size
from nanogemma.config import GLOBAL, get_preset
from nanogemma.errors import NanogemmaError
from nanogemma.generation import Decoder, Session, generate_ids
from nanogemma.model import Gemma

pytestmark = pytest.mark.usefixtures("one_thread")

W = 8  # the tiny preset's sliding window


@pytest.fixture(scope="module")
def model() -> Gemma:
    return tiny_model()


def prompt(n: int, seed: int = 1) -> list[int]:
    return torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(seed + n)).tolist()


@pytest.mark.parametrize("n", [3, W, 2 * W + 5])  # below, equal to and above the window
def test_cached_generation_equals_full_recomputation(model, n):
    ids = prompt(n)
    cached = list(generate_ids(model, ids, 60))  # 60 tokens: the rings wrap 7+ times
    full = list(generate_ids(model, ids, 60, use_cache=False))
    assert_same_greedy(model, ids, cached, full)  # other sums: equal, or parted at a float32 tie
    assert len(set(cached)) > 10  # the test is only meaningful if the text varies


def test_cached_logits_match_one_full_forward_across_many_wraps(model):
    """Teacher forcing: every cached step's logits equal the uncached forward over the final sequence."""
    ids = prompt(5)
    session = Session(model, 1, 300)
    logits = [session.prefill([ids])]
    seq = list(ids)
    for _ in range(250):  # 31 wraps of the window
        token = logits[-1].argmax(-1)
        seq.append(int(token))
        logits.append(session.step(token))
    with torch.inference_mode():
        full = model(torch.tensor([seq]))[0, len(ids) - 1:]
    cached = torch.cat(logits)
    assert (cached - full).abs().max() < 1e-4
    assert torch.equal(full[:-1].argmax(-1), torch.tensor(seq[len(ids):]))


@pytest.mark.parametrize("chunk", [1, 3, W, 13, 64])
def test_chunked_prefill_equals_one_pass(model, chunk):
    ids = prompt(40)
    with torch.inference_mode():
        full = model(torch.tensor([ids]))[:, -1]
    session = Session(model, 1, 64, prefill_chunk=chunk)
    torch.testing.assert_close(session.prefill([ids]), full, rtol=0, atol=1e-5)
    assert_same_greedy(model, ids, list(generate_ids(model, ids, 20, prefill_chunk=chunk)),
                       list(generate_ids(model, ids, 20)), what=f"chunk {chunk}")


def test_batch_equals_each_prompt_alone(model):
    prompts = [prompt(n) for n in (2, W, 17, 30)]
    alone = [list(generate_ids(model, p, 40)) for p in prompts]
    together: list[list[int]] = [[] for _ in prompts]
    for row in Decoder(model, prompts, 40, prefill_chunk=5):  # chunks cut through the left padding too
        for b, token in enumerate(row):
            if token is not None:
                together[b].append(token)
    for p, t, a in zip(prompts, together, alone, strict=True):
        assert_same_greedy(model, p, t, a, what=f"row of {len(p)} tokens")


def test_batch_rows_stop_independently(model):
    prompts = [prompt(n) for n in (4, 11)]
    alone = [list(generate_ids(model, p, 30)) for p in prompts]
    stop = alone[0][5]  # the first row stops at its 6th token; the other must carry on unchanged
    expected = [list(generate_ids(model, p, 30, stop_ids={stop})) for p in prompts]
    got: list[list[int]] = [[], []]
    for row in Decoder(model, prompts, 30, stop_ids={stop}):
        for b, token in enumerate(row):
            if token is not None:
                got[b].append(token)
    assert got == expected and len(got[0]) <= 5


def test_compiled_decode_step_matches_eager(model):
    """The GPU path (static cache + torch.compile) on CPU: the 'eager' backend traces the same graph."""
    ids = prompt(11)
    torch._dynamo.reset()
    assert list(generate_ids(model, ids, 30, compile="eager")) == list(generate_ids(model, ids, 30))


def test_static_cache_equals_dynamic(model):
    ids = prompt(12)
    a, b = Session(model, 1, 80), Session(model, 1, 80)
    b.cache = KVCache(model.config, 1, 80, static=True)  # global layers attend over all 80 slots
    la, lb = a.prefill([ids]), b.prefill([ids])
    for _ in range(30):
        token = la.argmax(-1)
        la, lb = a.step(token), b.step(token)
        torch.testing.assert_close(la, lb, rtol=0, atol=1e-5)


def test_sliding_layers_keep_only_the_window(model):
    cache = KVCache(model.config, 2, 200)
    for layer, kind in zip(cache.layers, model.config.layer_types, strict=True):
        assert layer.k.shape == (2, model.config.num_kv_heads, 200 if kind == GLOBAL else W,
                                 model.config.head_dim)


def test_cache_bytes_at_32k_for_270m():
    cfg = get_preset("gemma3-270m")
    size = cache_size(cfg)
    per_slot = 2 * 1 * 256 * 4  # k and v, 1 KV head of 256, float32
    assert size.full == per_slot * 32_768 * 18
    assert size.ours == per_slot * (3 * 32_768 + 15 * 512)
    assert size.full / size.ours > 5.5  # 1.21 GB vs 0.21 GB


def test_session_errors(model):
    session = Session(model, 1, 10)
    with pytest.raises(NanogemmaError, match="do not fit"):
        session.prefill([prompt(11)])
    session.prefill([prompt(4)])
    with pytest.raises(NanogemmaError, match="prompt is empty"):
        Session(model, 2, 20).prefill([[], prompt(3)])
    pair = Session(model, 2, 20)
    pair.prefill([prompt(3), prompt(5)])  # different lengths: fine on an empty session (left-padded)
    with pytest.raises(NanogemmaError, match="empty session"):
        pair.prefill([prompt(3), prompt(4)])
    with pytest.raises(NanogemmaError, match="context is 256"):
        list(generate_ids(model, prompt(256), 4))
    # At the context limit generation ends, as at max_new_tokens.
    assert len(list(generate_ids(model, prompt(250), 100, stop_ids=set()))) == 6


def test_reset_forgets_everything(model):
    ids = prompt(20)
    session = Session(model, 1, 64)
    first = session.prefill([ids])
    session.step(first.argmax(-1))
    session.reset()
    torch.testing.assert_close(session.prefill([ids]), first, rtol=0, atol=0)


@pytest.mark.slow
def test_real_model_cached_equals_uncached_past_two_windows(model_and_tok):
    """The 270M model: a 1,000-token prompt (its prefill wraps the 512-token rings, which then hold only
    its last 512 keys) and 100 greedy decode steps over full rings (which wrap again at 1,024), against
    one uncached forward over all 1,100.

    Tolerance: max |cached - uncached| logit < 5e-3 (logits span about ±30; float32 reordering of sums
    across different attention shapes gives ~1e-4). Each greedy token must be the uncached argmax, unless
    the top two uncached logits are closer than that tolerance (a tie that either choice honours).
    """
    model, tok = model_and_tok
    ids = tok.encode(PROMPTS["long"] + "\n\n" + PROMPTS["long"])[:1000]
    steps = 1100 - len(ids)
    # The decode steps write ring slots 1000 % W onwards: they pass the ring's end, a wrap while decoding.
    assert len(ids) == 1000 and len(ids) % model.config.sliding_window + steps > model.config.sliding_window
    session = Session(model, 1, len(ids) + steps + 1)
    vocab_sample = torch.randperm(model.config.vocab_size, generator=torch.Generator().manual_seed(0))[:4096]
    seq, kept = list(ids), []  # per step: the cached logits at the argmax and at 4,096 fixed ids
    logits = session.prefill([ids])
    for i in range(steps):
        token = logits.argmax(-1)
        kept.append(torch.cat([logits[0, token], logits[0, vocab_sample]]))
        seq.append(int(token))
        if i < steps - 1:
            logits = session.step(token)
    with torch.inference_mode():
        x = model(torch.tensor([seq[:-1]]))[0, len(ids) - 1:]  # the uncached logits at the same steps
    new = torch.tensor(seq[len(ids):])
    ref = torch.cat([x.gather(1, new[:, None]), x[:, vocab_sample]], dim=1)
    diff = (torch.stack(kept) - ref).abs().max().item()
    print(f"\n[cache] 270M, {len(ids)}-token prompt, {len(new)} greedy tokens: max |cached - uncached| logit = {diff:.2e}")
    assert len(seq) == 1100 > 2 * model.config.sliding_window
    assert diff < 5e-3
    top2 = x.topk(2, dim=-1).values
    agree = (x.argmax(-1) == new) | (top2[:, 0] - top2[:, 1] < 5e-3)
    assert bool(agree.all()), f"first disagreement at step {int((~agree).nonzero()[0])}"


def test_rollback_forgets_the_last_columns(model):
    """Speculative decoding takes rejected drafts back: the cache then equals one that never saw them,
    bit for bit, across ring wraps (the undo log keeps the keys the drafts overwrote; the ring has the same
    W slots as a cache without spare, so attention sums the same keys in the same order)."""
    ids = prompt(20)
    a, b = Session(model, 1, 120, spare=4), Session(model, 1, 120)
    a.prefill([ids]), b.prefill([ids])
    for round_ in range(12):
        for t in prompt(4, seed=round_):
            a.step(torch.tensor([t]))
        a.rollback(3 if round_ % 2 else 4)
        if round_ % 2:
            b.step(torch.tensor([prompt(4, seed=round_)[0]]))
    assert a.length == b.length
    for t in prompt(30, seed=99):
        assert torch.equal(a.step(torch.tensor([t])), b.step(torch.tensor([t])))
    with pytest.raises(NanogemmaError, match="spare"):
        a.rollback(5)
    a.prefill([prompt(5, seed=7)])  # a chunk longer than spare logs nothing: what came before it stays
    with pytest.raises(NanogemmaError, match="spare"):
        a.rollback(1)


@pytest.mark.parametrize("static", [False, True])
def test_short_chunks_can_be_taken_back(model, static):
    """A chunk of at most `spare` tokens (prompt lookup's check) logs what it overwrites, as decode steps
    do: taking it back restores every ring entry bit for bit, across ring wraps (window 8), and taking back
    part of it leaves the cache a session that was fed only the rest would have."""
    a = Session(model, 1, 200, spare=5, compile="eager" if static else False)
    a.prefill([prompt(11)])
    for round_ in range(8):
        before = [(layer.k.clone(), layer.v.clone(), layer.pos.clone()) for layer in a.cache.layers]
        chunk = torch.tensor([prompt(5, seed=round_)])
        a.extend(chunk)
        a.rollback(5)
        for layer, (k, v, pos) in zip(a.cache.layers, before, strict=True):
            assert torch.equal(layer.pos, pos)
            live = pos[0] >= 0
            assert torch.equal(layer.k[:, :, live], k[:, :, live]) and torch.equal(layer.v[:, :, live], v[:, :, live])
        a.extend(chunk)
        a.rollback(5 - round_ % 4)  # keep 0-3 of the chunk's tokens
    history = a.length
    b = Session(model, 1, 200)
    fed = prompt(11) + [t for r in range(8) for t in prompt(5, seed=r)[:r % 4]]
    b.prefill([fed])
    assert history == len(fed)
    for t in prompt(12, seed=40):
        torch.testing.assert_close(a.step(torch.tensor([t])), b.step(torch.tensor([t])), rtol=0, atol=1e-5)


def test_compiled_sessions_of_other_lengths_in_one_process(model):
    """Every session's compiled step is the same code: a second session's cache (another length) must get
    its own graph, not replay the first one's over buffers of another shape."""
    torch._dynamo.reset()
    for n in (60, 40):
        s, ref = Session(model, 1, n, compile="aot_eager"), Session(model, 1, n)
        s.prefill([prompt(9)]), ref.prefill([prompt(9)])
        for t in prompt(5, seed=n):
            torch.testing.assert_close(s.step(torch.tensor([t])), ref.step(torch.tensor([t])), rtol=1e-5, atol=1e-5)


def test_rollback_with_more_spare_than_window():
    """k drafts longer than the window write a ring slot twice; undoing them restores the older entry."""
    model = tiny_model()  # window 8
    a, b = Session(model, 1, 200, spare=12), Session(model, 1, 200)
    a.prefill([prompt(11)]), b.prefill([prompt(11)])
    for round_ in range(6):
        steps = prompt(12, seed=round_)
        for t in steps:
            a.step(torch.tensor([t]))
        a.rollback(12 - round_)
        for t in steps[:round_]:
            b.step(torch.tensor([t]))
    for t in prompt(20, seed=50):
        assert torch.equal(a.step(torch.tensor([t])), b.step(torch.tensor([t])))


@pytest.mark.parametrize("how", [True, "eager"])
@pytest.mark.parametrize("cuda", [True, False])
def test_compile_options_are_accepted(how, cuda):
    """The CUDA-graph arguments are built on CPU too: torch.compile must accept every combination."""
    from nanogemma.generation import compile_options

    torch.compile(lambda x: x + 1, **compile_options(how, cuda))  # raises on conflicting arguments
