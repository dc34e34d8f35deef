"""The training loop on CPU with the tiny model: it learns, resumes exactly, stops cleanly on Ctrl-C and NaN.

Runs use one intra-op thread: on a shared 2-core machine, two OpenMP threads fighting other processes are
several times slower than one.
"""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch

from nanogemma.data import prepare
from nanogemma.errors import NanogemmaError
from nanogemma.train import resolve, train
from nanogemma.train import step as step_mod

FAST = {"preset": "tiny", "progress": False, "tensorboard": False, "sample_tokens": 4, "log_every": 1}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A synthetic story corpus with a 320-token BPE (prepared once per session: `prepare` skips a finished folder)."""
    folder = tmp_path_factory.getbasetemp() / "train-synthetic-bpe320"
    prepare("synthetic:400", folder, tokenizer="bpe:320", workers=1, progress=False)
    return folder


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for tiny models


def run(data, out, **settings):
    return train(resolve({"data": str(data), "out_dir": str(out), **FAST, **settings}))


def records(out, kind="train"):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == kind]


def test_tiny_model_learns(data, tmp_path):
    r = run(data, tmp_path / "run", max_steps=100, eval_every=0, sample_tokens=0, lr=1e-2, min_lr=1e-3)
    chance = math.log(320)  # 5.77 nats: a model that knows nothing
    assert r.losses[0] > chance - 0.5
    assert r.val_loss < 0.5 * chance, f"validation loss {r.val_loss:.3f} after 100 steps, ln(vocab) {chance:.3f}"
    assert sum(r.losses[-5:]) / 5 < 0.5 * chance


def test_run_folder_layout_and_load(data, tmp_path):
    import nanogemma

    out = tmp_path / "run"
    r = run(data, out, max_steps=6, eval_every=3)
    for name in ("train.toml", "nanogemma.json", "model.safetensors", "tokenizer.json", "metrics.jsonl",
                 "last/trainer.pt", "last/model.safetensors", "best/model.safetensors"):
        assert (out / name).is_file(), name
    assert not list(out.glob(".tmp-*")) and not list(out.glob(".old-*"))
    meta = json.loads((out / "nanogemma.json").read_text())
    assert meta["checkpoint"] == "best" and meta["val_loss"] == pytest.approx(r.best_val_loss)
    assert meta["train"]["max_steps"] == 6
    evals = records(out, "eval")
    assert [e["step"] for e in evals] == [3, 6] and all(isinstance(e["sample"], str) for e in evals)
    # the run folder, and each checkpoint in it, loads as a model with its tokenizer
    for folder in (out, out / "last"):
        model, tok = nanogemma.load(folder)
        assert model.config.vocab_size == 320 and tok.decode(tok.encode("Once upon a time", add_bos=False)) == \
            "Once upon a time"
    # the resolved settings round-trip through train.toml
    again = resolve({"data": str(data), "out_dir": str(tmp_path / "b")}, out / "train.toml")
    assert again.max_steps == 6 and again.seq_len == 64 and again.preset == "tiny"
    with pytest.raises(NanogemmaError, match="already holds a training run"):
        run(data, out, max_steps=6)


def test_fixed_validation_batches(data, tmp_path):
    """Two evaluations of the same weights give the same numbers: the validation windows are fixed."""
    out = tmp_path / "run"
    run(data, out, max_steps=4, eval_every=2, lr=1e-12, min_lr=0.0, warmup_steps=0)
    a, b = records(out, "eval")
    assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-6)
    assert a["val_tokens"] == b["val_tokens"] == 2 * 8 * 64


def interrupt_at(call: int):
    """A loss function that sends this process SIGINT (as Ctrl-C would) during micro-batch `call`."""
    calls = {"n": 0}

    def loss_fn(model, x, y):
        calls["n"] += 1
        if calls["n"] == call:
            os.kill(os.getpid(), signal.SIGINT)
        return step_mod.lm_loss(model, x, y)

    return loss_fn


def test_resume_continues_exactly(data, tmp_path):
    """Stopped by Ctrl-C mid-run and resumed, a run logs the same losses as one uninterrupted run (to 1e-6)."""
    settings = dict(max_steps=12, eval_every=4, grad_accum=2, batch_size=4)
    whole = run(data, tmp_path / "whole", **settings)
    out = tmp_path / "split"
    first = train(resolve({"data": str(data), "out_dir": str(out), **FAST, **settings}),
                  loss_fn=interrupt_at(2 * 6 + 1))  # during step 7: that step finishes, then the checkpoint
    assert first.interrupted and first.step == 7
    assert json.loads((out / "last" / "nanogemma.json").read_text())["step"] == 7
    second = train(resolve({"out_dir": str(out), "resume": True, "progress": False}))
    assert not second.interrupted and second.step == 12
    resumed = first.losses + second.losses
    assert len(resumed) == 12
    assert max(abs(a - b) for a, b in zip(whole.losses, resumed, strict=True)) <= 1e-6
    logged = [r["loss"] for r in records(out)]
    assert logged == pytest.approx(whole.losses, abs=1e-6)  # metrics.jsonl reads like one run
    assert second.val_loss == pytest.approx(whole.val_loss, abs=1e-6)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    calls = {"n": 0}

    def poisoned(model, x, y):
        calls["n"] += 1
        loss = step_mod.lm_loss(model, x, y)
        return loss * float("nan") if calls["n"] == 5 else loss

    with pytest.raises(NanogemmaError, match=r"loss became nan at step 5.*last good checkpoint .*step 4"):
        train(resolve({"data": str(data), "out_dir": str(out), **FAST, "max_steps": 10, "eval_every": 2}),
              loss_fn=poisoned)
    meta = json.loads((out / "last" / "nanogemma.json").read_text())
    assert meta["step"] == 4
    from nanogemma.weights import load_state

    _, state, _ = load_state(out / "last")
    assert all(torch.isfinite(v).all() for v in state.values())


def test_nan_message_on_the_command_line(data, tmp_path, capsys, monkeypatch):
    import nanogemma.train.loss as loss_mod
    from nanogemma import cli

    monkeypatch.setattr(loss_mod, "fused_linear_cross_entropy",
                        lambda h, w, y: (h.sum() * 0 + float("inf")))
    code = cli.main(["train", "--data", str(data), "--out-dir", str(tmp_path / "r"), "--preset", "tiny",
                     "--progress=false", "--max-steps=3"])
    err = capsys.readouterr().err.splitlines()[-1]
    assert code == 1 and err.startswith("nanogemma: error: the training loss became inf at step 1")
    assert "Traceback" not in err and "no checkpoint was written yet" in err


def test_accumulation_equals_bigger_batch(data, tmp_path):
    """4 windows x 2 accumulated micro-batches = one batch of 8: same windows, same mean gradient."""
    a = run(data, tmp_path / "a", max_steps=5, eval_every=0, sample_tokens=0, batch_size=8, grad_accum=1)
    b = run(data, tmp_path / "b", max_steps=5, eval_every=0, sample_tokens=0, batch_size=4, grad_accum=2)
    assert a.losses == pytest.approx(b.losses, abs=1e-5)


def test_mfu_is_logged_with_a_peak(data, tmp_path):
    run(data, tmp_path / "run", max_steps=2, eval_every=0, sample_tokens=0, peak_tflops=1.0)
    mfu = [r["mfu"] for r in records(tmp_path / "run")]
    assert all(0 < m < 1 for m in mfu)  # a CPU thread does a few GFLOP/s of a pretend 1 TFLOP/s peak


def test_untied_head(data, tmp_path):
    import nanogemma

    run(data, tmp_path / "run", max_steps=2, eval_every=0, sample_tokens=0, tie_embeddings=False)
    model, _ = nanogemma.load(tmp_path / "run")
    assert model.lm_head is not None and not torch.equal(model.lm_head.weight, model.embed.weight)


def test_float16_unscales_before_clipping(data, tmp_path):
    """float16 autocast with a gradient scaler: the logged norm is the true one, not 65,536 times it."""
    ref = run(data, tmp_path / "fp32", max_steps=2, eval_every=0, sample_tokens=0)
    half = run(data, tmp_path / "fp16", max_steps=2, eval_every=0, sample_tokens=0, dtype="float16")
    n32 = [r["grad_norm"] for r in records(tmp_path / "fp32")]
    n16 = [r["grad_norm"] for r in records(tmp_path / "fp16")]
    assert n16[0] == pytest.approx(n32[0], rel=0.05)
    assert half.losses[0] == pytest.approx(ref.losses[0], abs=0.02)
    trainer = torch.load(tmp_path / "fp16" / "last" / "trainer.pt", weights_only=True)
    assert trainer["scaler"]["scale"] > 1.0  # the scaler's state is checkpointed


def test_bfloat16_autocast_keeps_float32_master_weights(data, tmp_path):
    r = run(data, tmp_path / "run", max_steps=2, eval_every=0, sample_tokens=0, dtype="bfloat16")
    assert all(math.isfinite(x) for x in r.losses)
    trainer = torch.load(tmp_path / "run" / "last" / "trainer.pt", weights_only=True)
    moments = [s["exp_avg"] for s in trainer["optimizer"]["state"].values()]
    assert moments and all(m.dtype == torch.float32 for m in moments)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "run" / "model.safetensors"), "pt") as f:
        assert all(f.get_slice(k).get_dtype() == "F32" for k in f.keys())


def test_log_lines_without_a_terminal(data, tmp_path, capsys, monkeypatch):
    """Under tee / nohup / a log file (stdout not a terminal) every log_every steps prints a plain line; with
    a progress bar on the terminal the bar shows the figures and no line is printed."""
    import io

    from nanogemma.train.monitor import Monitor

    run(data, tmp_path / "run", max_steps=4, log_every=2, eval_every=0, sample_tokens=0, progress=True)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 2/4", "step 4/4"]
    assert all("loss " in line and "lr " in line and "tokens/s" in line for line in lines)

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stdout_tty in (True, False):
        out, err = (Terminal() if stdout_tty else io.StringIO()), Terminal()
        monkeypatch.setattr("sys.stdout", out)
        monkeypatch.setattr("sys.stderr", err)
        m = Monitor(tmp_path / "run", True, 10, 0, progress=True, tensorboard=False)
        assert m.bar is not None and not m.bar.disable
        m.log("step 1/10: loss 1")
        m.close()
        assert ("step 1/10: loss 1" in out.getvalue()) is not stdout_tty


def test_help_shows_the_preset_values_and_the_run_folder_its_size(data, tmp_path, capsys):
    """`train --help` shows what a run without flags uses (the default preset's values, named); the run
    folder stores what `best` and `last` share once, and the end of the run says its size."""
    import os

    from nanogemma import cli
    from nanogemma.train.checkpoint import disk_usage
    from nanogemma.train.config import FIELDS, PRESETS_TRAIN

    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    preset = FIELDS["preset"].default
    for name in ("max_steps", "lr", "warmup_steps"):
        assert f"(default: {PRESETS_TRAIN[preset][name]}, from preset {preset})" in text, name
    assert f"(default: {FIELDS['weight_decay'].default})" in text  # one the preset leaves alone

    out = tmp_path / "run"
    assert cli.main(["train", "--data", str(data), "--out-dir", str(out), "--preset", "tiny", "--max-steps", "4",
                     "--eval-every", "4", "--progress=false", "--tensorboard=false", "--sample-tokens=0"]) == 0
    done = capsys.readouterr().out
    for f in ("model.safetensors", "trainer.pt"):  # best is last here: the same files, once
        assert os.path.samefile(out / "best" / f, out / "last" / f)
    assert os.path.samefile(out / "model.safetensors", out / "best" / "model.safetensors")
    naive = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    size = disk_usage(out)
    assert size <= naive - 2 * (out / "model.safetensors").stat().st_size
    assert f"{size / 1000:.1f} KB on disk" in done or f"{size / 1e6:.1f} MB on disk" in done


# ---------------------------------------------------------------------- activation checkpointing


def _tiny_training_model(lora_dropout: float | None = None):
    """The tiny shape with a 320-token vocabulary, seeded; with LoRA adapters when `lora_dropout` is given."""
    from nanogemma.config import get_preset
    from nanogemma.lora import LoRAConfig, apply_lora
    from nanogemma.train.loss import TrainingGemma

    model = TrainingGemma(get_preset("tiny").replace(vocab_size=320)).init_weights(seed=0)
    if lora_dropout is not None:
        apply_lora(model, LoRAConfig(rank=4, alpha=8.0, dropout=lora_dropout), seed=0)
        with torch.no_grad():  # lora_B starts at zero: give the adapters a say in the loss and the gradients
            for name, p in model.named_parameters():
                if name.endswith("lora_B"):
                    p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return model.train()


def _packed_batch(batch=2, length=48):
    """Inputs, targets and positions of two packed documents per row (positions restart at 0), as chat data."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 320, (batch, length + 1), generator=g)
    pos = torch.cat([torch.arange(20), torch.arange(length - 20)]).expand(batch, length)
    return ids[:, :-1], ids[:, 1:], pos


def _loss_and_grads(model, x, y, pos, seed=7):
    torch.manual_seed(seed)  # the dropout masks
    h = model.hidden(x, pos)
    logits = model.lm_head(model.final_norm(h))  # not forward(): it casts the logits to float32
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    """Full training and LoRA with dropout, in float64 over packed documents: the recomputing blocks give the
    loss and every gradient of the plain ones. The recomputation repeats the same ops on the same inputs,
    so any difference can only be a reordering of float64 sums (~1e-16 relative): the 1e-10 bound holds on
    any CPU, while a dropout mask drawn anew (an O(1) change) or a missing input would break it by far."""
    import copy

    from nanogemma.train.build import checkpoint_blocks

    x, y, pos = _packed_batch()
    for dropout in (None, 0.3):
        plain = _tiny_training_model(dropout).double()
        # a copy of a recomputing model recomputes with its own weights (and applying it twice is once)
        recomputing = checkpoint_blocks(copy.deepcopy(checkpoint_blocks(copy.deepcopy(plain))))
        assert list(recomputing.state_dict()) == list(plain.state_dict())  # checkpoints and exports unchanged
        loss_a, grads_a = _loss_and_grads(plain, x, y, pos)
        loss_b, grads_b = _loss_and_grads(recomputing, x, y, pos)
        assert set(grads_a) == set(grads_b) and grads_a
        if dropout is not None:
            assert all(".lora_" in n for n in grads_a)
            _, other = _loss_and_grads(plain, x, y, pos, seed=8)  # the dropout is live: another mask, other grads
            assert max((other[n] - grads_a[n]).abs().max().item() for n in grads_a) > 1e-6
        assert abs(loss_a.item() - loss_b.item()) <= 1e-10 * abs(loss_a.item())
        for n in grads_a:
            scale = grads_a[n].abs().max().item()
            assert (grads_a[n] - grads_b[n]).abs().max().item() <= 1e-10 * scale, n


def test_activation_checkpointing_under_bfloat16_autocast():
    """The recomputation runs under the autocast state of the forward: had it run in float32, the saved
    activations would differ from forward's by bfloat16's rounding (~4e-3 relative), far above the 1e-4
    allowed; a float32 reordering is ~1e-6."""
    import copy

    from nanogemma.train.build import checkpoint_blocks

    x, y, pos = _packed_batch()
    plain = _tiny_training_model(0.1)
    recomputing = checkpoint_blocks(copy.deepcopy(plain))
    results = []
    for model in (plain, recomputing):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(_loss_and_grads(model, x, y, pos))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert abs(loss_a.item() - loss_b.item()) <= 1e-4 * abs(loss_a.item())
    for n in grads_a:
        assert (grads_a[n] - grads_b[n]).abs().max().item() <= 1e-4 * grads_a[n].abs().max().item(), n


def test_activation_checkpointing_keeps_only_the_blocks_inputs():
    """Bytes autograd keeps from forward for backward, counted by a saved-tensors hook (each storage once):
    without recomputation every block keeps its intermediates, among them the MLP's gate and up products
    (2 x intermediate_size wide, 8 times the residual stream here); with it, each block keeps its input (one
    residual stream) and little else: the RoPE tables, shared by the blocks, and the positions."""
    import copy

    from nanogemma.train.build import checkpoint_blocks

    def saved_bytes(model, x, pos):
        seen: dict[tuple, int] = {}

        def pack(t):
            if t.device.type != "meta":
                seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            h = model.hidden(x, pos)
        return sum(seen.values()), h

    x, _, pos = _packed_batch()
    plain = _tiny_training_model()
    recomputing = checkpoint_blocks(copy.deepcopy(plain))
    cfg = plain.config
    stream = x.numel() * cfg.hidden_size * 4  # one (B, T, hidden) float32 tensor
    mlp = x.numel() * cfg.intermediate_size * 4  # one of the MLP's wide tensors
    kept_plain, _ = saved_bytes(plain, x, pos)
    kept, h = saved_bytes(recomputing, x, pos)
    assert kept_plain >= cfg.num_layers * 2 * mlp  # the plain blocks keep at least gate and up
    assert cfg.num_layers * stream <= kept <= (cfg.num_layers + 2) * stream, (kept, kept_plain)
    assert h.requires_grad  # still differentiable: backward recomputes
    with torch.no_grad():  # evaluation and sampling run the blocks directly
        assert saved_bytes(recomputing, x, pos)[0] == 0


def test_activation_checkpointing_run_resumes_and_saves_the_same_model(data, tmp_path, capsys):
    """A run with recomputation logs the plain run's losses, writes checkpoints with the plain keys, and a
    resumed half of it continues exactly (to 1e-6, as test_resume_continues_exactly)."""
    from safetensors.torch import load_file

    settings = dict(max_steps=4, eval_every=0, batch_size=4, sample_tokens=0)
    whole = run(data, tmp_path / "plain", **settings)
    out = tmp_path / "recompute"
    first = run(data, out, **{**settings, "max_steps": 2, "decay_steps": 4}, activation_checkpointing=True)
    assert first.step == 2 and "recomputing activations in backward" in capsys.readouterr().err
    second = train(resolve({"out_dir": str(out), "resume": True, "max_steps": 4, "progress": False}))
    assert second.step == 4
    assert max(abs(a - b) for a, b in zip(whole.losses, first.losses + second.losses, strict=True)) <= 1e-6
    assert second.val_loss == pytest.approx(whole.val_loss, abs=1e-6)
    plain_w, ours = load_file(str(tmp_path / "plain" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(plain_w) == sorted(ours)
    assert "activation_checkpointing = true" in (out / "train.toml").read_text()
