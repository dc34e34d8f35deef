"""bench/bench_serve.py's client logic against a stub streaming server (no model): levels, the long-prompt
run, the summary's ratios. Timings are never asserted, only what is counted and how rows are combined."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from helpers import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("bench_serve")


class Stub(BaseHTTPRequestHandler):
    """Streams `max_tokens` text chunks (one word each), then usage and [DONE], as /v1/completions does."""

    seen: list[str] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Stub.seen.append(body["prompt"])
        if body["prompt"] == "bad":
            self.send_response(400)
            self.end_headers()
            self.wfile.write(b'{"error": "bad prompt"}')
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for _ in range(body["max_tokens"]):
            time.sleep(0.001)
            self.wfile.write(b'data: {"choices": [{"text": " w"}]}\n\n')
            self.wfile.flush()
        usage = {"choices": [], "usage": {"completion_tokens": body["max_tokens"]}}
        self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def port():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()


def test_a_level_counts_every_request_and_the_long_prompt_apart(bench, port):
    Stub.seen.clear()
    row = bench.run_level(port, "m", lambda i, j: f"p{i}.{j}", 3, 2, 5, long_prompt="LONG", long_max_tokens=2)
    assert row["requests"] == 6 and row["errors"] == 0 and row["tokens"] == 30  # the long one not among them
    assert sorted(Stub.seen) == sorted([f"p{i}.{j}" for i in range(3) for j in range(2)] + ["LONG"])
    assert row["long_error"] is None and row["long_ttft_s"] >= 0 and row["gaps_during_long"] >= 0
    assert row["ttft_p50_s"] <= row["ttft_p95_s"] and row["itl_p50_ms"] <= row["itl_p95_ms"]
    bad = bench.run_level(port, "m", lambda i, j: "bad", 2, 1, 5, long_prompt="LONG")  # failed clients free the long one
    assert bad["errors"] == 2 and "HTTP 400" in bad["first_error"][0] and bad["long_error"] is None


def test_gaps_in_a_window_and_percentiles(bench):
    results = [{"stamps": [0.0, 1.0, 3.0, 6.0]}, {"stamps": [0.5, 0.75]}]
    assert bench.gaps(results) == [0.25, 1.0, 2.0, 3.0]
    assert bench.gaps(results, 0.7, 3.0) == [0.25, 1.0, 2.0]  # gaps that end inside the window
    assert bench.pct([1.0, 2.0, 3.0, 4.0], 0.5) == 3.0 and bench.pct([], 0.95) is None


def test_summary_prints_ratios_the_long_prompt_check_and_the_prefix_gain(bench):
    level = {"requests": 2, "errors": 0, "ttft_p50_s": 0.3, "ttft_p95_s": 0.4, "itl_p50_ms": 80.0,
             "itl_p95_ms": 90.0, "long_prompt": 0, "base_server": "nanogemma"}
    rows = [{**level, "server": "ng", "concurrency": 1, "tokens_per_s": 10.0, "prefix_cache": 8},
            {**level, "server": "ng", "concurrency": 16, "tokens_per_s": 45.0, "prefix_cache": 8,
             "ttft_p50_s": 1.0, "ttft_p95_s": 1.5},
            {**level, "server": "ng", "concurrency": 16, "tokens_per_s": 40.0, "prefix_cache": 8,
             "long_prompt": 4000, "itl_p95_ms": 150.0, "itl_p95_during_long_ms": 170.0, "gaps_during_long": 30,
             "long_ttft_s": 9.5, "long_error": None},
            {**level, "server": "ng0", "concurrency": 16, "tokens_per_s": 40.0, "prefix_cache": 0,
             "ttft_p50_s": 2.0, "ttft_p95_s": 3.0},
            {"server": "llama-cpp-python", "error": "did not start: no answer"}]
    text = bench.summary(rows)
    assert "| ng | 16 | 45.0 | 4.50x | 1.00 | 1.50 | 80.0 | 90.0 | 0/2 |" in text
    assert "| ng | 16 + 4000-token prompt | 40.0 | 4.00x |" in text
    assert "ng: batch-1 decode 12.5 tokens/s" in text and "16 streams: 4.50x the concurrency-1 throughput" in text
    assert ("one 4000-token prompt mid-run: the others' p95 ITL 90.0 ms without it, 150.0 ms with it, "
            "170.0 ms while it was prefilled (30 gaps); its TTFT 9.50 s") in text
    assert "nanogemma, c=16, shared system prompt: p50 TTFT 1.00 s with --prefix-cache 8, 2.00 s with 0" in text
    assert "| llama-cpp-python | – |" in text and "did not start" in text


def test_nanogemma_command_passes_the_mode_and_engine_settings(bench, tmp_path):
    ns = bench.argparse.Namespace(slots=64, context=4200, dtype="bfloat16", step_tokens=512, quantize=None,
                                  compile=False, prefill_share=None)
    cmd, model = bench.server_command("nanogemma", tmp_path / "m.gguf", 1234, ns, prefix_cache=0)
    flags = " ".join(cmd[cmd.index("serve"):])
    for needle in ("--slots 64", "--context 4200", "--dtype bfloat16", "--step-tokens 512", "--prefix-cache 0"):
        assert needle in flags
    assert "--quantize" not in flags and model == "m"
    assert bench.nanogemma_label(ns, 0) == "nanogemma bfloat16 slots 64 step 512 prefix-cache 0"
    assert "--prefill-share" not in flags  # the server's own default
    ns.prefill_share = 0.5
    cmd, _ = bench.server_command("nanogemma", tmp_path / "m.gguf", 1234, ns)
    assert cmd[cmd.index("--prefill-share") + 1] == "0.5"
    assert bench.nanogemma_label(ns, None) == "nanogemma bfloat16 slots 64 step 512 prefill-share 0.5"


@pytest.mark.parametrize("batching", ["continuous", "none"])
def test_transformers_command_asks_for_its_continuous_batching(bench, tmp_path, monkeypatch, batching):
    monkeypatch.setattr(bench, "hf_copy", lambda gguf: tmp_path / "hf")
    ns = bench.argparse.Namespace(transformers_batching=batching, transformers_dtype="bfloat16")
    cmd, model = bench.server_command("transformers", tmp_path / "m.gguf", 1234, ns)
    assert cmd[1:3] == ["serve", str(tmp_path / "hf")] and model == str(tmp_path / "hf")
    assert ("--continuous-batching" in cmd) == (batching == "continuous")
    assert cmd[cmd.index("--device") + 1] == "cpu" and cmd[cmd.index("--port") + 1] == "1234"
    assert cmd[cmd.index("--dtype") + 1] == "bfloat16"
