"""Continuous batching is exact: each request's tokens equal a lone `generate_ids` on its prompt.

Random `tiny` models (window 8, so a few dozen tokens wrap a slot's ring many times) run requests that arrive
while others decode, prompts shorter and longer than the window and than the step's token budget (so they
are prefilled in chunks between decode steps), early finishes, more requests than slots (slots are reused)
and per-request sampling. Batched float products may round differently from batch-1 ones, so logits are
bounded against a float64 reference and greedy tokens compared; the last test runs the real 270M model
past its 512-token window.
"""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model

from nanogemma.decoding import SamplingParams
from nanogemma.engine import MIN_CHUNK, Engine, QueueFull, Request
from nanogemma.errors import NanogemmaError
from nanogemma.generation import Session, generate_ids
from nanogemma.model import Gemma
from nanogemma.slots import SlotCache

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread, as elsewhere

W = 8


@pytest.fixture(scope="module")
def model() -> Gemma:
    return tiny_model()


def prompt(n: int, seed: int = 1) -> list[int]:
    return torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(seed + 7 * n)).tolist()


def lone(model: Gemma, ids: list[int], n: int, **kw) -> list[int]:
    return list(generate_ids(model, ids, n, **kw))


def run_all(engine: Engine, max_steps: int = 10_000) -> None:
    for _ in range(max_steps):
        if not engine.step():
            return
    raise AssertionError("the engine did not finish")


@pytest.mark.parametrize("ride", ["never", "always"])
def test_staggered_arrivals_equal_each_prompt_alone(model, ride):
    """7 requests through 3 slots, arriving while others decode: slots are reused, rings wrap many times.
    The decoding slots take their steps in calls of their own, or as rows of the prefill calls."""
    sizes = [(2, 60), (W, 25), (17, 70), (30, 5), (3, 40), (41, 33), (12, 50)]
    prompts = [prompt(n) for n, _ in sizes]
    expected = [lone(model, p, m) for p, (_, m) in zip(prompts, sizes, strict=True)]
    # 41 tokens: prefilled over many steps
    engine = Engine(model, slots=3, max_len=128, step_tokens=6, decode_in_prefill=ride)
    reqs = [Request(p, m) for p, (_, m) in zip(prompts, sizes, strict=True)]
    for i, req in enumerate(reqs):
        engine.submit(req)
        for _ in range(3 + 4 * i):  # the next one arrives mid-decode of the others
            engine.step()
    run_all(engine)
    assert [r.tokens for r in reqs] == expected
    assert all(r.finish_reason == "length" for r in reqs)
    assert engine.busy_slots == 0 and engine.queue_depth == 0
    assert len(set(expected[2])) > 10  # the comparison is only meaningful if the text varies
    assert (engine.stats.merged_steps > 10) == (ride == "always")


def test_early_finishes_free_their_slots_and_leave_the_others_unchanged(model):
    prompts = [prompt(n, seed=3) for n in (4, 11, 25, 6)]
    plain = [lone(model, p, 40) for p in prompts]
    stops = [{plain[0][5]}, {plain[1][2]}, set(), set()]  # two rows stop early, at a token of their own
    expected = [lone(model, p, 40, stop_ids=s) for p, s in zip(prompts, stops, strict=True)]
    engine = Engine(model, slots=2, max_len=96, step_tokens=8)
    reqs = [engine.submit(Request(p, 40, stop_ids=frozenset(s))) for p, s in zip(prompts, stops, strict=True)]
    run_all(engine)
    assert [r.tokens for r in reqs] == expected
    assert reqs[0].finish_reason == "stop" and len(reqs[0].tokens) <= 5
    assert [r.finish_reason for r in reqs[2:]] == ["length", "length"]


def test_cancel_frees_the_slot_within_one_step(model):
    engine = Engine(model, slots=1, max_len=96, step_tokens=16)
    a = engine.submit(Request(prompt(5), 80))
    b = engine.submit(Request(prompt(9), 10))
    for _ in range(4):
        engine.step()
    assert a.tokens and b.slot is None
    engine.cancel(a)
    engine.step()
    assert a.finish_reason == "cancelled" and a.done.is_set() and b.slot == 0
    run_all(engine)
    assert b.tokens == lone(model, prompt(9), 10)


