"""`nanogemma verify`: passes on the real 270M weights, points at the broken place in a broken model, and
works on every format nanogemma loads (GGUF here; Hugging Face and run folders with small random models)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from nanogemma.cli import main
from nanogemma.config import get_preset, to_hf_config
from nanogemma.model import Gemma
from nanogemma.tools import verify as verify_mod
from nanogemma.tools.verify import Report, Row, compare, site_names
from nanogemma.weights import hf_state_dict


@pytest.fixture
def use_loaded(monkeypatch, model_and_tok, ref_model):
    """Make `nanogemma verify` reuse the session's models instead of loading them again (~40 s)."""
    model, tok = model_and_tok
    monkeypatch.setattr(verify_mod, "load_pair", lambda *a, **k: (model, tok.encode, ref_model))
    return model


def test_verify_passes_on_the_real_270m_model(use_loaded, capsys):
    assert main(["verify"]) == 0  # default: past the 512-token window, so sliding layers drop keys
    out = capsys.readouterr().out
    assert "544 tokens" in out and "PASS" in out and "DIVERGENCE" not in out
    assert "layer 17 MLP" in out and "logits" in out


def test_verify_points_at_a_broken_mlp(use_loaded, capsys):
    w = use_loaded.layers[7].mlp.gate.weight
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w.add_(0.01 * saved.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
        assert main(["verify", "--tokens", "48"]) == 1
    finally:
        with torch.no_grad():
            w.copy_(saved)
    out = capsys.readouterr().out
    flagged = [line for line in out.splitlines() if "FIRST DIVERGENCE" in line]
    assert len(flagged) == 1 and flagged[0].startswith("layer 7 MLP")
    assert "FAIL: first divergence at 'layer 7 MLP'" in out
    before = out.split("layer 7 MLP")[0].splitlines()[-16:]  # rows up to layer 7's attention are exact
    assert all(line.split()[-1] == "0.00e+00" for line in before if line.startswith(("layer", "embedding")))


def test_first_divergence_and_nan_are_flagged():
    names = site_names(("sliding", "global"))
    ref = {n: torch.ones(1, 3, 4) for n in names}
    ours = {n: t.clone() for n, t in ref.items()}
    ours["layer 1 attention (global)"][0, 0, 0] = float("nan")
    ours["final norm"] += 1
    report = compare(ours, ref, names, tolerance=1e-4)
    assert not report.passed and report.first_divergence.name == "layer 1 attention (global)"
    assert Report([Row("x", 0.0, 0.0)], 1e-4, 1, 1.0).passed  # all-zero activations: no division by zero


def _random_small_model(seed: int = 0) -> Gemma:
    # The real tokenizer's vocabulary, so its ids fit; everything else tiny (window 8 < the 40-token input).
    cfg = get_preset("tiny").replace(vocab_size=262_144)
    model = Gemma(cfg).init_weights(seed=seed)
    with torch.no_grad():  # non-zero norm weights, so a mix-up of w and 1 + w would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    return model


@pytest.mark.parametrize("fmt", ["run", "hf", "run without tokenizer"])
def test_verify_other_formats(fmt, tmp_path, model_and_tok, capsys):
    _, tok = model_and_tok
    model = _random_small_model()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if fmt.startswith("run"):
        (tmp_path / "nanogemma.json").write_text(json.dumps({"model": model.config.to_dict()}))
        save_file(state, str(tmp_path / "model.safetensors"))
    else:
        (tmp_path / "config.json").write_text(json.dumps(to_hf_config(model.config)))
        save_file(hf_state_dict(state), str(tmp_path / "model.safetensors"))
    if fmt != "run without tokenizer":
        tok.save(tmp_path)
    assert main(["verify", "--model", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    # The default paragraph is longer than window + 32 (40 here); without a tokenizer, 64 random ids.
    assert ("64 random token ids" if fmt == "run without tokenizer" else "58 tokens") in out and "PASS" in out
