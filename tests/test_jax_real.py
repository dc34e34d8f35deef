"""The official 270M weights: the JAX model against the PyTorch model, float32, on the same GGUF.

Figures are printed (run with `-s`) and carried in the assertion messages. The prompts are those of
test_parity.py; the long one (934 tokens) runs past the 512-token sliding window, so the sliding layers
really drop keys, in the full forward, in the chunked prefill and while decoding.

**Bounds from float64, not from one CPU.** Two float32 implementations that sum in different orders
(oneDNN and XLA; AVX2 and AVX-512 kernels) cannot agree closer than float32's own error, which on this
model varies by position (at token 359 of the long prompt PyTorch's float32 is ~5e-3 from float64, the error
growing through blocks 3-7; elsewhere ~1e-4). A fixed 1e-3 held on one CPU and not on another, so the long
prompt is checked against a float64 run of the same weights: JAX must be about as close to it as PyTorch's
float32 is, and where the two pick different tokens, float64 must show those tokens tied within that error.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import TIE_FACTOR, float32_floor, in_float64
from texts import PROMPTS

pytestmark = pytest.mark.slow  # the real 270M model (still part of `make test`)

GREEDY_TOKENS = 64
SHORT_WIDTH = 32  # the short prompts are right-padded to one width: one compiled forward for all


@pytest.fixture(scope="module")
def jax_model():
    import nanogemma.jax

    return nanogemma.jax.load()


@pytest.fixture(scope="module")
def long_run(model_and_tok, jax_model) -> dict:
    """The long prompt, 64 JAX greedy tokens after it, and both models' logits over prompt + tokens.

    Greedy decoding is determined by the argmax of each next-token distribution given the prefix, so one
    PyTorch forward over prompt + generated tokens shows what PyTorch's greedy decoding would pick at each
    of the 64 steps — without paying for 64 PyTorch decode steps in the test.
    """
    from nanogemma.jax.generation import generate_ids

    model, tok = model_and_tok
    jm, _ = jax_model
    prompt = tok.encode(PROMPTS["long"])
    new = list(generate_ids(jm, prompt, GREEDY_TOKENS))
    seq = prompt + new[:-1]
    with torch.no_grad():
        ref = model(torch.tensor([seq]))[0].numpy()
    return {"prompt": prompt, "new": new, "seq": seq, "torch": ref, "jax": np.asarray(jm([seq]))[0]}


def test_same_config_and_tokenizer(model_and_tok, jax_model):
    model, tok = model_and_tok
    jm, jtok = jax_model
    assert jm.config == model.config
    assert jtok.encode(PROMPTS["long"]) == tok.encode(PROMPTS["long"])


@pytest.mark.parametrize("name", [n for n in PROMPTS if n != "long"])
def test_logits_match_pytorch(model_and_tok, jax_model, name):
    model, tok = model_and_tok
    jm, _ = jax_model
    ids = tok.encode(PROMPTS[name])
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0].numpy()
    n = len(ids)
    padded = np.zeros((1, SHORT_WIDTH), np.int32)
    padded[0, :n] = ids
    pos = np.where(np.arange(SHORT_WIDTH) < n, np.arange(SHORT_WIDTH), -1)[None]  # pads: position -1, never seen
    ours = np.asarray(jm(padded, pos))[0, :n]
    diff = float(np.abs(ours - ref).max())
    with torch.no_grad(), in_float64(model):
        exact = model(torch.tensor([ids]))[0].numpy()
    torch_err, jax_err = np.abs(ref - exact).max(-1), np.abs(ours - exact).max(-1)
    print(f"\n[jax parity] {name}: {n} tokens, max |logit diff| vs PyTorch = {diff:.3g}; against float64: "
          f"PyTorch {torch_err.max():.3g}, JAX {jax_err.max():.3g}")
    bound = 3 * max(float(torch_err.max()), float32_floor(exact))
    assert jax_err.max() <= bound, f"{name}: JAX {jax_err.max():.3g} from float64, PyTorch {torch_err.max():.3g}"
    assert_picks_agree_or_tie(ours.argmax(-1), ref.argmax(-1), exact, jax_err, torch_err, name)


@pytest.fixture(scope="module")
def exact_long(model_and_tok, long_run) -> dict:
    """Float64 logits of the same model on the long run, where they are needed: each backend's error there.

    Measured at every 8th position, the last 64 (the greedy steps) and wherever the backends differ most
    or pick differently, so the float64 head (the costly part) runs on ~200 positions, not ~1,000."""
    model, _ = model_and_tok
    seq, ref, ours = long_run["seq"], long_run["torch"], long_run["jax"]
    diff = np.abs(ours - ref).max(-1)
    where = set(range(0, len(seq), 8)) | set(range(len(seq) - GREEDY_TOKENS, len(seq)))
    where |= set(np.argsort(diff)[-16:].tolist()) | set(np.flatnonzero(ours.argmax(-1) != ref.argmax(-1)).tolist())
    where = np.array(sorted(where))
    with torch.no_grad(), in_float64(model):
        hidden = model.hidden(torch.tensor([seq]))[0, where]
        exact = torch.cat([model.logits(h) for h in hidden.split(64)]).numpy()
    return {"where": where, "exact": exact, "diff": diff,
            "torch_err": np.abs(ref[where] - exact).max(-1), "jax_err": np.abs(ours[where] - exact).max(-1)}


def assert_picks_agree_or_tie(picks_a, picks_b, exact, err_a, err_b, what: str) -> None:
    """Where two float32 runs pick different tokens, float64 must show the two tied within their errors."""
    for i in np.flatnonzero(np.asarray(picks_a) != np.asarray(picks_b)):
        gap = abs(exact[i, picks_a[i]] - exact[i, picks_b[i]])
        noise = max(err_a[i], err_b[i])
        assert gap <= TIE_FACTOR * noise, (f"{what}: at {i} the picks differ ({picks_a[i]} vs {picks_b[i]}) "
                                           f"with an exact gap of {gap:.3g}, float32 error {noise:.3g}: not a tie")


def test_long_prompt_logits_match_pytorch_to_float32_noise(long_run, exact_long):
    """JAX's float32 is as close to float64 as PyTorch's float32 is: typically and at worst."""
    e = exact_long
    torch_err, jax_err, where = e["torch_err"], e["jax_err"], e["where"]
    print(f"\n[jax parity] long: {len(long_run['seq'])} tokens, max |JAX - PyTorch| = {e['diff'].max():.3g}; "
          f"against float64 at {len(where)} positions: PyTorch max {torch_err.max():.3g} (median "
          f"{np.median(torch_err):.3g}), JAX max {jax_err.max():.3g} (median {np.median(jax_err):.3g})")
    assert len(long_run["prompt"]) > 512 + 32  # past the window
    # A wrong window, RoPE base or mask would put JAX orders of magnitude above float32's own error; summing
    # in another order (XLA against oneDNN, one CPU's kernels against another's) only moves it within it.
    floor = float32_floor(e["exact"])
    assert np.median(jax_err) <= 3 * max(np.median(torch_err), floor), "JAX's typical error is far above float32's"
    # Per position the two errors are not comparable: float32's error has a heavy tail, and which positions
    # land in it depends on the rounding (PyTorch's worst is at token 359, JAX's elsewhere). Its size is.
    assert jax_err.max() <= 3 * max(torch_err.max(), floor), \
        f"JAX's worst error {jax_err.max():.3g} at position {int(where[np.argmax(jax_err)])}, PyTorch's {torch_err.max():.3g}"
    picks = long_run["jax"][where].argmax(-1), long_run["torch"][where].argmax(-1)
    assert_picks_agree_or_tie(*picks, e["exact"], jax_err, torch_err, "argmax")


def test_greedy_past_the_window_identical_to_pytorch(model_and_tok, long_run, exact_long):
    """64 greedy tokens after the 934-token prompt (chunked prefill, then decoding over wrapped rings)."""
    tok = model_and_tok[1]
    n, new = len(long_run["prompt"]), long_run["new"]
    torch_picks = long_run["torch"][n - 1:].argmax(-1).tolist()
    matched = sum(a == b for a, b in zip(new, torch_picks, strict=True))
    print(f"\n[jax parity] greedy: {matched}/{GREEDY_TOKENS} tokens identical to PyTorch's picks "
          f"({tok.decode(new[:12])!r}...)")
    assert len(new) == GREEDY_TOKENS
    rows = np.searchsorted(exact_long["where"], np.arange(n - 1, n - 1 + GREEDY_TOKENS))  # the last 64 measured
    e = exact_long
    assert_picks_agree_or_tie(new, torch_picks, e["exact"][rows], e["jax_err"][rows], e["torch_err"][rows], "greedy")
    assert long_run["jax"][n - 1:].argmax(-1).tolist() == new  # cached decoding = uncached JAX forward


def test_cached_prefill_equals_full_forward(jax_model, long_run):
    """The long prompt through the ring buffers in chunks: next-token logits equal the uncached forward's."""
    from nanogemma.jax.generation import Session

    jm, _ = jax_model
    prompt = long_run["prompt"]
    session = Session(jm, 1, len(prompt) + GREEDY_TOKENS)  # the greedy run's shapes: nothing new to compile
    cached = np.asarray(session.prefill([prompt]))[0]
    diff = float(np.abs(cached - long_run["jax"][len(prompt) - 1]).max())
    print(f"\n[jax cache] {len(prompt)}-token prompt in chunks of {session.chunk}: max |cached - full| = {diff:.3g}")
    assert diff <= 1e-4
