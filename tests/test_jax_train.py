"""JAX training against the PyTorch trainer: same losses step for step, checkpoints and resumes that cross over.

Both backends run `nanogemma train`'s own settings on the same prepared data: the PyTorch side is the
trainer itself (`nanogemma.train.train`), not a re-implementation, so the comparison covers its loss,
warmup + cosine schedule, gradient accumulation, clipping, AdamW with decay on matrices only, and the
order in which it draws windows. The JAX run starts from the same initial weights (PyTorch's initialiser,
same seed) and draws the same windows, so the losses agree to float32 rounding.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nanogemma.data import prepare
from nanogemma.jax.load import load_params
from nanogemma.jax.loop import train as jax_train
from nanogemma.train import resolve
from nanogemma.train import train as torch_train

STEPS = 5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("jax-train") / "data"
    prepare("synthetic:400", out, tokenizer="bpe:300", workers=1, val_fraction=0.1)
    return out


def settings(data, out, **changes):
    """A tiny run whose every step accumulates two micro-batches and is clipped (grad_clip below the norms)."""
    flags = dict(data=str(data), out_dir=str(out), preset="tiny", max_steps=STEPS, warmup_steps=3, grad_accum=2,
                 batch_size=4, seq_len=32, grad_clip=0.5, eval_every=0, eval_batches=1, sample_tokens=0,
                 progress=False, tensorboard=False, device="cpu", dtype="float32")
    return resolve({**flags, **changes})


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {"torch": torch_train(settings(data, root / "torch")), "jax": jax_train(settings(data, root / "jax"))}


def metrics(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def test_five_steps_match_the_pytorch_loop(runs):
    t, j = runs["torch"].losses, runs["jax"].losses
    diff = float(np.abs(np.array(t) - np.array(j)).max())
    print(f"\n[jax train] {STEPS} steps: PyTorch losses {np.round(t, 5).tolist()}, max |JAX - PyTorch| = {diff:.2g}; "
          f"val loss {runs['torch'].val_loss:.6f} vs {runs['jax'].val_loss:.6f}")
    assert len(t) == len(j) == STEPS
    assert diff <= 1e-4, f"losses differ by {diff}"
    assert abs(runs["torch"].val_loss - runs["jax"].val_loss) <= 1e-4
    # The settings exercised what they claim: clipping was active (the logged norm is before clipping).
    norms = [r["grad_norm"] for r in metrics(runs["jax"].run_dir)]
    assert max(norms) > 0.5
    assert t[-1] < t[0]  # and the model learned something


def test_checkpoints_cross_over(runs):
    """PyTorch loads the JAX run folder as a model (weights + tokenizer); JAX loads the PyTorch one."""
    import nanogemma

    jax_dir, torch_dir = runs["jax"].run_dir, runs["torch"].run_dir
    model, tok = nanogemma.load(jax_dir)
    assert tok.encode("Once upon a time")
    _, jax_params, _ = load_params(jax_dir)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), np.asarray(jax_params[k]), err_msg=k)
    torch_model, _ = nanogemma.load(torch_dir)
    _, from_torch, _ = load_params(torch_dir)
    worst = max(float(np.abs(np.asarray(from_torch[k]) - v.numpy()).max()) for k, v in torch_model.state_dict().items())
    assert worst == 0.0
    # The two runs' final weights are the same up to float32 rounding amplified by Adam over five steps.
    assert max(float(np.abs(np.asarray(jax_params[k]) - np.asarray(from_torch[k])).max()) for k in jax_params) < 1e-3
    meta = json.loads((jax_dir / "nanogemma.json").read_text())
    assert meta["step"] == STEPS and meta["format"] == "nanogemma-run"


@pytest.mark.parametrize("first,second", [("torch", "jax"), ("jax", "torch")])
def test_resume_across_backends(runs, data, tmp_path, first, second):
    """Three steps with one backend, then --resume with the other: the last two losses of a straight run.

    warmup_steps = 3, so the first three steps' learning rates do not depend on max_steps, which the resumed
    run raises from 3 to 5 with the decay end moved to 5 (as a user extending a run would: --decay-steps).
    """
    train = {"torch": torch_train, "jax": jax_train}
    out = tmp_path / "run"
    train[first](settings(data, out, max_steps=3))
    resumed = train[second](settings(data, out, max_steps=STEPS, decay_steps=STEPS, resume=True))
    straight = runs["torch"].losses[3:]
    diff = float(np.abs(np.array(resumed.losses) - np.array(straight)).max())
    print(f"\n[jax train] {first} 3 steps -> {second} --resume to {STEPS}: max |loss - straight run| = {diff:.2g}")
    assert resumed.step == STEPS and len(resumed.losses) == 2
    assert diff <= 1e-4
    state = torch.load(out / "last" / "trainer.pt", weights_only=True)
    assert state["step"] == STEPS and set(state["optimizer"]["state"]) == set(load_params(out)[1])


def test_cli_backend_jax(data, tmp_path, capsys):
    """`nanogemma train --backend jax` writes a run that `nanogemma generate --backend jax` continues."""
    from nanogemma.cli import main

    out = tmp_path / "cli-run"
    args = ["train", "--backend", "jax", "--data", str(data), "--out-dir", str(out), "--preset", "tiny",
            "--max-steps", "2", "--warmup-steps", "1", "--batch-size", "4", "--seq-len", "32", "--grad-accum", "2",
            "--grad-clip", "0.5", "--eval-batches", "1", "--sample-tokens", "0", "--progress", "false",
            "--tensorboard", "false", "--device", "cpu", "--dtype", "float32"]
    assert main(args) == 0
    assert "done: 2 steps" in capsys.readouterr().out
    assert main(["generate", "--backend", "jax", "--model", str(out), "--max-new-tokens", "6", "--jsonl",
                 "Once upon a time", "The cat"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["Once upon a time", "The cat"]
    assert main(["generate", "--backend", "jax", "--model", str(out), "--quantize", "int8", "x"]) == 1
    assert "nanogemma: error: --quantize is a PyTorch feature" in capsys.readouterr().err


def test_gemma_tokenized_data_gives_both_loops_the_same_windows(gguf_path, tmp_path):
    """On Gemma-tokenized data every training window starts with <bos> and validation windows start at a
    document's <bos>, in both backends (the JAX loop once passed the end-of-text id and no <bos>)."""
    data = tmp_path / "data"
    prepare("synthetic:60", data, tokenizer="gemma", workers=1, val_fraction=0.2)
    flags = dict(max_steps=2, warmup_steps=1, grad_accum=1, batch_size=2, seq_len=16)
    t = torch_train(settings(data, tmp_path / "torch", **flags))
    j = jax_train(settings(data, tmp_path / "jax", **flags))
    assert len(t.losses) == len(j.losses) == 2
    assert float(np.abs(np.array(t.losses) - np.array(j.losses)).max()) <= 1e-4
    assert abs(t.val_loss - j.val_loss) <= 1e-4


def test_activation_checkpointing_is_refused_in_one_line(data, tmp_path):
    from nanogemma.errors import NanogemmaError

    with pytest.raises(NanogemmaError, match="drop --activation-checkpointing"):
        jax_train(settings(data, tmp_path / "run", activation_checkpointing=True))
    assert not (tmp_path / "run").exists()  # refused before the run folder is made
