"""`nanogemma bench` runs end to end on a tiny model and prints its table. Timings are never asserted."""

from __future__ import annotations

import json

import pytest
from helpers import cli

from nanogemma.errors import NanogemmaError
from nanogemma.tools.bench import parse_mode, table


def test_bench_prints_the_table_with_ratios(tiny_hf, tmp_path):
    out = tmp_path / "bench.json"
    proc = cli("bench", "--model", str(tiny_hf), "--prompt-tokens", "12", "--new-tokens", "4",
               "--modes", "float32,int8,float32+lookup", "--compare", "transformers", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    for needle in ("| mode | prefill tok/s | decode tok/s | TTFT s", "| float32 |", "| int8 |", "| transformers |",
                   "| float32+lookup |", "tokens equal float32's", "decode vs transformers", "fastest mode:"):
        assert needle in proc.stdout, needle
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["float32", "int8", "float32+lookup", "transformers"]
    assert all(r["tokens"] == 4 and r["decode_tok_s"] > 0 and r["peak_mb"] > 0 for r in rows)


def test_bad_mode_is_a_clean_error(tiny_hf):
    proc = cli("bench", "--model", str(tiny_hf), "--modes", "float64")
    assert proc.returncode == 1 and proc.stderr.startswith("nanogemma: error: unknown bench mode 'float64'")


def test_modes_and_table_format():
    assert parse_mode("int8") == ("float32", "int8", False, None)
    assert parse_mode("bfloat16+compile") == ("bfloat16", None, True, None)
    assert parse_mode("int8+spec+compile") == ("float32", "int8", True, "spec")
    assert parse_mode("int8+lookup") == ("float32", "int8", False, "lookup")
    assert parse_mode("int8+compile+spec+lookup") == ("float32", "int8", True, "lookup+spec")
    with pytest.raises(NanogemmaError, match="and/or \\+lookup"):
        parse_mode("int8+spec+spec")
    row = {"mode": "float32", "prefill_tok_s": 100.0, "decode_tok_s": 20.0, "ttft_s": 0.5, "ttft_cold_s": 2.0,
           "load_s": 1.0, "peak_mb": 900.0, "weight_gb_s": 10.0}
    text = table([row, {**row, "mode": "transformers", "decode_tok_s": 10.0}], peak_bw=20.0)
    assert "| float32 | 100 | 20.0 | 0.500 | 2.00 | 1.00 | 900 | 10.0 | 50% | 2.00x |" in text
