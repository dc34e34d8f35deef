"""The official 270M weights: the JAX model against the PyTorch model, float32, on the same GGUF.

Figures are printed (run with `-s`) and carried in the assertion messages. The prompts are those of
test_parity.py; the long one (934 tokens) runs past the 512-token sliding window, so the sliding layers
really drop keys, in the full forward, in the chunked prefill and while decoding.

**One ill-conditioned position.** At token 359 of the long prompt, float32 itself cannot do better than
~5e-3: PyTorch's own float32 logits there are 5.3e-3 from a float64 run of the same model (the error grows
by four orders of magnitude through blocks 3-7), everywhere else < 1e-3. Two float32 implementations that
sum in different orders (oneDNN and XLA's matmuls) cannot agree closer than that noise, so the 1e-3 bound
is checked at every position where PyTorch's float32 is itself within 1e-3 of float64; at the others JAX
must be about as close to float64 as PyTorch is.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_parity import PROMPTS

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
    print(f"\n[jax parity] {name}: {n} tokens, max |logit diff| vs PyTorch = {diff:.3g}")
    assert diff <= 1e-3, f"{name} ({n} tokens): max |logit diff| {diff}"
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_long_prompt_logits_match_pytorch_to_float32_noise(model_and_tok, long_run):
    model, _ = model_and_tok
    seq, ref, ours = long_run["seq"], long_run["torch"], long_run["jax"]
    diff = np.abs(ours - ref).max(-1)
    suspect = np.flatnonzero(diff > 1e-3)
    torch_err = jax_err = np.zeros(0)
    if 0 < len(suspect) <= 3:
        # Where the backends disagree by more than 1e-3, measure float32's own error against float64 (causal:
        # the prefix ending at that position is enough, and only its last logits are needed).
        try:
            with torch.no_grad():
                model.double()
                exact = np.stack([model(torch.tensor([seq[:p + 1]]), last_only=True)[0, -1].double().numpy()
                                  for p in suspect])
        finally:
            model.float()  # float32 -> float64 -> float32 is exact: the shared model is unchanged
        torch_err, jax_err = np.abs(ref[suspect] - exact).max(-1), np.abs(ours[suspect] - exact).max(-1)
    assert len(suspect) <= 3, f"{len(suspect)} positions differ by more than 1e-3 (worst {diff.max():.3g})"
    sound = np.ones(len(seq), bool)
    sound[suspect[torch_err > 1e-3]] = False  # positions where float32 itself is off by more than 1e-3
    print(f"\n[jax parity] long: {len(seq)} tokens, max |logit diff| vs PyTorch = {diff[sound].max():.3g} over the "
          f"{sound.sum()} well-conditioned positions; overall {diff.max():.3g} at position {int(diff.argmax())}"
          + "".join(f"; at {p}: PyTorch float32 is {t:.3g} from float64, JAX {j:.3g}"
                    for p, t, j in zip(suspect, torch_err, jax_err, strict=True)))
    assert len(long_run["prompt"]) > 512 + 32  # past the window
    assert (~sound).sum() <= 3, "float32 should be ill-conditioned at a handful of positions at most"
    assert diff[sound].max() <= 1e-3, f"max |logit diff| {diff[sound].max()} at a well-conditioned position"
    assert (jax_err <= 3 * np.maximum(torch_err, 1e-3)).all(), "JAX far worse than PyTorch's float32 somewhere"
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_greedy_past_the_window_identical_to_pytorch(model_and_tok, long_run):
    """64 greedy tokens after the 934-token prompt (chunked prefill, then decoding over wrapped rings)."""
    tok = model_and_tok[1]
    n, new = len(long_run["prompt"]), long_run["new"]
    torch_picks = long_run["torch"][n - 1:].argmax(-1).tolist()
    matched = sum(a == b for a, b in zip(new, torch_picks, strict=True))
    print(f"\n[jax parity] greedy: {matched}/{GREEDY_TOKENS} tokens identical to PyTorch's picks "
          f"({tok.decode(new[:12])!r}...)")
    assert len(new) == GREEDY_TOKENS and new == torch_picks, f"greedy tokens: {matched}/{GREEDY_TOKENS} identical"
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
