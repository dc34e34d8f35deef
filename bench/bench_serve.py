"""`nanogemma serve` against the servers people would pick instead: same machine, model file, prompts, run.

    .venv/bin/python bench/bench_serve.py [--servers nanogemma,llama-cpp-python,transformers]
        [--concurrency 1,4,16,64] [--requests-per-client 2] [--max-tokens 64] [--prompt-tokens 128]
        [--dtype float32|bfloat16] [--quantize int8|int8-wo] [--slots 16] [--step-tokens 256] [--prefill-share 0.5]
        [--long-prompt 4000] [--system-prompt 512 --prefix-cache 8,0]

Each server is started in its own process on the official 270M GGUF, serves every concurrency level, then is
stopped. A level runs `c` clients at once, each sending `--requests-per-client` streamed `/v1/completions`
requests one after another (the same prompts for every server: the bench prompt cut to `--prompt-tokens`
tokens, greedy, `max_tokens` fixed). Every request's prompt begins with its own words (a name and the
level, client and request numbers), so no two share more than a few tokens and a server's prompt cache
cannot skip work the others do, except on the system prompt when one is asked for. Per level it reports
aggregate output tokens/s (all tokens over the level's wall time) and its ratio to the concurrency-1 level,
p50/p95 time to first token, p50/p95 gap between streamed tokens (ITL), and errors. Output tokens are the
server's own `usage` where it reports one, else the streamed chunks with text. Times are taken by the client
from the moment it sends a request: a request that waits for a free slot (more clients than `--slots`) or
for a peer that serves one request at a time has its queueing counted in its TTFT.

`--long-prompt N`: every level runs twice, without and then with one extra N-token prompt (another text)
sent once each of the `c` clients has its first token, i.e. while they decode. It reports the other
streams' p95 ITL in both runs, and in the second also over the gaps that end while the long prompt is being
prefilled (from its sending to its first token), and its own TTFT: whether a long prompt stalls the others.

`--system-prompt N` puts the same N-token text before every prompt (a shared system prompt). With
`--prefix-cache 8,0` nanogemma is started once per value: the TTFT with stored prefixes against without.

Peers: `llama-cpp-python`'s OpenAI server (`python -m llama_cpp.server`; needs llama-cpp-python with its
server extras in the interpreter given by --llama-python), and `transformers serve` (the `transformers` CLI
next to the interpreter; GGUF weights named `<folder>:<file>`; with its continuous batching unless
`--transformers-batching none`). A peer that fails to start is reported as
such, not left out silently.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
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


def nanogemma_label(args, prefix_cache: int | None) -> str:
    """The row name of one nanogemma variant: its mode and engine settings."""
    mode = args.quantize or args.dtype
    label = f"nanogemma {mode}{'+compile' if args.compile else ''} slots {args.slots} step {args.step_tokens}"
    if args.prefill_share is not None:
        label += f" prefill-share {args.prefill_share:g}"
    return label if prefix_cache is None else f"{label} prefix-cache {prefix_cache}"


def server_command(name: str, gguf: Path, port: int, args, prefix_cache: int | None = None) -> tuple[list[str], str]:
    """(command, model name to send) for one server."""
    py = sys.executable
    if name == "nanogemma":
        cmd = [py, "-m", "nanogemma", "serve", "--model", str(gguf), "--port", str(port), "--slots",
               str(args.slots), "--max-queue", "1024", "--context", str(args.context), "--log-level", "warning",
               "--dtype", args.dtype, "--step-tokens", str(args.step_tokens)]
        if args.prefill_share is not None:
            cmd += ["--prefill-share", str(args.prefill_share)]
        if args.quantize:
            cmd += ["--quantize", args.quantize]
        if args.compile:
            cmd += ["--compile"]
        if prefix_cache is not None:
            cmd += ["--prefix-cache", str(prefix_cache)]
        return cmd, gguf.stem
    if name == "llama-cpp-python":
        return [args.llama_python or py, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port),
                "--n_ctx", str(args.context), "--n_threads", str(args.threads), "--model_alias", "gguf",
                # by default a new request cuts the one being served short: its clients would get a few tokens
                "--interrupt_requests", "False"], "gguf"
    if name == "transformers":
        cli = str(Path(py).with_name("transformers"))
        folder = hf_copy(gguf)
        batching = ["--continuous-batching"] if args.transformers_batching == "continuous" else []
        return [cli, "serve", str(folder), "--port", str(port), "--device", "cpu", "--host", "127.0.0.1",
                "--dtype", args.transformers_dtype, *batching], str(folder)
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


def one_request(port: int, model: str, prompt: str, max_tokens: int, timeout: float = 600,
                on_first: Callable[[], None] | None = None) -> dict:
    """One streamed completion: its TTFT, the time stamps of its streamed tokens, its token count."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    stamps: list[float] = []
    usage = None
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
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
                if len(stamps) == 1 and on_first is not None:
                    on_first()
        conn.close()
    except (OSError, ValueError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    if not stamps:
        return {"error": "no tokens"}
    return {"start": start, "ttft": stamps[0] - start, "stamps": stamps, "tokens": usage or len(stamps)}


def gaps(results: list[dict], t0: float = -math.inf, t1: float = math.inf) -> list[float]:
    """The gaps between streamed tokens of these requests that end in [t0, t1], sorted."""
    return sorted(b - a for r in results for a, b in itertools.pairwise(r["stamps"]) if t0 <= b <= t1)


def pct(xs: list[float], q: float) -> float | None:
    """The q-quantile of sorted `xs` (the value at rank q * n, as the tables have always used), None if empty."""
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


def ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 1)


