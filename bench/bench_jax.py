"""Decode speed of the JAX path next to the PyTorch path: same weights, prompt, batch 1, greedy, float32.

    .venv/bin/python bench/bench_jax.py [--prompt-tokens 128] [--new-tokens 128] [--rounds 3] [--json FILE]

Both backends run in this one process on the official 270M model, measured the way `nanogemma bench`
measures: each backend's public `Decoder` (KV cache, greedy, stop tokens ignored) decodes `--new-tokens`
tokens after the prompt; decode tokens/s is taken over the steady state (steps 3 onwards), prefill
tokens/s from the prompt's pass through the cache. The rounds alternate PyTorch and JAX, so load on a
shared machine falls on both alike; each backend's best round and median are printed. A first JAX round
compiles (its time is reported separately as the compile cost, and not counted). The two backends' tokens
are compared too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch


def decode_torch(model, ids: list[int], n: int) -> tuple[list[int], list[float], float]:
    from nanogemma.generation import Decoder, Session

    with torch.inference_mode():
        session = Session(model, 1, len(ids) + 1)
        t = time.perf_counter()
        session.prefill([ids]).argmax(-1)
        prefill_s = time.perf_counter() - t
    tokens, stamps = [], []
    for row in Decoder(model, [ids], n, stop_ids=set()):
        stamps.append(time.perf_counter())
        tokens.append(row[0])
    return tokens, stamps, prefill_s


def decode_jax(model, ids: list[int], n: int) -> tuple[list[int], list[float], float]:
    from nanogemma.jax.generation import Decoder, Session

    session = Session(model, 1, len(ids) + n)  # the Decoder's shapes: compiled once, shared
    t = time.perf_counter()
    np.asarray(session.prefill([ids]).argmax(-1))
    prefill_s = time.perf_counter() - t
    tokens, stamps = [], []
    for row in Decoder(model, [ids], n, stop_ids=set()):
        stamps.append(time.perf_counter())
        tokens.append(row[0])
    return tokens, stamps, prefill_s


def steady_tok_s(stamps: list[float]) -> float:
    warm = stamps[2:]  # the first two steps are left out, as in `nanogemma bench`
    return (len(warm) - 1) / (warm[-1] - warm[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    import jax

    import nanogemma
    import nanogemma.jax
    from nanogemma.tools.bench import machine, prompt_ids

    print(f"machine: {machine()}; jax {jax.__version__} ({jax.default_backend()})")
    t = time.perf_counter()
    tmodel, tok = nanogemma.load()
    t_load = time.perf_counter() - t
    t = time.perf_counter()
    jmodel, _ = nanogemma.jax.load()
    j_load = time.perf_counter() - t
    ids = prompt_ids(tok, args.prompt_tokens)

    t = time.perf_counter()
    decode_jax(jmodel, ids, 4)  # compiles prefill and decode for these shapes
    compile_s = time.perf_counter() - t
    runs: dict[str, list[dict]] = {"torch": [], "jax": []}
    outputs = {}
    for _ in range(args.rounds):
        for name, fn, model in (("torch", decode_torch, tmodel), ("jax", decode_jax, jmodel)):
            tokens, stamps, prefill_s = fn(model, ids, args.new_tokens)
            outputs[name] = tokens
            runs[name].append({"decode_tok_s": steady_tok_s(stamps), "prefill_tok_s": len(ids) / prefill_s})
    same = sum(a == b for a, b in zip(outputs["torch"], outputs["jax"], strict=True))

    rows = {}
    for name, rs in runs.items():
        dec = [r["decode_tok_s"] for r in rs]
        pre = [r["prefill_tok_s"] for r in rs]
        rows[name] = {"decode_best": max(dec), "decode_median": statistics.median(dec), "prefill_best": max(pre)}
    print(f"load: PyTorch {t_load:.1f} s, JAX {j_load:.1f} s (weights cache warm); JAX compile {compile_s:.1f} s")
    print(f"prompt {len(ids)} tokens, {args.new_tokens} new tokens, batch 1, greedy, float32, {args.rounds} rounds")
    print("| backend | decode tok/s (best) | decode tok/s (median) | prefill tok/s (best) |")
    print("|---|---|---|---|")
    for name, label in (("torch", "PyTorch (eager)"), ("jax", "JAX (jit)")):
        r = rows[name]
        print(f"| {label} | {r['decode_best']:.1f} | {r['decode_median']:.1f} | {r['prefill_best']:.0f} |")
    ratio = rows["jax"]["decode_median"] / rows["torch"]["decode_median"]
    print(f"JAX / PyTorch decode (medians): {ratio:.2f}x; greedy tokens identical: {same}/{args.new_tokens}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"machine": machine(), "rows": rows, "runs": runs, "compile_s": compile_s,
                       "identical_tokens": same, "prompt_tokens": len(ids), "new_tokens": args.new_tokens}, f,
                      indent=2)


if __name__ == "__main__":
    main()
