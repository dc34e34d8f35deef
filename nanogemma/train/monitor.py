"""What a run shows and records: the progress bar, `metrics.jsonl`, TensorBoard, and the MFU estimate.

**metrics.jsonl** holds one JSON object per line, appended as the run goes (and trimmed back to the
checkpoint's step on resume, so a resumed run's file reads like an uninterrupted one):

    {"kind": "train", "step": 10, "loss": 5.12, "lr": 0.0003, "grad_norm": 1.7, "tokens": 40960,
     "tokens_per_s": 5120.0, "mfu": null, "time": 8.1}
    {"kind": "eval", "step": 100, "val_loss": 2.31, "val_ppl": 10.1, "val_acc": 0.52, "sample": "..."}

`step` counts optimizer steps done. `nanogemma plot` draws the curves from this file.

**MFU** (model FLOPs utilisation) is the share of the device's peak arithmetic the training step uses:
tokens/s × training FLOPs per token ÷ peak FLOP/s. Training FLOPs per token are 6 × (the parameters a
token passes through: all weights but the embedding lookup, plus the output head) for the matmuls of
forward and backward, plus the attention scores and weighted sums, 3 × 4 · heads · head_dim · keys per
layer, where a causal layer sees (T+1)/2 keys on average and a sliding one at most its window. The
peak is looked up by GPU name for bfloat16 / float16 dense math; elsewhere (CPUs) there is no reliable
peak and MFU is left out unless `peak_tflops` is given.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from ..config import GLOBAL, GemmaConfig

# Dense bfloat16/float16 tensor-core peaks, TFLOP/s (vendor datasheets; SXM parts where both exist).
GPU_PEAK_TFLOPS = {
    "H200": 989.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L40": 181.0,
    "L4": 121.0, "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.0, "RTX 3090": 71.0, "V100": 125.0, "T4": 65.0,
}


def train_flops_per_token(cfg: GemmaConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per trained token (see the module docstring)."""
    d, hd = cfg.hidden_size, cfg.head_dim
    per_layer = d * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 3 * d * cfg.intermediate_size
    matmul_params = cfg.num_layers * per_layer + cfg.vocab_size * d  # the head (tied or not) is a matmul
    attn = 0.0
    for kind in cfg.layer_types:
        causal_keys = (seq_len + 1) / 2
        keys = causal_keys if kind == GLOBAL else min(causal_keys, cfg.sliding_window)
        attn += 4 * cfg.num_heads * hd * keys
    return 6.0 * matmul_params + 3.0 * attn


def peak_flops(device: torch.device, dtype: torch.dtype, override_tflops: float = 0.0) -> float | None:
    """The device's peak FLOP/s for this dtype, or None where unknown."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(GPU_PEAK_TFLOPS, key=len, reverse=True):  # "L40S" before "L40" before "L4"
        if key in name:
            return GPU_PEAK_TFLOPS[key] * 1e12
    return None


class Monitor:
    """Writes metrics (main process only) and drives the progress bar."""

    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int, progress: bool,
                 tensorboard: bool) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.file = open(self.path, "a", encoding="utf-8") if enabled else None  # noqa: SIM115 - closed in close()
        self.tb = None
        self.tb_missing = False
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # optional: pip install tensorboard
                self.tb_missing = True
            else:
                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        self.bar = None
        if enabled and progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            file=sys.stderr, disable=None)  # disable=None: off when stderr is not a terminal

    def record(self, kind: str, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        entry = {"kind": kind, "step": step, **values}
        self.file.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None and math.isfinite(v):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)
                elif k == "sample" and isinstance(v, str):
                    self.tb.add_text("sample", v, step)

    def advance(self, n: int = 1, **postfix: Any) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def log(self, text: str) -> None:
        """A training log line, every `log_every` steps: to stdout when it is not a terminal (a log file,
        `tee`, `nohup`), or when no progress bar is shown; a bar on the terminal shows the same figures."""
        if not self.enabled:
            return
        bar_shown = self.bar is not None and not self.bar.disable
        if bar_shown and sys.stdout.isatty():
            return
        if bar_shown:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def say(self, text: str) -> None:
        """A line for the user, above the progress bar if there is one."""
        if not self.enabled:
            return
        if self.bar is not None and not self.bar.disable:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (lines cut short by a crash are skipped)."""
    out = []
    path = Path(run_dir) / "metrics.jsonl"
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out