def test_seeded_sampling_reproduces_whatever_runs_beside_it(model):
    params = [SamplingParams(temperature=1.0, top_k=50, seed=s) for s in (11, 12)] + \
             [SamplingParams(temperature=0.8, top_p=0.9, min_p=0.05, repetition_penalty=1.3, seed=13)]
    prompts = [prompt(n, seed=5) for n in (6, 14, 9)]
    alone = [Engine(model, slots=1, max_len=80).generate([p], 30, [q])[0] for p, q in zip(prompts, params, strict=True)]
    together = Engine(model, slots=3, max_len=80, step_tokens=4).generate(prompts, 30, params)
    assert together == alone
    assert alone[0] == lone(model, prompts[0], 30, temperature=1.0, top_k=50, seed=11)  # generate's stream
    assert alone[0] != Engine(model, slots=1, max_len=80).generate([prompts[0]], 30, [params[1]])[0]


def test_slot_logits_are_bounded_by_a_float64_reference(model):
    """Teacher forcing: slot 1 decodes 200 tokens (25 wraps) while slot 0 holds another sequence; its logits
    stay as close to a float64 forward over the whole sequence as a lone session's do."""
    ref = tiny_model().double()
    cache = SlotCache(model.config, 2, 256)
    seq = prompt(5, seed=9)
    other = prompt(20, seed=10)
    with torch.inference_mode():
        for slot, ids in ((0, other), (1, seq)):
            cache.plan_chunks([slot], [len(ids)])
            model(torch.tensor([ids]), torch.arange(len(ids))[None], cache)
            cache.lengths[slot] = len(ids)
        session = Session(model, 1, 256)
        session.prefill([seq])
        got, lone_logits = [], []
        for i in range(200):
            token = int(ref(torch.tensor([seq]), last_only=True)[0, -1].argmax()) if i % 50 == 0 else (i * 37) % 500 + 3
            seq.append(token)
            cache.plan_decode(2)
            pos = torch.tensor([[cache.lengths[0]], [cache.lengths[1]]])
            hidden = model.hidden(torch.tensor([[other[i % 20]], [token]]), pos, cache)[:, -1]
            cache.lengths[0] += 1
            cache.lengths[1] += 1
            got.append(model.logits(hidden[1:]).float())
            lone_logits.append(session.step(torch.tensor([token])))
        full = ref(torch.tensor([seq]))[0, -200:].float()
    err_engine = (torch.cat(got) - full).abs().max()
    err_lone = (torch.cat(lone_logits) - full).abs().max()
    # float32 against float64 over 6 tiny layers: a few ulps of logits of size ~1, for both paths alike.
    assert err_engine < 1e-4 and err_lone < 1e-4


def test_compiled_decode_step_matches_eager(model):
    """The GPU path (all slots, static shapes, torch.compile) on CPU with the tracing-only 'eager' backend."""
    prompts = [prompt(n, seed=2) for n in (3, 19, 10)]
    torch._dynamo.reset()
    compiled = Engine(model, slots=2, max_len=64, step_tokens=8, compile="eager").generate(prompts, 30)
    assert compiled == [lone(model, p, 30) for p in prompts]


def test_bfloat16_serves_and_starts_like_its_lone_run():
    """bfloat16 keeps 8 bits of mantissa: a differently shaped product can flip a near-tie, after which texts
    part. So this checks what holds by construction: each request runs to its length in its own slot, and
    the prefill (the same tokens in one chunk each way, a batch of one: the second arrives after the first
    is prefilled) gives the lone run's first token."""
    m = tiny_model().to(torch.bfloat16)
    prompts = [prompt(n, seed=4) for n in (5, 13)]
    engine = Engine(m, slots=2, max_len=64, step_tokens=64)
    reqs = [engine.submit(Request(prompts[0], 25))]
    engine.step()
    reqs.append(engine.submit(Request(prompts[1], 25)))
    run_all(engine)
    got = [r.tokens for r in reqs]
    assert [len(t) for t in got] == [25, 25]
    assert [t[0] for t in got] == [lone(m, p, 1)[0] for p in prompts]


