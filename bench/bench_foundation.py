"""Foundation benchmark: load times of the official 270M model, and uncached decode next to transformers.

    .venv/bin/python bench/bench_foundation.py [--new-tokens 40]

1. Cold load (an empty cache folder: GGUF parse + dequantisation + tokenizer build) and warm load (the
   safetensors cache), each in a fresh Python process, timed from process start to a usable model.
2. Decode with the simplest loop (no KV cache: the whole sequence is recomputed for every token), next to
   transformers' `generate` (with its own cache) on the same GGUF, same prompt, same dtype, in this run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

LOAD = "import nanogemma; m, t = nanogemma.load(); m(__import__('torch').tensor([t.encode('Hi')]))"


def timed_process(env: dict) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", LOAD], check=True, env=env, capture_output=True)
    return time.perf_counter() - t


@torch.inference_mode()
def uncached_greedy(model, ids: list[int], n: int) -> list[int]:
    seq = torch.tensor([ids])
    for _ in range(n):
        nxt = model(seq, last_only=True)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    return seq[0, len(ids):].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--prompt", default="Once upon a time, in a small village by the sea,")
    args = ap.parse_args()
    from nanogemma.tools.bench import machine

    print(f"machine: {machine()}")

    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NANOGEMMA_CACHE": cache}
        cold = timed_process(env)
        warm = min(timed_process(env) for _ in range(3))
    print(f"load, process start to first logits: cold {cold:.1f} s, warm {warm:.2f} s (best of 3)")

    import nanogemma
    from nanogemma.weight_files import default_gguf_path

    model, tok = nanogemma.load()
    ids = tok.encode(args.prompt)
    uncached_greedy(model, ids, 2)
    t = time.perf_counter()
    ours = uncached_greedy(model, ids, args.new_tokens)
    ours_s = time.perf_counter() - t

    from transformers import AutoModelForCausalLM

    p = default_gguf_path()
    t = time.perf_counter()
    ref = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
    ref_load = time.perf_counter() - t
    x = torch.tensor([ids])
    with torch.inference_mode():
        ref.generate(x, max_new_tokens=2, do_sample=False)
        t = time.perf_counter()
        out = ref.generate(x, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
        ref_s = time.perf_counter() - t
    same = out[0, len(ids):].tolist() == ours
    n = args.new_tokens
    print(f"transformers load: {ref_load:.1f} s")
    print(f"decode, {len(ids)}-token prompt, {n} greedy tokens, float32:")
    print(f"  nanogemma, uncached loop  {n / ours_s:6.1f} tokens/s")
    print(f"  transformers generate     {n / ref_s:6.1f} tokens/s   (ratio {ref_s / ours_s:.2f}x)")
    print(f"  identical tokens: {same}")


if __name__ == "__main__":
    main()
