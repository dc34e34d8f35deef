"""Peak memory (RSS) of fine-tuning the official 270M model: every weight, against LoRA over a float32,
bfloat16 or int8 frozen base.

    .venv/bin/python bench/bench_lora.py --data data/stories-gemma --steps 3 --seq-len 256 --threads 2

Each mode is its own `nanogemma train` process (same data, windows and steps), so each peak is that run's
alone, in three phases: setup (loading the weights, freezing or converting them, building the optimizer),
the training steps, and the final evaluation (whose full logits, 256 x 262,144 floats per window, are the
same in every mode). Each phase's peak is the kernel's high-water mark of resident memory (VmHWM) when the
phase ends (the banner; the last step's metrics line; exit, as `ru_maxrss` from wait4), reset through
/proc/PID/clear_refs at each phase's start. `--activation-checkpointing` / `--no-activation-checkpointing`
sets the runs' activation checkpointing (default: the preset's). Linux only. The step time is the median `time` delta in the run's metrics.jsonl. Results: docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

MODES = {"full": {}, "lora-float32": {"lora_base_dtype": "float32"},
         "lora-bfloat16": {"lora_base_dtype": "bfloat16"}, "lora-int8": {"lora_base_dtype": "int8"}}


def run_mode(mode: str, args: argparse.Namespace, out: Path) -> dict:
    settings = {"data": args.data, "out_dir": str(out / mode), "preset": args.preset, "max_steps": args.steps,
                "seq_len": args.seq_len, "batch_size": args.batch_size, "grad_accum": 1, "eval_every": 0,
                "eval_batches": 1, "sample_tokens": 0, "log_every": 1, "warmup_steps": 0, "progress": False,
                "tensorboard": False, "threads": args.threads, **MODES[mode]}
    if args.activation_checkpointing is not None:  # otherwise the preset's (sft: on)
        settings["activation_checkpointing"] = args.activation_checkpointing
    if mode != "full":
        settings.update(lora_rank=args.rank, lr=1e-4, min_lr=1e-5)
    cmd = [sys.executable, "-m", "nanogemma", "train", *(f"--{k.replace('_', '-')}={v}" for k, v in settings.items())]
    log, metrics = out / f"{mode}.log", out / mode / "metrics.jsonl"
    peaks: list[float] = []
    phase_ends = [lambda: "training " in log.read_text(),  # the banner: model and optimizer built, no step yet
                  lambda: metrics.is_file() and f'"step": {args.steps},' in metrics.read_text()]  # last step logged
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        while len(peaks) < len(phase_ends) and proc.poll() is None:
            time.sleep(0.05)
            if phase_ends[len(peaks)]():
                peaks.append(_hwm(proc.pid))
                Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # restart the high-water mark here
        _, status, usage = os.wait4(proc.pid, 0)  # reaped here (not by poll): its own rusage
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{mode} failed: {log.read_text()[-2000:]}")
    rows = [json.loads(line) for line in (out / mode / "metrics.jsonl").read_text().splitlines()]
    times = [r["time"] for r in rows if r["kind"] == "train"]
    steps = [b - a for a, b in zip([0.0] + times, times, strict=False)]
    ckpt = out / mode / "last"
    recompute = tomllib.loads((out / mode / "train.toml").read_text())["activation_checkpointing"]
    return {"mode": mode, "activation_checkpointing": recompute, "setup_peak_gib": peaks[0],
            "steps_peak_gib": peaks[1],
            "eval_peak_gib": round(usage.ru_maxrss / 2**20, 2),
            "step_s": round(statistics.median(steps), 2),
            "checkpoint_mb": round(sum((ckpt / f).stat().st_size for f in ("model.safetensors", "trainer.pt")) / 1e6, 1),
            "losses": [round(r["loss"], 4) for r in rows if r["kind"] == "train"]}


def _hwm(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), GiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 2**20, 2)
    raise RuntimeError("no VmHWM in /proc/PID/status")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a data folder prepared with --tokenizer gemma")
    p.add_argument("--preset", default="finetune", help="the runs' preset (sft: chat data, embeddings frozen)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="the runs recompute each block's activations in backward (or not, with --no-...); "
                        "default: the preset's (sft: on)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            print(json.dumps(run_mode(mode, args, Path(tmp))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
