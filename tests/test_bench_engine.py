"""bench/bench_engine.py on a tiny model: both malloc variants run in their own processes and report what
they measured. Timings are never asserted, only that every row is there, and that each process ran with
the malloc setting its row names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_engine.py"


def test_rows_for_both_malloc_settings(tiny_hf):
    proc = subprocess.run([sys.executable, str(BENCH), "--model", str(tiny_hf), "--quantize", "none",
                           "--slots", "3", "--prompt-tokens", "9", "--steps", "4", "--workload", "5",
                           "--max-tokens", "3", "--step-tokens", "16", "--threads", "1",
                           "--malloc", "kept,default", "--rounds", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert [r.split("|")[1:3] for r in rows] == [[" 1 ", " kept "], [" 1 ", " default "],
                                                  [" 2 ", " kept "], [" 2 ", " default "]]
    for row in rows:
        cells = [c.strip() for c in row.split("|")[3:-1]]
        assert "failed" not in row and "not applied" not in row, row
        step, body, head, faults, tok_s = (float(c) for c in cells[:5])
        assert step > 0 and body > 0 and head > 0 and faults >= 0 and tok_s > 0
        p50, p95 = (float(x) for x in cells[5].split(" / "))
        assert 0 < p50 <= p95


def test_unknown_malloc_setting_is_one_line():
    proc = subprocess.run([sys.executable, str(BENCH), "--malloc", "kept,fast"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.strip() == "error: --malloc takes kept and/or default, got fast"