def run_level(port: int, model: str, prompt_for: Callable[[int, int], str], c: int, per_client: int, max_tokens: int,
              long_prompt: str | None = None, long_max_tokens: int = 8, timeout: float = 600) -> dict:
    """`c` clients at once, `per_client` requests each (client i's j-th prompt: `prompt_for(i, j)`); with
    `long_prompt`, one more request with it, sent once every client has its first token (so the others are
    decoding while it is prefilled)."""
    results: list[dict] = []
    lock = threading.Lock()
    first = threading.Semaphore(0)  # released once per first token

    def client(i: int) -> None:
        for j in range(per_client):
            out = one_request(port, model, prompt_for(i, j), max_tokens, timeout,
                              on_first=first.release if j == 0 else None)
            if "error" in out and j == 0:
                first.release()  # a failed client must not hold the long prompt back forever
            with lock:
                results.append(out)

    long: dict = {}

    def long_client() -> None:
        for _ in range(c):
            first.acquire()
        long.update(one_request(port, model, long_prompt, long_max_tokens, timeout))

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(c)]
    if long_prompt is not None:
        threads.append(threading.Thread(target=long_client))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    ttft = sorted(r["ttft"] for r in ok)
    all_gaps = gaps(ok)
    errors = [r["error"] for r in results if "error" in r]
    row = {"concurrency": c, "requests": len(results), "errors": len(errors), "first_error": errors[:1],
           "tokens": sum(r["tokens"] for r in ok), "wall_s": round(wall, 2),
           "tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 1),
           "ttft_p50_s": pct(ttft, 0.5), "ttft_p95_s": pct(ttft, 0.95),
           "itl_p50_ms": None if not all_gaps else round(statistics.median(all_gaps) * 1000, 1),
           "itl_p95_ms": ms(pct(all_gaps, 0.95))}
    if long_prompt is not None:
        row["long_error"] = long.get("error")
        if "error" not in long:  # the others' gaps that end while the long prompt waits for its first token
            during = gaps(ok, long["start"], long["start"] + long["ttft"])
            row |= {"long_ttft_s": round(long["ttft"], 2), "itl_p95_during_long_ms": ms(pct(during, 0.95)),
                    "gaps_during_long": len(during)}
    return row


