"""Supervised fine-tuning on chat data: packed conversations (train/data.py `Packing`), the loss mask in
both losses (train/loss.py), the `sft` preset, and a tiny run end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nanogemma.config import get_preset
from nanogemma.data import prepare
from nanogemma.model import Gemma
from nanogemma.train import resolve, train
from nanogemma.train.config import PRESETS_TRAIN
from nanogemma.train.data import IGNORE, PackedSampler, Packing
from nanogemma.train.loss import LanguageModelLoss, TrainingGemma, lm_loss
from nanogemma.weights import load_state

pytestmark = pytest.mark.usefixtures("one_thread")


def test_packing_rows():
    # Three documents: <bos>=2 starts each; mask 1 on the "reply" tokens.
    tokens = np.array([2, 10, 11, 12, 2, 20, 21, 2, 30, 31, 32, 33], dtype=np.uint32)
    mask = np.array([0, 0, 1, 1, 0, 1, 1, 0, 0, 0, 1, 1], dtype=np.uint8)
    p = Packing(tokens, mask, 2, seq_len=8, seed=0, shuffle=False)
    assert p.epoch_rows(0) == [[0, 1], [2]]  # 4 + 3 tokens fit in 8; the third (5) starts a new row
    x, y, pos = p.batch(np.array([0, 1]), torch.device("cpu"))
    assert x[0].tolist() == [2, 10, 11, 12, 2, 20, 21, 0]
    assert y[0].tolist() == [IGNORE, 11, 12, IGNORE, 20, 21, IGNORE, IGNORE]  # next token where the mask says
    assert pos[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0]  # restarting per document; padding its own document
    assert y[1].tolist() == [IGNORE, IGNORE, 32, 33, IGNORE, IGNORE, IGNORE, IGNORE]
    # Shuffled epochs: every document once per epoch, and the stream is a pure function of (seed, step).
    q = Packing(tokens, mask, 2, seq_len=8, seed=5)
    for e in range(3):
        assert sorted(d for row in q.epoch_rows(e) for d in row) == [0, 1, 2]
    s = PackedSampler(q)
    rows = [q.row(int(i)) for i in s.offsets(3, 2)]
    assert rows == [Packing(tokens, mask, 2, 8, 5).row(int(i)) for i in s.offsets(3, 2)]


def test_loss_mask_honoured_plain_and_fused():
    cfg = get_preset("tiny")
    model = TrainingGemma(cfg).init_weights(seed=0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (2, 24), generator=gen)
    y = torch.randint(0, cfg.vocab_size, (2, 24), generator=gen)
    keep = torch.rand(2, 24, generator=gen) < 0.4
    masked = torch.where(keep, y, torch.full_like(y, IGNORE))
    with torch.no_grad():
        logits = model(x)
    expected = F.cross_entropy(logits[keep], y[keep])  # the mean over trained targets only
    grads = {}
    for fused in (False, True):
        model.zero_grad()
        loss = LanguageModelLoss(model, fused=fused)(model, x, masked)
        loss.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        grads[fused] = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(grads[False], grads[True], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # What an ignored target would have been changes nothing.
    other = torch.where(keep, y, torch.zeros_like(y))
    assert lm_loss(model, x, torch.where(keep, other, IGNORE)).item() == pytest.approx(expected.item(), rel=1e-6)


def test_preset_sft_is_valid():
    cfg = resolve({"preset": "sft", "data": "data/chat"})
    assert cfg.init_from == "gemma3-270m" and cfg.loss_mask and not cfg.train_embeddings
    assert cfg.activation_checkpointing  # the saved activations dominate the step's memory
    assert cfg.lr <= 2e-4 and cfg.warmup_steps < cfg.max_steps and cfg.weight_decay == 0.0
    assert set(PRESETS_TRAIN["sft"]) <= set(cfg.to_dict())


def test_tiny_sft_run(tmp_path):
    records = [{"prompt": f"Say {w} twice.", "completion": f"{w} {w}"}
               for w in ("apple", "river", "cloud", "stone", "light", "green", "north", "paper") * 4]
    src = tmp_path / "say.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    (tmp_path / "say_val.jsonl").write_text(json.dumps(records[0]) + "\n", encoding="utf-8")
    data = prepare([str(src), str(tmp_path / "say_val.jsonl")], tmp_path / "data", "gemma").folder
    cfg = resolve({"preset": "tiny", "data": str(data), "out_dir": str(tmp_path / "run"), "max_steps": 3,
                   "seq_len": 64, "batch_size": 2, "train_embeddings": False, "progress": False,
                   "tensorboard": False, "sample_tokens": 0, "eval_batches": 1})
    result = train(cfg)
    assert result.step == 3 and all(np.isfinite(result.losses)) and result.val_loss is not None
    mcfg, state, _ = load_state(str(tmp_path / "run"))
    first = Gemma(mcfg).init_weights(std=cfg.init_std, seed=cfg.seed)
    assert torch.equal(state["embed.weight"], first.embed.weight)  # frozen: still the seeded initial table
    assert not torch.equal(state["layers.0.attn.wq.weight"], first.layers[0].attn.wq.weight)  # the rest trained
