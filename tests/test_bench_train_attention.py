"""bench/bench_train_attention.py --whole-model: its logic, on the tiny shape (the 270M measurement is the
lead's, on a quiet machine). Timings are never asserted.

The dense route must be the model it claims to be: the same loss and gradients as attention.py's kernels,
each within 64 float32 steps (`reference.float32_floor`) of the float64 reference of the same model and batch
— the bound of every float32-vs-float64 comparison here; a wrong mask, window or routing is off by orders
of magnitude more. And it must really be taken: one (1, 1, T, T) mask per layer kind per forward.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import load_bench
from reference import float32_floor

import nanogemma.model
from nanogemma.attention import attend
from nanogemma.train.loss import LanguageModelLoss

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "bench_train_attention.py"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench():
    return load_bench("bench_train_attention")


def test_dense_route_is_the_same_model_and_is_taken(bench):
    T = 256  # tiny: window 8, so the sliding layers' kernels cut 2 query blocks; the global layer is causal SDPA
    model, fused = bench.training_model(T, quick=True)
    assert {"sliding", "global"} <= set(model.config.layer_types)
    x, y = bench.batch(T, model.config.vocab_size)
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(loss_fn):
        loss = loss_fn(model, x, y)
        return loss.detach().double(), torch.cat([g.flatten().double() for g in torch.autograd.grad(loss, params)])

    new = loss_and_grads(fused)
    with bench.dense_attention() as built:
        dense = loss_and_grads(fused)
    assert built == [(1, 1, T, T)] * 2  # one mask per kind, for the whole forward
    assert nanogemma.model.attend is attend  # the model is given back as it was
    model.double()
    exact = loss_and_grads(LanguageModelLoss(model, fused=False))
    for loss, grads in (new, dense):
        assert abs(loss - exact[0]) <= float32_floor(exact[0].item())
        assert (grads - exact[1]).abs().max() <= float32_floor(exact[1].numpy())


def test_whole_model_quick_run_prints_and_writes_both_paths(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--whole-model", "--quick", "--lengths", "160",
                           "--repeats", "1", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert [(r["path"], r["T"], r["shape"]) for r in rows] == [("dense", 160, "tiny"), ("new", 160, "tiny")]
    assert all(r["seconds"] > 0 and r["peak_mib_over_model"] >= 0 and len(r["losses"]) == 1 for r in rows)
    assert abs(rows[0]["losses"][0] - rows[1]["losses"][0]) <= 1e-4 * rows[0]["losses"][0]
    for needle in ("T=  160 dense:", "T=  160   new:", "new / dense: time"):
        assert needle in proc.stdout, proc.stdout