def summary(rows: list[dict]) -> str:
    """The markdown table, then per server the throughput ratio to one stream, the long-prompt check and the
    prefix-cache gain, from the rows `main` printed as JSON."""
    f = lambda x, d=2: "–" if x is None else f"{x:.{d}f}"  # noqa: E731
    one = {r["server"]: r for r in rows if r.get("concurrency") == 1 and not r.get("long_prompt")}
    out = ["| server | concurrency | output tokens/s | vs c=1 | p50 TTFT s | p95 TTFT s | p50 ITL ms | p95 ITL ms "
           "| errors |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['server']} | – | – | – | – | – | – | – | {r['error'][:80]} |")
            continue
        base = one.get(r["server"])
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base and base["tokens_per_s"] else "–"
        level = f"{r['concurrency']} + {r['long_prompt']}-token prompt" if r.get("long_prompt") else r["concurrency"]
        out.append(f"| {r['server']} | {level} | {r['tokens_per_s']} | {ratio} | {f(r['ttft_p50_s'])} | "
                   f"{f(r['ttft_p95_s'])} | {f(r['itl_p50_ms'], 1)} | {f(r['itl_p95_ms'], 1)} | "
                   f"{r['errors']}/{r['requests']} |")
    out.append("")
    for name, base in one.items():
        if base["itl_p50_ms"]:
            out.append(f"{name}: batch-1 decode {1000 / base['itl_p50_ms']:.1f} tokens/s (1 / p50 ITL at "
                       f"concurrency 1), {base['tokens_per_s']} output tokens/s at concurrency 1")
        for r in rows:
            if r.get("server") == name and r.get("concurrency", 1) > 1 and not r.get("long_prompt") \
                    and "error" not in r and base["tokens_per_s"]:
                out.append(f"  {r['concurrency']} streams: {r['tokens_per_s'] / base['tokens_per_s']:.2f}x the "
                           f"concurrency-1 throughput, p95 TTFT {f(r['ttft_p95_s'])} s")
    for r in rows:
        if r.get("long_prompt"):
            plain = next((p for p in rows if p.get("server") == r["server"] and not p.get("long_prompt")
                          and p.get("concurrency") == r["concurrency"] and "error" not in p), None)
            if r.get("long_error"):
                out.append(f"{r['server']}, c={r['concurrency']}: the {r['long_prompt']}-token prompt failed: "
                           f"{r['long_error'][:120]}")
                continue
            out.append(f"{r['server']}, c={r['concurrency']}, one {r['long_prompt']}-token prompt mid-run: the "
                       f"others' p95 ITL {f(plain and plain['itl_p95_ms'], 1)} ms without it, "
                       f"{f(r['itl_p95_ms'], 1)} ms with it, {f(r.get('itl_p95_during_long_ms'), 1)} ms while it "
                       f"was prefilled ({r.get('gaps_during_long', 0)} gaps); its TTFT {f(r.get('long_ttft_s'))} s")
    by_level: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        if r.get("prefix_cache") is not None and "error" not in r and not r.get("long_prompt"):
            by_level.setdefault((r["base_server"], r["concurrency"]), {})[r["prefix_cache"]] = r
    for (name, c), variants in by_level.items():
        if 0 in variants and len(variants) > 1:
            on = max(variants)
            out.append(f"{name}, c={c}, shared system prompt: p50 TTFT {f(variants[on]['ttft_p50_s'])} s with "
                       f"--prefix-cache {on}, {f(variants[0]['ttft_p50_s'])} s with 0; p95 "
                       f"{f(variants[on]['ttft_p95_s'])} / {f(variants[0]['ttft_p95_s'])} s")
    return "\n".join(out)


