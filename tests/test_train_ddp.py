"""Scale-out on CPU: torchrun with 2 gloo processes against 1 process with doubled gradient accumulation.

Both see exactly the same windows (the sampler draws a whole step's offsets from one seeded generator and
each process takes its share), so the loss curves differ only by the order of float additions in the
gradient all-reduce. Stated tolerance: 1e-4 nats on every step's loss over 8 steps (observed: ~1e-6).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanogemma.config import get_preset, to_hf_config
from nanogemma.data import prepare
from nanogemma.model import Gemma
from nanogemma.train import resolve, train
from nanogemma.weights import hf_state_dict

TOLERANCE = 1e-4
COMMON = {"preset": "tiny", "progress": False, "tensorboard": False, "sample_tokens": 0, "log_every": 1,
          "batch_size": 4, "eval_every": 4, "warmup_steps": 0, "lr": 3e-3, "min_lr": 3e-3}  # constant lr


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.getbasetemp() / "train-synthetic-bpe320"
    prepare("synthetic:400", folder, tokenizer="bpe:320", workers=1, progress=False)
    return folder


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """One process, grad_accum 2: the curve two processes with grad_accum 1 must reproduce."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("ref") / "run"
    r = train(resolve({"data": str(data), "out_dir": str(out), **COMMON, "grad_accum": 2, "max_steps": 8}))
    return r, out


def torchrun(*flags: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone` (a free rendezvous port); its own session, so a hang kills every worker."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "nanogemma", "train", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun did not finish in 240 s: {err[-3000:]}")
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def flags(data, out, **settings) -> list[str]:
    merged = {**COMMON, "data": str(data), "out_dir": str(out), "device": "cpu", **settings}
    return [f"--{k.replace('_', '-')}={v}" for k, v in merged.items()]


def losses(out, kind="train", key="loss"):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if r["kind"] == kind]


def test_ddp_two_processes_equal_one_with_doubled_accumulation(data, reference, tmp_path):
    ref, ref_out = reference
    out = tmp_path / "ddp"
    p = torchrun(*flags(data, out, grad_accum=1, max_steps=8))
    assert "2 processes (DDP)" in p.stderr
    got = losses(out)
    assert len(got) == 8
    worst = max(abs(a - b) for a, b in zip(got, ref.losses, strict=True))
    print(f"DDP vs 1 process: largest loss difference over 8 steps {worst:.2e}")
    assert worst <= TOLERANCE
    assert losses(out, "eval", "val_loss") == pytest.approx(losses(ref_out, "eval", "val_loss"), abs=TOLERANCE)
    assert json.loads((out / "last" / "nanogemma.json").read_text())["step"] == 8


def test_fsdp2_with_resume_equals_one_process(data, reference, tmp_path):
    """FSDP2 for 4 steps, then resumed (sharded optimizer state gathered, saved, re-sharded) for 4 more; the
    first 4 with activation checkpointing (the blocks' weights gathered again for the recomputation)."""
    ref, _ = reference
    out = tmp_path / "fsdp"
    p = torchrun(*flags(data, out, grad_accum=1, max_steps=4, fsdp="true", activation_checkpointing="true"))
    assert "2 processes (FSDP2), recomputing activations in backward" in p.stderr
    torchrun("--resume", f"--out-dir={out}", "--max-steps=8", "--decay-steps=8", "--progress=false",
             "--activation-checkpointing=false")
    got = losses(out)
    assert len(got) == 8
    worst = max(abs(a - b) for a, b in zip(got, ref.losses, strict=True))
    print(f"FSDP2 (resumed at step 4) vs 1 process: largest loss difference over 8 steps {worst:.2e}")
    assert worst <= TOLERANCE


def test_ddp_lora_two_processes_equal_one_with_doubled_accumulation(data, tmp_path):
    """LoRA over an int8 base under DDP: only the adapters' gradients are averaged; the curve is one process's
    (the two processes recompute their blocks' activations in backward: the same curve again)."""
    base = tmp_path / "base"
    base.mkdir()
    cfg = get_preset("tiny").replace(vocab_size=320)
    (base / "config.json").write_text(json.dumps(to_hf_config(cfg)))
    save_file({k: v.contiguous() for k, v in hf_state_dict(Gemma(cfg).init_weights(seed=0).state_dict()).items()},
              str(base / "model.safetensors"))
    lora = {"init_from": str(base), "lora_rank": 4, "lora_base_dtype": "int8", "max_steps": 4, "lr": 1e-2,
            "min_lr": 1e-2}
    torch.set_num_threads(1)
    ref = train(resolve({"data": str(data), "out_dir": str(tmp_path / "one"), **COMMON, **lora, "grad_accum": 2}))
    out = tmp_path / "ddp"
    p = torchrun(*flags(data, out, grad_accum=1, activation_checkpointing="true", **lora))
    assert "2 processes (DDP), recomputing activations in backward" in p.stderr and "LoRA rank 4" in p.stderr
    worst = max(abs(a - b) for a, b in zip(losses(out), ref.losses, strict=True))
    print(f"LoRA DDP vs 1 process: largest loss difference over 4 steps {worst:.2e}")
    assert worst <= TOLERANCE
    assert all(k.endswith(("lora_A", "lora_B")) for k in load_file(str(out / "last" / "model.safetensors")))
