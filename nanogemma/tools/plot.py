"""`nanogemma plot RUN_DIR`: the curves of a training run, as a PNG.

Two panels share the step axis: the loss (training, as logged, and validation at each evaluation, in
nats per token), and the learning rate. When the run trained on the synthetic corpus, whose best possible
loss is known exactly, that floor is drawn as a dashed line: how far the validation curve stays above it
is how much the model has left to learn.

The figure is drawn with matplotlib's file-only backend (no display needed) and written atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import NanogemmaError


def _entropy_floor(run_dir: Path) -> float | None:
    try:
        meta = json.loads((run_dir / "nanogemma.json").read_text(encoding="utf-8"))
        return meta.get("data", {}).get("entropy_floor")
    except (OSError, json.JSONDecodeError):
        return None


def plot_run(run_dir: str | Path, out: str | Path | None = None, title: str | None = None) -> Path:
    """Write the loss and learning-rate curves of `run_dir` (default: RUN_DIR/curves.png); returns the path."""
    from ..train.monitor import read_metrics

    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise NanogemmaError(f"{run_dir} has no metrics.jsonl: is it a run folder of `nanogemma train`?")
    records = read_metrics(run_dir)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    if not train and not evals:
        raise NanogemmaError(f"{run_dir}/metrics.jsonl has no training records yet; plot again after a few steps")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise NanogemmaError("plotting needs matplotlib: pip install 'nanogemma[plot]'") from None

    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, height_ratios=[3, 1.2])
    if train:
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1.2, label="training loss")
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", ms=4, lw=1.5,
                     label="validation loss")
    floor = _entropy_floor(run_dir)
    if floor is not None:
        ax_loss.axhline(floor, ls="--", color="gray", lw=1, label=f"entropy floor {floor:.3f}")
        ax_loss.axhline(floor * 1.1, ls=":", color="gray", lw=1, label="floor + 10%")
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel("loss (nats/token, log scale)")
    ax_loss.grid(True, which="both", alpha=0.3)
    ax_loss.legend()
    subtitle = ""
    if train and train[-1].get("time"):  # seconds spent in training steps (evaluations excluded)
        subtitle = f"\n{train[-1]['step']} steps, {train[-1]['time'] / 60:.1f} min of training steps"
    ax_loss.set_title((title or f"nanogemma train: {run_dir.name}") + subtitle)
    if train:
        ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:green", lw=1.2)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.grid(True, alpha=0.3)
    fig.tight_layout()

    out = Path(out) if out is not None else run_dir / "curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
    return out