class Prompts:
    """The bench's prompts: `--prompt-tokens` of the bench text after a header of its own for every request
    (so none shares a prefix with another), after the shared system prompt if any; and the long prompt,
    another text, its header naming its level."""

    WORDS = ["Alpha", "Bravo", "Charlie", "Delta", "Echo", "Foxtrot", "Golf", "Hotel"]

    def __init__(self, tok, prompt_tokens: int, system_tokens: int = 0, long_tokens: int = 0):
        from nanogemma.tools.bench import PROMPT_TEXT

        def cut(text: str, n: int) -> str:
            return tok.decode(tok.encode(text * (n // 30 + 2), add_bos=False)[:max(n, 1)])

        self.base = cut(PROMPT_TEXT, prompt_tokens - 11)  # <bos> and the header take about 11 tokens
        self.system = cut(SYSTEM_TEXT, system_tokens) + "\n\n" if system_tokens else ""
        self.long_text = cut(LONG_TEXT, long_tokens - 8) if long_tokens else None

    def client(self, tag: str, i: int, j: int) -> str:
        return f"{self.system}{self.WORDS[i % len(self.WORDS)]} {tag}.{i}.{j}. {self.base}"

    def long(self, tag: str) -> str | None:
        return None if self.long_text is None else f"Zulu {tag}. {self.long_text}"


SYSTEM_TEXT = ("You are a careful assistant for a maritime museum. Answer in plain English, cite the exhibit "
               "when you can, keep answers short, and say so when you do not know. ")
LONG_TEXT = ("Tides rise and fall twice a day as the moon pulls the oceans; harbours were built where the "
             "water stayed deep at the lowest tide, and pilots learned every sandbank of their own coast. ")


def main(argv: list[str] | None = None) -> None:
    from nanogemma.tokenizer import load_tokenizer
    from nanogemma.weight_files import default_gguf_path

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--servers", default="nanogemma,llama-cpp-python,transformers")
    ap.add_argument("--model", default=None, help="a .gguf file (default: the official 270M GGUF)")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--slots", type=int, default=16, help="nanogemma's --slots")
    ap.add_argument("--step-tokens", type=int, default=256, help="nanogemma's --step-tokens")
    ap.add_argument("--prefill-share", type=float, default=None,
                    help="nanogemma's --prefill-share (default: the server's own, 0.5; 0: no limit)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="nanogemma's --dtype")
    ap.add_argument("--quantize", default=None, choices=["int8", "int8-wo"], help="nanogemma's --quantize")
    ap.add_argument("--compile", action="store_true", help="nanogemma's --compile")
    ap.add_argument("--prefix-cache", default=None,
                    help="nanogemma's --prefix-cache; a comma list (e.g. 8,0) starts it once per value")
    ap.add_argument("--system-prompt", type=int, default=0, help="tokens of a system prompt shared by all prompts")
    ap.add_argument("--long-prompt", type=int, default=0,
                    help="also run each level with one extra prompt of this many tokens sent mid-run")
    ap.add_argument("--long-max-tokens", type=int, default=8, help="max_tokens of the long prompt")
    ap.add_argument("--context", type=int, default=1024, help="context per request (raised to fit --long-prompt)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--transformers-batching", default="continuous", choices=["continuous", "none"],
                    help="transformers serve with its continuous batching (paged attention) or one request at a time")
    ap.add_argument("--transformers-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="transformers serve's --dtype")
    ap.add_argument("--llama-python", default=None, help="an interpreter with llama_cpp.server (default: this one)")
    ap.add_argument("--start-timeout", type=float, default=300)
    ap.add_argument("--request-timeout", type=float, default=600, help="seconds a client waits for a reply")
    ap.add_argument("--out", default=None, help="also write the results as JSON lines here")
    args = ap.parse_args(argv)
    need = args.system_prompt + args.prompt_tokens + args.max_tokens + 16
    args.context = max(args.context, need, args.long_prompt + args.long_max_tokens + 16)

    gguf = Path(args.model) if args.model else default_gguf_path()
    prompts = Prompts(load_tokenizer(gguf), args.prompt_tokens, args.system_prompt, args.long_prompt)
    levels = [int(x) for x in args.concurrency.split(",")]
    runs = []  # (server, label, prefix cache)
    for name in args.servers.split(","):
        if name == "nanogemma":
            for pc in ([None] if args.prefix_cache is None else [int(x) for x in args.prefix_cache.split(",")]):
                runs.append((name, nanogemma_label(args, pc), pc))
        else:
            runs.append((name, name, None))
    rows = []
    for name, label, prefix_cache in runs:
        port = free_port()
        cmd, model = server_command(name, gguf, port, args, prefix_cache)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        log = tempfile.TemporaryFile("w+")  # not a pipe: a chatty server would fill it and block
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
        try:
            if not wait_ready(port, model, prompts.client("warm-up", 0, 0), proc, args.start_timeout):
                log.seek(0)
                err = log.read()[-400:] if proc.poll() is not None else "no answer"
                rows.append({"server": label, "error": f"did not start: {err}"})
                print(json.dumps(rows[-1]), flush=True)
                continue
            for c in levels:
                for with_long in ([False, True] if args.long_prompt else [False]):
                    tag = f"{c}{'L' if with_long else ''}"  # fresh prompts for each run of each level
                    level = run_level(port, model, lambda i, j, tag=tag: prompts.client(tag, i, j), c,
                                      args.requests_per_client, args.max_tokens,
                                      prompts.long(tag) if with_long else None, args.long_max_tokens,
                                      args.request_timeout)
                    row = {"server": label, "base_server": name, "prefix_cache": prefix_cache,
                           "system_prompt": args.system_prompt, "long_prompt": args.long_prompt if with_long else 0,
                           **level}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    if args.out:
        tmp = Path(args.out + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.rename(args.out)
    print("\n" + summary(rows))


if __name__ == "__main__":
    main()
