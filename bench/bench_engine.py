"""The serving engine alone, without HTTP: a decode step's time and page faults, and a whole workload's speed.

    .venv/bin/python bench/bench_engine.py [--slots 16] [--prompt-tokens 128] [--steps 40] [--quantize int8]
        [--workload 32] [--max-tokens 64] [--step-tokens 64] [--malloc kept,default] [--rounds 2]

Two measurements, in one process per variant:

* **decode steps**: `--slots` requests of `--prompt-tokens` tokens are admitted and prefilled, then
  `--steps` decode steps (every slot decoding) are timed one by one: the median step, its body (the 18
  blocks) and head (logits and the greedy pick) apart, and the minor page faults per step (`getrusage`): a
  step whose large freed blocks malloc gave back to the system touches fresh pages, one fault per 4 KiB.
* **workload** (`--workload N`, 0 to skip): N requests (prompts as above, each with its own first words),
  `--max-tokens` greedy tokens each, submitted at once to an engine of `--slots` slots and served to the
  end: output tokens/s over the wall time, and the median / p95 time to first token.

`--malloc kept,default` runs each variant in its own process, alternated for `--rounds`: `kept` is the
loaders' `machine.keep_freed_memory` (fixed malloc thresholds), `default` is glibc's own dynamic thresholds
(the process starts with `MALLOC_TOP_PAD_` at its default value, which turns the setting off).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

DEFAULT_TOP_PAD = str(128 * 1024)  # glibc's own M_TOP_PAD: setting it changes nothing but disables the fix


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def prompts(tok, n: int, length: int) -> list[list[int]]:
    from nanogemma.tools.bench import PROMPT_TEXT

    base = tok.encode(PROMPT_TEXT * (length // 30 + 2), add_bos=False)
    return [(tok.encode(f"Request {i}:") + base)[:length] for i in range(n)]  # each its own first words


def measure(args) -> dict:
    import torch

    from nanogemma.engine import HEAD_ROWS, Engine, Request, _greedy_tokens
    from nanogemma.machine import keep_freed_memory
    from nanogemma.weights import load_for_inference

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_for_inference(args.model, dtype=args.dtype, quantize=args.quantize)
    out: dict = {"kept": keep_freed_memory(), "threads": torch.get_num_threads()}
    ps = prompts(tok, max(args.slots, args.workload), args.prompt_tokens)
    context = args.prompt_tokens + max(args.steps, args.max_tokens) + 8

    engine = Engine(model, slots=args.slots, max_len=context, step_tokens=args.step_tokens)
    reqs = [engine.submit(Request(p, args.steps + 4)) for p in ps[:args.slots]]
    while any(r.fed < len(r.prompt) for r in reqs):
        engine.step()
    decoding = [r for r in engine.active if r is not None]
    with torch.inference_mode():
        steps, bodies, heads, fault = [], [], [], []
        for _ in range(args.steps):
            f0, t0 = faults(), time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - t0)
            fault.append(faults() - f0)
        # The same step's two halves, apart (the engine's own `_decode` does both): body, then the head.
        rows = len(decoding)
        pos = torch.tensor([[engine.cache.lengths[r.slot]] for r in decoding])
        for _ in range(min(args.steps, 10)):
            engine.cache.plan_decode(rows)
            t0 = time.perf_counter()
            hidden = engine._step_fn(engine.pending[:rows, None], pos)
            t1 = time.perf_counter()
            for lo in range(0, rows, HEAD_ROWS):  # as `Engine._head` does
                _greedy_tokens(decoding[lo:lo + HEAD_ROWS], model.logits(hidden[lo:lo + HEAD_ROWS]).float())
            t2 = time.perf_counter()
            bodies.append(t1 - t0)
            heads.append(t2 - t1)
    out.update(step_ms=1e3 * statistics.median(steps), body_ms=1e3 * statistics.median(bodies),
               head_ms=1e3 * statistics.median(heads), faults_per_step=statistics.median(fault))
    del engine, reqs

    if args.workload:
        engine = Engine(model, slots=args.slots, max_len=context, step_tokens=args.step_tokens,
                        max_queue=args.workload)
        t0 = time.perf_counter()
        reqs = [engine.submit(Request(p, args.max_tokens)) for p in ps[:args.workload]]
        while engine.step():
            pass
        wall = time.perf_counter() - t0
        ttft = sorted(r.first_token_at - r.submitted for r in reqs)
        out.update(workload_tok_s=sum(len(r.tokens) for r in reqs) / wall, ttft_p50=statistics.median(ttft),
                   ttft_p95=ttft[min(len(ttft) - 1, round(0.95 * (len(ttft) - 1)))])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--quantize", default="int8", choices=["int8", "int8-wo", "none"])
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--workload", type=int, default=32, help="requests served to the end (0: skip)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--step-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--malloc", default="kept", help="comma-separated: kept, default")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # one variant, in this process
    args = ap.parse_args()
    if args.quantize == "none":
        args.quantize = None
    if args.json:
        print(json.dumps(measure(args)))
        return
    variants = [v.strip() for v in args.malloc.split(",") if v.strip()]
    if bad := [v for v in variants if v not in ("kept", "default")]:
        sys.exit(f"error: --malloc takes kept and/or default, got {', '.join(bad)}")
    print(f"# {args.quantize or args.dtype}, {args.slots} slots, {args.prompt_tokens}-token prompts, "
          f"workload {args.workload} x {args.max_tokens} tokens, step tokens {args.step_tokens}")
    print("| round | malloc | step ms | body ms | head ms | faults/step | workload tok/s | TTFT p50 / p95 s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    from nanogemma.machine import MALLOC_ENV

    for rnd in range(1, args.rounds + 1):
        for v in variants:
            env = dict(os.environ)
            for k in MALLOC_ENV:
                env.pop(k, None)
            if v == "default":
                env["MALLOC_TOP_PAD_"] = DEFAULT_TOP_PAD
            run = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--json"], env=env, capture_output=True,
                                 text=True)
            if run.returncode != 0:
                tail = (run.stderr.strip().splitlines() or ["no output"])[-1]
                print(f"| {rnd} | {v} | failed: {tail} |", flush=True)
                continue
            r = json.loads(run.stdout.strip().splitlines()[-1])
            work = (f"{r['workload_tok_s']:.1f} | {r['ttft_p50']:.2f} / {r['ttft_p95']:.2f}"
                    if "workload_tok_s" in r else "- | -")
            print(f"| {rnd} | {v}{'' if r['kept'] == (v == 'kept') else ' (setting not applied)'} | "
                  f"{r['step_ms']:.1f} | {r['body_ms']:.1f} | {r['head_ms']:.1f} | {r['faults_per_step']:.0f} | "
                  f"{work} |", flush=True)


if __name__ == "__main__":
    main()