@pytest.mark.parametrize("kernel", ["int8", "int8-wo"])
def test_int8_models_serve(kernel):
    from nanogemma.quantize import quantize_model

    m = tiny_model()
    quantize_model(m, kernel)
    prompts = [prompt(n, seed=6) for n in (5, 13)]
    got = Engine(m, slots=2, max_len=64, step_tokens=8).generate(prompts, 20)
    assert [len(t) for t in got] == [20, 20]
    if kernel == "int8-wo":  # rows stay independent; dynamic int8 shares one activation scale per batch
        assert got == [lone(m, p, 20) for p in prompts]


def test_bad_requests_and_a_full_queue(model):
    engine = Engine(model, slots=1, max_len=32, max_queue=1)
    with pytest.raises(NanogemmaError, match="empty"):
        engine.submit(Request([], 5))
    with pytest.raises(NanogemmaError, match="context holds 32"):
        engine.submit(Request(prompt(30), 3))
    with pytest.raises(NanogemmaError, match="temperature"):
        engine.submit(Request(prompt(3), 3, SamplingParams(temperature=-1)))
    engine.submit(Request(prompt(3), 3))  # takes the slot at the next step
    engine.submit(Request(prompt(4), 3))  # waits
    with pytest.raises(QueueFull):
        engine.submit(Request(prompt(5), 3))
    run_all(engine)
    assert engine.stats.finished["length"] == 2


def test_a_failing_step_fails_its_requests_not_the_engine(model, monkeypatch):
    import threading

    engine = Engine(model, slots=2, max_len=64)
    req = engine.submit(Request(prompt(5), 10))
    calls = {"n": 0}
    real = engine._decode

    def broken(decoding):
        calls["n"] += 1
        raise RuntimeError("out of memory")

    monkeypatch.setattr(engine, "_decode", broken)
    stop = threading.Event()
    thread = threading.Thread(target=engine.run, args=(stop,), daemon=True)
    thread.start()
    assert req.done.wait(10) and req.finish_reason == "error" and "out of memory" in req.error
    monkeypatch.setattr(engine, "_decode", real)
    ok = engine.submit(Request(prompt(5), 10))
    assert ok.done.wait(10)
    stop.set()
    engine.wake()
    thread.join(5)
    assert ok.tokens == lone(model, prompt(5), 10)


@pytest.mark.slow
def test_real_model_past_the_window_beside_a_short_request(model_and_tok):
    model, tok = model_and_tok
    text = " ".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(36))
    long_ids = tok.encode(text)
    assert len(long_ids) > 520  # past the 512-token window
    short_ids = tok.encode("The capital of France is")
    # The long prompt takes 3 chunks, and the short one decodes as a row of those calls.
    engine = Engine(model, slots=2, max_len=560, step_tokens=192, decode_in_prefill="always")
    got = engine.generate([short_ids, long_ids], 4)
    assert got == [lone(model, short_ids, 4), lone(model, long_ids, 4)]
    assert engine.stats.merged_steps >= 2


def test_a_long_prompt_is_prefilled_between_decode_steps(model):
    """While a 200-token prompt is fed in chunks, the decoding requests still get a token every step."""
    engine = Engine(model, slots=3, max_len=256, step_tokens=16)
    short = [engine.submit(Request(prompt(n, seed=8), 40)) for n in (3, 7)]
    while not all(r.tokens for r in short):
        engine.step()
    long = engine.submit(Request(prompt(200, seed=8), 5))
    steps = 0
    while not long.tokens:
        before = [len(r.tokens) for r in short]
        engine.step()
        steps += 1
        assert [len(r.tokens) for r in short] == [b + 1 for b in before]  # nobody waited for the prefill
    assert steps >= 200 // 16  # the prompt took many steps, at most 16 prompt tokens each (MIN_CHUNK)
    run_all(engine)
    assert long.tokens == lone(model, prompt(200, seed=8), 5)
    assert [r.tokens for r in short] == [lone(model, prompt(n, seed=8), 40) for n in (3, 7)]


