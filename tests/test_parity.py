"""The official 270M weights: nanogemma against transformers on the same GGUF file, float32.

Figures measured here are printed (run with `-s` to see them) and carried in the assertion messages.
"""

from __future__ import annotations

import pytest
import torch
from texts import PROMPTS  # tests/ is on sys.path (pytest's rootdir import mode)

from nanogemma.weights import hf_state_dict


def test_weights_equal_reference(model_and_tok, ref_model):
    model, _ = model_and_tok
    ref = ref_model.state_dict()
    ours = hf_state_dict(model.state_dict())
    assert set(ours) == {k for k in ref if k != "lm_head.weight"}
    worst = max((ours[k] - ref[k]).abs().max().item() for k in ours)
    assert worst == 0.0, f"dequantised weights differ from transformers' by {worst}"


@pytest.mark.parametrize("name", list(PROMPTS))
def test_logits_match_reference(model_and_tok, ref_model, ref_tokenizer, name):
    model, tok = model_and_tok
    ids = tok.encode(PROMPTS[name])
    assert ids == ref_tokenizer(PROMPTS[name]).input_ids
    if name == "long":
        assert len(ids) > 600
    x = torch.tensor([ids])
    with torch.no_grad():
        ours, ref = model(x), ref_model(x).logits
    diff = (ours - ref).abs().max().item()
    print(f"\n[parity] {name}: {len(ids)} tokens, max |logit diff| = {diff:.3g}")
    assert diff <= 1e-3, f"{name} ({len(ids)} tokens): max |logit diff| {diff}"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_greedy_generation_matches_reference(model_and_tok, ref_model, ref_tokenizer):
    import nanogemma

    model, tok = model_and_tok
    prompt = "Once upon a time, in a small village by the sea,"
    ids = ref_tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        ref_out = ref_model.generate(ids, max_new_tokens=64, do_sample=False, min_new_tokens=64)
    ref_new = ref_out[0, ids.shape[1]:].tolist()
    from nanogemma.generation import generate_ids

    ours_new = list(generate_ids(model, ids[0].tolist(), max_new_tokens=64))
    matched = sum(a == b for a, b in zip(ours_new, ref_new, strict=False))
    print(f"\n[parity] greedy: {matched}/64 tokens identical")
    assert ours_new == ref_new, f"greedy tokens: {matched}/64 identical"
    assert tok.decode(ours_new) == ref_tokenizer.decode(ref_new)
    # The public entry point, text in and text out, gives the same continuation.
    text = nanogemma.generate(model, tok, prompt, max_new_tokens=16)
    assert ref_tokenizer.decode(ref_new).startswith(text) and len(text) > 20
