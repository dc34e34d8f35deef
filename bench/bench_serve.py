"""`nanogemma serve` against the servers people would pick instead: same machine, model file, prompts, run.

    .venv/bin/python bench/bench_serve.py [--servers nanogemma,llama-cpp-python,transformers]
        [--concurrency 1,4,16,64] [--requests-per-client 2] [--max-tokens 64] [--prompt-tokens 128]

Each server is started in its own process on the official 270M GGUF, serves every concurrency level, then is
stopped. A level runs `c` clients at once, each sending `--requests-per-client` streamed `/v1/completions`
requests one after another (the same prompts for every server: the bench prompt cut to `--prompt-tokens`
tokens, each client's prompt differing in its first word, greedy, `max_tokens` fixed). Per level it reports
aggregate output tokens/s (all tokens over the level's wall time), p50/p95 time to first token, p50 gap
between streamed tokens, and errors. Output tokens are the server's own `usage` where it reports one, else
the streamed chunks with text.

Peers: `llama-cpp-python`'s OpenAI server (`python -m llama_cpp.server`; needs llama-cpp-python with its
server extras in the interpreter given by --llama-python), and `transformers serve` (the `transformers` CLI
next to the interpreter; GGUF weights named `<folder>:<file>`). A peer that fails to start is reported as
such, not left out silently.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, model: str, prompt: str, proc: subprocess.Popen, timeout: float) -> bool:
    """Ready when a completion succeeds (/v1/models may answer while the model still loads)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        if "error" not in one_request(port, model, prompt, 4):  # also the warm-up: first-call costs aside
            return True
        time.sleep(1.0)
    return False


def server_command(name: str, gguf: Path, port: int, args) -> tuple[list[str], str]:
    """(command, model name to send) for one server."""
    py = sys.executable
    if name == "nanogemma":
        cmd = [py, "-m", "nanogemma", "serve", "--model", str(gguf), "--port", str(port), "--slots",
               str(args.slots), "--max-queue", "1024", "--context", str(args.context), "--log-level", "warning"]
        if args.quantize:
            cmd += ["--quantize", args.quantize]
        return cmd, gguf.stem
    if name == "llama-cpp-python":
        return [args.llama_python or py, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port),
                "--n_ctx", str(args.context), "--n_threads", str(args.threads), "--model_alias", "gguf"], "gguf"
    if name == "transformers":
        cli = str(Path(py).with_name("transformers"))
        folder = hf_copy(gguf)
        return [cli, "serve", str(folder), "--port", str(port), "--device", "cpu", "--host", "127.0.0.1",
                "--dtype", "float32"], str(folder)
    raise SystemExit(f"unknown server {name}")


def hf_copy(gguf: Path) -> Path:
    """The GGUF as a Hugging Face folder (transformers' own dequantised reading), made once: `transformers
    serve` cannot start from a GGUF file (its config names no architecture)."""
    folder = Path.home() / ".cache" / "nanogemma-bench" / f"{gguf.stem}-hf"
    if not (folder / "config.json").is_file():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tmp = folder.with_name(folder.name + ".tmp")
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
        model.hf_quantizer = None  # the weights are dequantised already; transformers refuses to save "gguf"
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tmp)
        tmp.rename(folder)
    return folder


def one_request(port: int, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    stamps: list[float] = []
    usage = None
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            return {"error": f"HTTP {r.status}: {r.read()[:200]!r}"}
        while True:
            line = r.readline()
            if not line:
                break
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                return {"error": str(event["error"])[:200]}
            if event.get("usage"):
                usage = event["usage"].get("completion_tokens")
            if any(c.get("text") for c in event.get("choices") or []):
                stamps.append(time.perf_counter())
        conn.close()
    except (OSError, ValueError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    if not stamps:
        return {"error": "no tokens"}
    return {"ttft": stamps[0] - start, "gaps": [b - a for a, b in zip(stamps, stamps[1:], strict=False)],
            "tokens": usage or len(stamps)}


def run_level(port: int, model: str, prompts: list[str], c: int, per_client: int, max_tokens: int) -> dict:
    results: list[dict] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        for j in range(per_client):
            out = one_request(port, model, prompts[(i * per_client + j) % len(prompts)], max_tokens)
            with lock:
                results.append(out)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(c)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    ttft = sorted(r["ttft"] for r in ok)
    gaps = sorted(g for r in ok for g in r["gaps"])

    def pct(xs: list[float], q: float) -> float | None:
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None

    errors = [r["error"] for r in results if "error" in r]
    return {"concurrency": c, "requests": len(results), "errors": len(errors), "first_error": errors[:1],
            "tokens": sum(r["tokens"] for r in ok), "wall_s": round(wall, 2),
            "tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 1),
            "ttft_p50_s": pct(ttft, 0.5), "ttft_p95_s": pct(ttft, 0.95),
            "itl_p50_ms": None if not gaps else round(statistics.median(gaps) * 1000, 1)}


def main() -> None:
    from nanogemma.tokenizer import load_tokenizer
    from nanogemma.tools.bench import PROMPT_TEXT
    from nanogemma.weight_files import default_gguf_path

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--servers", default="nanogemma,llama-cpp-python,transformers")
    ap.add_argument("--model", default=None, help="a .gguf file (default: the official 270M GGUF)")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--slots", type=int, default=16, help="nanogemma's --slots")
    ap.add_argument("--quantize", default=None, help="nanogemma's --quantize")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--llama-python", default=None, help="an interpreter with llama_cpp.server (default: this one)")
    ap.add_argument("--start-timeout", type=float, default=300)
    ap.add_argument("--out", default=None, help="also write the results as JSON lines here")
    args = ap.parse_args()

    gguf = Path(args.model) if args.model else default_gguf_path()
    tok = load_tokenizer(gguf)
    words = ["Alpha", "Bravo", "Charlie", "Delta", "Echo", "Foxtrot", "Golf", "Hotel"]
    base = tok.decode(tok.encode(PROMPT_TEXT * (args.prompt_tokens // 40 + 2), add_bos=False)[:args.prompt_tokens - 2])
    prompts = [f"{w}. {base}" for w in words]
    rows = []
    for name in args.servers.split(","):
        port = free_port()
        cmd, model = server_command(name, gguf, port, args)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        log = tempfile.TemporaryFile("w+")  # not a pipe: a chatty server would fill it and block
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
        try:
            if not wait_ready(port, model, prompts[0], proc, args.start_timeout):
                log.seek(0)
                err = log.read()[-400:] if proc.poll() is not None else "no answer"
                rows.append({"server": name, "error": f"did not start: {err}"})
                print(json.dumps(rows[-1]), flush=True)
                continue
            for c in (int(x) for x in args.concurrency.split(",")):
                row = {"server": name, **run_level(port, model, prompts, c, args.requests_per_client, args.max_tokens)}
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print("\n| server | concurrency | output tokens/s | p50 TTFT s | p95 TTFT s | p50 ITL ms | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['server']} | – | – | – | – | – | {r['error'][:80]} |")
            continue
        f = lambda x: "–" if x is None else f"{x:.2f}"
        print(f"| {r['server']} | {r['concurrency']} | {r['tokens_per_s']} | {f(r['ttft_p50_s'])} | "
              f"{f(r['ttft_p95_s'])} | {r['itl_p50_ms']} | {r['errors']}/{r['requests']} |")


if __name__ == "__main__":
    main()