def test_a_shared_prefix_is_prefilled_once_and_changes_no_token(model):
    """Requests that begin with the same 140 tokens (a system prompt) reuse its cache rows, block by block."""
    from nanogemma.slots import PREFIX_BLOCK

    system = prompt(140, seed=5)
    prompts = [system + prompt(n, seed=s) for s, n in [(1, 5), (2, 30), (3, 12)]] + [prompt(100)]
    expected = [lone(model, p, 20) for p in prompts]
    engine = Engine(model, slots=2, max_len=256, step_tokens=48, prefix_cache=2)
    assert engine.generate(prompts[:1], 20) == expected[:1]
    assert engine.stats.prefix_hits == 0 and len(engine.prefixes.entries) == 2  # after 64 and 128 tokens
    assert engine.generate(prompts[1:], 20) == expected[1:]
    full = 140 // PREFIX_BLOCK * PREFIX_BLOCK
    assert engine.stats.prefix_hits == 2 and engine.stats.prefix_tokens == 2 * full
    # The unrelated prompt's first block came in; the least recently used (the system prompt's first block) went.
    assert system[:full] in engine.prefixes and system[:PREFIX_BLOCK] not in engine.prefixes
    assert prompts[3][:PREFIX_BLOCK] in engine.prefixes
    # A stored copy is bit for bit what a cold prefill of those tokens writes.
    cold = Engine(model, slots=1, max_len=256, step_tokens=48, prefix_cache=3)
    cold.generate([system + [7]], 1)
    for (k, v, pos), (k2, v2, pos2) in zip(cold.prefixes.entries[tuple(system[:full])],
                                           engine.prefixes.entries[tuple(system[:full])], strict=True):
        assert torch.equal(k, k2) and torch.equal(v, v2) and torch.equal(pos, pos2)
    with pytest.raises(NanogemmaError, match="prefix-cache"):
        Engine(model, prefix_cache=-1)


def record_feeds(engine: Engine, monkeypatch) -> list[list[tuple[int, int]]]:
    """Each prefill forward call, as its rows: (slot, chunk length), by slot."""
    calls: list[list[tuple[int, int]]] = []
    real = engine._feed

    def feed(reqs, chunks, riders=()):
        calls.append(sorted([*((r.slot, len(c)) for r, c in zip(reqs, chunks, strict=True)),
                             *((r.slot, 1) for r in riders)]))
        real(reqs, chunks, riders)

    monkeypatch.setattr(engine, "_feed", feed)
    return calls


def test_several_slots_are_prefilled_in_one_call_and_equal_each_prompt_alone(model, monkeypatch):
    """Five prompts admitted together, of different lengths (shorter than the window, longer, longer than a
    step's share: several chunks) and one starting with a stored prefix, are prefilled as rows of one batch.
    Then two more arrive while those decode and are prefilled together beside the decode steps."""
    from nanogemma.slots import PREFIX_BLOCK

    system = prompt(70, seed=21)
    first = [prompt(3, seed=22), prompt(W + 1, seed=22), prompt(40, seed=22), system + prompt(5, seed=23),
             prompt(130, seed=22)]
    later = [prompt(2 * W + 3, seed=24), system + prompt(20, seed=25)]
    expected = [lone(model, p, 12) for p in first + later]
    engine = Engine(model, slots=7, max_len=200, step_tokens=160, prefix_cache=4, decode_in_prefill="never")
    assert engine.generate([system + [5]], 1) == [lone(model, system + [5], 1)]  # stores the system prompt
    calls = record_feeds(engine, monkeypatch)
    reqs = [engine.submit(Request(p, 12)) for p in first]
    engine.step()
    assert engine.stats.prefix_hits == 1 and reqs[3].fed >= PREFIX_BLOCK
    # One call, five rows of different lengths: 160 // 5 = 32 tokens each at most, the short ones whole.
    assert calls == [[(0, 3), (1, W + 1), (2, 32), (3, 11), (4, 32)]]
    assert [len(r.tokens) for r in reqs] == [1, 1, 0, 1, 0]
    for _ in range(3):
        engine.step()
    late = [engine.submit(Request(p, 12)) for p in later]
    while not all(r.tokens for r in late):
        before = [len(r.tokens) for r in reqs]
        engine.step()
        assert all(len(r.tokens) == b + 1 for r, b in zip(reqs, before, strict=True) if 0 < b < 12)
    assert calls[-1] == [(5, 2 * W + 3), (6, 90 - PREFIX_BLOCK)]  # one call for both, the second from its prefix
    run_all(engine)
    assert [r.tokens for r in reqs + late] == expected
    assert engine.stats.prefix_hits == 2


