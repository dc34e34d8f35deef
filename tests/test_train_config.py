"""Training settings, schedule and data sampling: the parts of `nanogemma train` that need no model."""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest

from nanogemma import cli
from nanogemma.errors import NanogemmaError
from nanogemma.train.config import (
    FIELDS,
    PRESETS_TRAIN,
    TrainConfig,
    model_config,
    read_toml,
    resolve,
    to_toml,
)
from nanogemma.train.data import WindowSampler, validation_offsets
from nanogemma.train.monitor import train_flops_per_token
from nanogemma.train.schedule import WarmupCosine


def test_help_lists_every_setting_with_its_default(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for name in FIELDS:
        flag = "--" + name.replace("_", "-")
        assert flag in text, flag
    assert text.count("(default: ") >= len(FIELDS)
    for preset in PRESETS_TRAIN:
        assert f"{preset}:" in text


def test_layers_defaults_preset_file_flags(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('preset = "tiny"\n[optim]\nlr = 0.01\nmax_steps = 7\n[model]\ntie_embeddings = false\n')
    cfg = resolve({"data": "d", "max_steps": "9", "grad_accum": "2"}, toml)
    assert cfg.model == "tiny" and cfg.seq_len == 64  # from the preset
    assert cfg.lr == 0.01 and cfg.tie_embeddings is False  # from the file
    assert cfg.max_steps == 9 and cfg.grad_accum == 2  # flags win
    assert cfg.out_dir == "runs/d"
    again = resolve({"data": "d"}, _write(tmp_path / "again.toml", to_toml(cfg)))
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)


def _write(path, text):
    path.write_text(text)
    return path


def test_cli_flags_both_spellings_and_booleans(monkeypatch):
    seen = {}
    monkeypatch.setattr("nanogemma.train.loop.train", lambda cfg: seen.setdefault("cfg", cfg) and None)
    args = cli.build_parser().parse_args(["train", "--data=x", "--max_steps=5", "--compile", "--progress=false",
                                          "--lr", "2e-3", "--hidden-size=96"])
    flags = {k: v for k, v in vars(args).items() if k in FIELDS}
    cfg = resolve(flags)
    assert (cfg.max_steps, cfg.compile, cfg.progress, cfg.lr, cfg.hidden_size) == (5, True, False, 2e-3, 96)


@pytest.mark.parametrize("changes, message", [
    ({"lrr": 1}, "unknown training setting 'lrr' (did you mean lr?)"),
    ({"max_steps": "many"}, "max_steps wants a whole number, got 'many'"),
    ({"seq_len": 0}, "seq_len must be at least 1"),
    ({"min_lr": 1.0}, "above lr"),
    ({"dtype": "float8"}, "dtype must be"),
    ({"preset": "huge"}, "unknown preset 'huge'"),
    ({"model": "medium"}, "unknown model shape 'medium'"),
])
def test_bad_settings_are_one_line_errors(changes, message):
    with pytest.raises(NanogemmaError, match=re.escape(message)):
        resolve({"data": "d", **changes})


def test_bad_toml(tmp_path):
    bad = _write(tmp_path / "bad.toml", "lr = = 3")
    with pytest.raises(NanogemmaError, match="not valid TOML"):
        read_toml(bad)
    with pytest.raises(NanogemmaError, match="config file not found"):
        read_toml(tmp_path / "missing.toml")


def test_model_config_takes_the_datas_vocabulary():
    cfg = model_config(TrainConfig(model="small", vocab_multiple=64), 50257)
    assert cfg.vocab_size == 50304 and cfg.tie_embeddings
    m = model_config(TrainConfig(model="gemma3-270m", num_layers=3, tie_embeddings=False), 320)
    assert (m.vocab_size, m.num_layers, len(m.layer_types), m.tie_embeddings, m.hidden_size) == (320, 3, 3, False, 640)


def test_warmup_and_cosine_count_optimizer_steps():
    s = WarmupCosine(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0)  # warmup ends after 10 optimizer steps
    assert s(10) == pytest.approx(1.0) and s(60) == pytest.approx(0.55) and s(110) == pytest.approx(0.1)
    assert s(500) == pytest.approx(0.1)
    lrs = [s(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    assert WarmupCosine(1.0, 0.0, 0, 10)(0) == 1.0


def test_sampler_is_a_function_of_seed_and_step():
    a, b = WindowSampler(10_000, 64, seed=3), WindowSampler(10_000, 64, seed=3)
    assert np.array_equal(a.offsets(7, 32), b.offsets(7, 32))
    assert not np.array_equal(a.offsets(7, 32), a.offsets(8, 32))
    # a step's draw for 2 processes x 4 micro-batches is the draw for 1 process x 8
    assert np.array_equal(a.offsets(5, 8 * 4).reshape(8, 4)[4:], a.offsets(5, 32)[16:].reshape(4, 4))
    many = a.offsets(0, 100_000)
    assert many.min() >= 0 and many.max() == 10_000 - 65 and many.dtype == np.int64
    big = WindowSampler(10**12, 1024, seed=0)  # no index of all offsets: a trillion tokens cost nothing
    assert big.offsets(0, 4).max() < 10**12


def test_validation_windows_start_at_document_boundaries():
    tokens = np.array(([5] * 30 + [0]) * 20, dtype=np.uint16)  # documents of 30 tokens, then eot 0
    offs = validation_offsets(tokens, 16, 8, start_id=0)
    assert len(offs) == 8 and all(tokens[o] == 0 for o in offs) and len(set(offs.tolist())) == 8
    assert np.array_equal(offs, validation_offsets(tokens, 16, 8, start_id=0))  # fixed
    spread = validation_offsets(tokens, 16, 64, start_id=0)  # more windows than documents: evenly spread
    assert len(spread) == 64 and spread.max() <= len(tokens) - 17


def test_flops_per_token():
    cfg = model_config(TrainConfig(model="small"), 320)
    f = train_flops_per_token(cfg, 256)
    params = sum(cfg.hidden_size * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
                 + 3 * cfg.hidden_size * cfg.intermediate_size for _ in range(cfg.num_layers))
    assert 6 * (params + 320 * cfg.hidden_size) < f < 6 * (params + 320 * cfg.hidden_size) * 1.5
    assert math.isfinite(f)


def test_example_configs_resolve():
    from pathlib import Path

    files = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))
    assert files
    for f in files:
        cfg = resolve({}, f)
        assert cfg.data and cfg.out_dir, f


def test_tensorboard_when_installed(tmp_path, monkeypatch):
    """tensorboard is optional (not installed here): with a stand-in module, scalars and samples reach it."""
    import sys
    import types

    from nanogemma.train.monitor import Monitor

    calls = []

    class Writer:
        def __init__(self, folder):
            calls.append(("init", folder))

        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def add_text(self, tag, text, step):
            calls.append((tag, text, step))

        def close(self):
            calls.append(("close",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    m = Monitor(tmp_path, enabled=True, total_steps=10, start_step=0, progress=False, tensorboard=True)
    m.record("train", 3, loss=1.5, lr=1e-3, mfu=None)
    m.record("eval", 3, val_loss=1.2, sample="Once")
    m.close()
    assert ("train/loss", 1.5, 3) in calls and ("eval/val_loss", 1.2, 3) in calls and ("sample", "Once", 3) in calls
    assert not any(c[0] == "train/mfu" for c in calls) and calls[-1] == ("close",)
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 2


def test_mfu_needs_a_known_peak():
    import torch

    from nanogemma.train.monitor import peak_flops

    assert peak_flops(torch.device("cpu"), torch.bfloat16) is None
    assert peak_flops(torch.device("cpu"), torch.float32, override_tflops=2.0) == 2e12
