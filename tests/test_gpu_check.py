"""bench/gpu_check.py, the check that waits for a GPU machine: its logic, run here on the CPU with tiny shapes."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import load_bench

from nanogemma.config import get_preset

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gpu_check():
    return load_bench("gpu_check")


def test_quick_run_checks_every_path_and_writes_one_report(gpu_check, tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--device", "cpu", "--quick", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert not list(tmp_path.glob("*.tmp"))  # written whole, then renamed
    assert report["ok"] and report["device"] == "cpu" and report["skipped"] == {"train_compiled": "--quick"}
    assert set(report["parity"]) == {"float32_logits", "greedy_cached", "compiled_decode", "bfloat16_logits",
                                     "train_step", "engine"}
    assert all(r["ok"] for r in report["parity"].values())
    # On the CPU the "device" is the CPU itself: the same kernels, so the same tokens by construction.
    assert report["parity"]["greedy_cached"]["same_tokens"] and report["parity"]["engine"]["same_tokens"]
    decode = report["decode"]
    assert [(r["shape"], r["mode"]) for r in decode["rows"]] == [("tiny", "eager"), ("tiny", "compiled")]
    for r in decode["rows"]:
        assert r["tokens_per_s"] > 0 and r["bytes_per_step"] > 0 and r["mbu_nominal"] is None  # no card name
        assert r["mbu_measured"] == pytest.approx(r["bytes_per_step"] * r["tokens_per_s"]
                                                  / (decode["measured_bandwidth_gb_s"] * 1e9))
    assert [r["batch"] for r in report["batch"]] == [1, 4] and all(r["tokens_per_s"] > 0 for r in report["batch"])
    train = report["train"]
    assert train["ours_tokens_per_s"] > 0 and train["hf_tokens_per_s"] > 0 and train["max_loss_diff"] < 1e-3
    assert report["engine"]["new_tokens"] == 6 * 12 and report["engine"]["tokens_per_s"] > 0
    table = capsys.readouterr().out
    assert "| parity: engine | ok (same tokens) |" in table and "| decode tiny compiled batch 1 |" in table
    assert "| train_compiled | skipped: --quick |" in table


def test_sections_past_the_deadline_are_recorded_as_skipped(gpu_check):
    rows = gpu_check.decode_section({"tiny": get_preset("tiny")}, torch.device("cpu"), torch.float32, "eager",
                                    8, 4, gpu_check.Deadline(0))["rows"]
    assert rows == [{"shape": "tiny", "mode": m, "skipped": "out of time"} for m in ("eager", "compiled")]


def test_bytes_per_step_and_bandwidth_table(gpu_check, monkeypatch):
    cfg = get_preset("gemma3-270m")  # 15 sliding layers (window 512), 3 global; 1 kv head of 256
    per_entry = 2 * 1 * 256 * 2  # k and v, bfloat16
    assert gpu_check.kv_bytes_per_token(cfg, 100, torch.bfloat16) == per_entry * 100 * 18
    assert gpu_check.kv_bytes_per_token(cfg, 2000, torch.bfloat16) == per_entry * (15 * 512 + 3 * 2000)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda _d=None: "NVIDIA H200")
    assert gpu_check.nominal_bandwidth(torch.device("cuda")) == 4.8e12
    assert gpu_check.nominal_bandwidth(torch.device("cpu")) is None


def test_without_cuda_it_says_so(gpu_check, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--device", "cuda"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