def test_a_short_prompt_is_not_held_behind_a_long_one(model, monkeypatch):
    """A 200-token prompt and a 5-token one arrive together while two requests decode: they share the step's
    prompt budget, so the short one's first token comes at once, and the decodes keep a token per step."""
    engine = Engine(model, slots=4, max_len=256, step_tokens=40, decode_in_prefill="never")
    running = [engine.submit(Request(prompt(n, seed=26), 60)) for n in (4, 6)]
    while not all(r.tokens for r in running):
        engine.step()
    calls = record_feeds(engine, monkeypatch)
    long = engine.submit(Request(prompt(200, seed=27), 5))
    short = engine.submit(Request(prompt(5, seed=27), 5))
    engine.step()
    assert short.tokens and not long.tokens
    assert calls == [sorted([(long.slot, 19), (short.slot, 5)])]  # (40 - 2 decode tokens) // 2 each at most
    steps = 1
    while not long.tokens:
        before = [len(r.tokens) for r in running]
        engine.step()
        steps += 1
        assert [len(r.tokens) for r in running] == [b + 1 for b in before]
    assert max(len(rows) * max(n for _, n in rows) for rows in calls) <= 38  # pads count against the budget
    run_all(engine)
    assert long.tokens == lone(model, prompt(200, seed=27), 5) and short.tokens == lone(model, prompt(5, seed=27), 5)
    assert [r.tokens for r in running] == [lone(model, prompt(n, seed=26), 60) for n in (4, 6)]


def test_a_burst_beyond_the_budget_is_prefilled_together(model, monkeypatch):
    """Six 40-token prompts at once with a 32-token budget: each still gets MIN_CHUNK tokens a step, in one
    call, so all six get their first token in the same (third) step rather than a few at a time."""
    from nanogemma.engine import MIN_CHUNK

    prompts = [prompt(40, seed=30 + i) for i in range(6)]
    engine = Engine(model, slots=6, max_len=64, step_tokens=32)
    calls = record_feeds(engine, monkeypatch)
    reqs = [engine.submit(Request(p, 6)) for p in prompts]
    for _ in range(2):
        engine.step()
    assert not any(r.tokens for r in reqs)
    engine.step()
    assert all(len(r.tokens) == 1 for r in reqs)
    assert calls == [[(s, n) for s in range(6)] for n in (MIN_CHUNK, MIN_CHUNK, 40 - 2 * MIN_CHUNK)]
    run_all(engine)
    assert [r.tokens for r in reqs] == [lone(model, p, 6) for p in prompts]


def test_a_prefix_that_served_a_request_outlives_a_burst_of_new_ones():
    """Eviction is segmented: prompts' own tails (never asked for again) churn among themselves, and a prefix
    that has served a request stays while they do; least recently used still goes first within each part."""
    from nanogemma.slots import PREFIX_BLOCK, PrefixCache

    cache = PrefixCache(4)
    shared = list(range(PREFIX_BLOCK))
    cache.put(shared, ["rows"])
    assert cache.longest(shared + [1]) == (PREFIX_BLOCK, ["rows"])  # a hit: protected now
    tails = [[t] * PREFIX_BLOCK for t in range(1000, 1010)]
    for tail in tails:
        cache.put(tail, [tail[0]])
    assert shared in cache and tails[-1] in cache and tails[-3] in cache and tails[-4] not in cache
    assert cache.longest(tails[0] + [1]) == (0, None) and len(cache.entries) == 4
    for tail in tails[-3:-1]:  # two more hits: the protected half holds 2, its least recently used goes back
        cache.longest(tail + [1])
    cache.put([7] * PREFIX_BLOCK, ["new"])
    cache.put([8] * PREFIX_BLOCK, ["new"])
    assert shared not in cache and tails[-3] in cache and tails[-2] in cache
    one = PrefixCache(1)  # capacity 1: plain least recently used, a new prefix always gets in
    one.put(shared, ["rows"])
    one.longest(shared + [1])
    one.put(tails[0], ["tail"])
    assert tails[0] in one and shared not in one


