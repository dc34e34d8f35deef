"""`nanogemma inspect`: the figures against the model code itself (parameters, masks, matmul FLOPs)."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from nanogemma.cache import causal_mask
from nanogemma.cli import main
from nanogemma.config import GLOBAL, SLIDING, get_preset
from nanogemma.model import Gemma
from nanogemma.tools.inspect_model import flops_per_token, kv_cache, param_breakdown, report


def test_tiny_breakdown_sums_to_the_models_parameters():
    cfg = get_preset("tiny")
    counts = param_breakdown(cfg)
    assert sum(counts.values()) == sum(p.numel() for p in Gemma(cfg).parameters()) == cfg.num_params
    assert counts["output head"] == 0  # tied


def test_untied_head_is_counted():
    cfg = get_preset("tiny").replace(tie_embeddings=False)
    counts = param_breakdown(cfg)
    assert counts["output head"] == counts["embedding"] == cfg.vocab_size * cfg.hidden_size


def test_270m_figures_match_the_loaded_model(model_and_tok):
    model, _ = model_and_tok
    r = report(model.config, model.state_dict())
    assert r["params"] == {"embedding": 167_772_160, "attention": 29_491_200, "MLP": 70_778_880,
                           "norms": 55_936, "output head": 0}
    assert r["params_total"] == sum(p.numel() for p in model.parameters()) == 268_098_176
    assert r["tied_embeddings"] is True


def test_kv_cache_keeps_the_window_on_sliding_layers():
    cfg = get_preset("gemma3-270m")
    by_type = {c.layer_type: c for c in kv_cache(cfg, 32_768, dtype_bytes=4)}
    assert by_type[SLIDING].bytes_per_token_per_layer == 2 * 1 * 256 * 4  # k and v, one KV head
    assert (by_type[SLIDING].layers, by_type[SLIDING].tokens_kept) == (15, 512)
    assert (by_type[GLOBAL].layers, by_type[GLOBAL].tokens_kept) == (3, 32_768)
    assert by_type[GLOBAL].total_bytes == 3 * 2048 * 32_768
    short = {c.layer_type: c.tokens_kept for c in kv_cache(cfg, 100)}
    assert short == {SLIDING: 100, GLOBAL: 100}  # below the window both keep everything


def test_matmul_flops_match_torch_flop_counter():
    cfg, T = get_preset("tiny"), 32
    model = Gemma(cfg).init_weights(seed=0).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (1, T)))
    f = flops_per_token(cfg, T)["prefill"]
    # The counter sees the linear layers (attention's fused kernel is not counted): weights and head.
    assert counter.get_total_flops() == T * (f["block matmuls"] + f["output head"])


@pytest.mark.parametrize("T", [5, 8, 40])  # below, at and above the tiny window (8)
def test_attention_flops_count_the_keys_the_mask_allows(T):
    cfg = get_preset("tiny")
    pos = torch.arange(T)[None]
    keys = {t: causal_mask(pos, pos, cfg.sliding_window if t == SLIDING else None)[0, 0] for t in (SLIDING, GLOBAL)}
    per_key = 4 * cfg.num_heads * cfg.head_dim
    prefill = sum(per_key * keys[t].sum().item() / T for t in cfg.layer_types)
    decode = sum(per_key * keys[t][-1].sum().item() for t in cfg.layer_types)
    f = flops_per_token(cfg, T)
    assert f["prefill"]["attention (q·k, p·v)"] == pytest.approx(prefill)
    assert f["decode"]["attention (q·k, p·v)"] == pytest.approx(decode)


def test_cli_inspect_prints_tables_and_json(capsys):
    assert main(["inspect", "--model", "gemma3-27b", "--context", "8192", "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    for heading in ("Config", "Parameters", "KV cache (bfloat16) at a context of 8,192 tokens", "FLOPs per token"):
        assert heading in out
    assert main(["inspect", "--model", "tiny", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["params_total"] == get_preset("tiny").num_params


def test_cli_inspect_default_model(capsys):
    assert main(["inspect"]) == 0
    out = capsys.readouterr().out
    assert "268,098,176" in out and "167,772,160" in out and "tied" in out


def test_cli_inspect_rejects_bad_context(capsys):
    with pytest.raises(SystemExit) as stop:  # a flag's value out of range: a one-line usage error, exit 2
        main(["inspect", "--model", "tiny", "--context", "0"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("nanogemma: error: argument --context: must be at least 1") and err.count("\n") == 1


@pytest.mark.parametrize("context", [100, 4096, 32_768])
def test_kv_total_matches_the_cache_module(context):
    from nanogemma.cache import cache_size

    cfg = get_preset("gemma3-270m")
    r = report(cfg, context=context)
    size = cache_size(cfg, context, torch.float32)
    assert (r["kv_bytes_total"], r["kv_bytes_if_all_global"]) == (size.ours, size.full)
