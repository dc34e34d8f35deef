"""Fine-tuning the official 270M weights (`--init-from gemma3-270m`) on Gemma-tokenized data, then generating
from the run folder with the CLI. One optimizer step on 16-token windows: the point is the plumbing (the
official weights in, a loadable run folder out), not the learning. Needs ~6 GB of memory and ~1 minute.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from nanogemma.data import prepare
from nanogemma.train import resolve, train

pytestmark = pytest.mark.slow


def test_finetune_official_model_then_generate_from_the_run(tmp_path, gguf_path):
    data = tmp_path / "data"
    prepare("synthetic:30", data, tokenizer="gemma", workers=1, progress=False)
    out = tmp_path / "run"
    torch.set_num_threads(2)
    r = train(resolve({"data": str(data), "out_dir": str(out), "preset": "finetune", "max_steps": 1,
                       "seq_len": 16, "batch_size": 1, "grad_accum": 1, "eval_batches": 1, "sample_tokens": 0,
                       "progress": False, "tensorboard": False}))
    # The pretrained model already knows English: far below ln(262,144) = 12.5 nats (a random model) at once;
    # 16-token windows hide most of each story, so names and adjectives are guesses (~3 nats with context).
    assert r.losses[0] < 8.0 and r.val_loss < 8.0
    meta = json.loads((out / "nanogemma.json").read_text())
    assert meta["model"]["vocab_size"] == 262_144 and meta["step"] == 1
    p = subprocess.run([sys.executable, "-m", "nanogemma", "generate", "--model", str(out),
                        "Once upon a time, there was a", "--max-new-tokens", "5"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert len(p.stdout.strip()) > 0