def test_decoding_slots_ride_in_the_prefill_call_when_their_pads_cost_less_than_a_call(model, monkeypatch):
    """"auto" merges a step's decode rows into its prefill call when (rows x (chunk - 1)) pad tokens cost
    less than a decode call, on the engine's own recent timings; else the decode call runs on its own."""
    engine = Engine(model, slots=3, max_len=128, step_tokens=40)
    running = engine.submit(Request(prompt(4, seed=40), 30))
    engine.step()
    engine.step()  # a decode call of its own: there is no prefill to ride in
    assert engine.decode_s is not None and engine.token_s is not None and engine.stats.merged_steps == 0
    calls = record_feeds(engine, monkeypatch)
    long = engine.submit(Request(prompt(60, seed=41), 5))
    # A 1-row decode call costing 10 token-slots: 1 x (39 - 1) pads are dearer, so two calls.
    engine.decode_s, engine.token_s = 10.0, 1.0
    engine.step()
    assert calls[-1] == [(long.slot, 39)] and engine.stats.merged_steps == 0
    # The same call costing 100 token-slots: cheaper to ride, so one call with a 1-token row.
    engine.decode_s, engine.token_s = 100.0, 1.0
    engine.step()
    assert calls[-1] == sorted([(long.slot, 21), (running.slot, 1)]) and engine.stats.merged_steps == 1
    run_all(engine)
    assert running.tokens == lone(model, prompt(4, seed=40), 30) and long.tokens == lone(model, prompt(60, seed=41), 5)
    with pytest.raises(NanogemmaError, match="decode_in_prefill"):
        Engine(model, decode_in_prefill="sometimes")


def test_greedy_rows_take_one_batched_argmax_that_each_rows_sampler_would_give():
    """`_greedy_tokens`: greedy rows get their sampler's own token (ties to the first maximum); sampled
    and penalised rows are left to their samplers."""
    from nanogemma.engine import _greedy_tokens
    from nanogemma.sampling import Sampler

    vocab = 50
    kinds = [SamplingParams(), SamplingParams(temperature=0.8, seed=1), SamplingParams(top_k=3),
             SamplingParams(repetition_penalty=1.3), SamplingParams()]
    reqs = []
    for params in kinds:
        r = Request([1, 2], 4, params)
        r.sampler = Sampler(params, 1, vocab)
        reqs.append(r)
    logits = torch.randn(len(reqs), vocab, generator=torch.Generator().manual_seed(0))
    logits[4, 7] = logits[4, 9] = logits[4].max() + 1.0  # a tie: the first maximum, as argmax gives
    tokens = _greedy_tokens(reqs, logits)
    assert tokens[1] is None and tokens[3] is None  # sampled; penalised (its sampler adjusts the logits)
    assert tokens[4] == 7
    for i in (0, 2, 4):  # top_k without temperature is greedy, as in `sampling.sample`
        assert tokens[i] == int(Sampler(kinds[i], 1, vocab)(logits[i:i + 1]))
    assert _greedy_tokens(reqs[:1] + reqs[4:], logits[[0, 4]]) == [tokens[0], 7]  # all greedy: no gather


def test_while_slots_decode_a_prompt_chunk_takes_at_most_its_share_of_a_decode_call(model, monkeypatch):
    """With `prefill_share`, a step's prompt tokens cost at most that fraction of a decode call (on the engine's
    timings), so a long prompt cannot stretch the decoding slots' gaps by more; alone, a prompt takes the
    whole budget. The tokens are still each prompt's lone ones."""
    engine = Engine(model, slots=3, max_len=256, step_tokens=64, decode_in_prefill="never", prefill_share=0.5)
    calls = record_feeds(engine, monkeypatch)
    first = engine.submit(Request(prompt(100, seed=50), 40))
    engine.step()
    assert calls[-1] == [(first.slot, 64)]  # nothing decodes: the whole budget
    while not first.tokens:
        engine.step()
    long = engine.submit(Request(prompt(150, seed=51), 5))
    # A decode call of 10 ms, a prompt token 0.25 ms: 0.5 x 10 / 0.25 = 20 tokens (the budget allows 63).
    engine.decode_s, engine.token_s = 0.010, 0.00025
    engine.step()
    assert calls[-1] == [(long.slot, 20)]
    engine.decode_s, engine.token_s = 0.010, 0.01  # a token dearer than the share: MIN_CHUNK still goes in
    engine.step()
    assert calls[-1] == [(long.slot, MIN_CHUNK)]
    run_all(engine)
    assert first.tokens == lone(model, prompt(100, seed=50), 40) and long.tokens == lone(model, prompt(150, seed=51), 5)
    with pytest.raises(NanogemmaError, match="prefill-share"):
        Engine(model, prefill_share=0)
