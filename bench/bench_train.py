"""Training tokens/s of `nanogemma train`'s step, next to transformers' Gemma3ForCausalLM on the same steps.

    .venv/bin/python bench/bench_train.py --data data/synthetic-bpe1024 --model small --threads 1
    .venv/bin/python bench/bench_train.py --data data/synthetic-gpt2 --model small --compile
    .venv/bin/python bench/bench_train.py --vocab 262144 --model small --batch-size 4   # random tokens

Both models start from the same weights and take the same steps (batches, schedule, clipping, fused AdamW,
dtype); steps alternate between the two so background load hits both alike; tokens/s comes from the median
step. The losses of the two runs must agree (the script exits 1 if they differ by more than --tolerance).
On a GPU the MFU of our step is printed as well (see nanogemma/train/monitor.py for the FLOP count).
See nanogemma/tools/train_bench.py for the method and docs/BENCHMARKS.md for results.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from nanogemma.data import read_meta, read_tokens
from nanogemma.tools.train_bench import run
from nanogemma.train.config import TrainConfig, model_config, model_shapes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="a prepared data folder (its train split and vocabulary)")
    p.add_argument("--vocab", type=int, default=None, help="without --data: random tokens of this vocabulary")
    p.add_argument("--model", default="small", choices=list(model_shapes()), help="model shape (default small)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per model (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: default)")
    p.add_argument("--compile", action="store_true", help="torch.compile our model (transformers stays eager)")
    p.add_argument("--no-compare", action="store_true", help="time nanogemma only")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed loss difference")
    p.add_argument("--json", default=None, help="append the result as one JSON line to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.data:
        tokens, vocab = read_tokens(args.data, "train"), read_meta(args.data)["tokenizer"]["vocab_size"]
    else:
        vocab = args.vocab or 768
        tokens = np.random.default_rng(0).integers(0, vocab, 2_000_000).astype(np.uint32)
    cfg = model_config(TrainConfig(model=args.model, seq_len=args.seq_len), vocab)  # room for --seq-len
    r = run(cfg, tokens, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
            dtype=getattr(torch, args.dtype), compare=not args.no_compare, compile=args.compile,
            warmup=args.warmup, device=args.device)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {r.threads} thread(s)"
    print(f"model {args.model} (vocab {cfg.vocab_size:,}), {r.tokens_per_step:,} tokens/step, {r.dtype}, {where}"
          f"{', ours compiled' if r.compiled else ''}")
    print("  attention: ours attention.py (sliding layers in W-wide key blocks, global causal SDPA)"
          + (f"; transformers {r.hf_attention}" if r.hf_attention else ""))
    print(f"  nanogemma     {r.ours_tokens_per_s:10,.0f} tokens/s" +
          (f"   MFU {r.ours_mfu:.1%}" if r.ours_mfu is not None else ""))
    if r.hf_tokens_per_s is not None:
        print(f"  transformers  {r.hf_tokens_per_s:10,.0f} tokens/s")
        print(f"  ratio {r.ratio:.2f}x; largest loss difference over {len(r.ours_losses)} steps "
              f"{r.max_loss_diff:.1e} (first loss {r.ours_losses[0]:.4f}, last {r.ours_losses[-1]:.4f})")
    if args.json:
        with open(args.json, "a", encoding="utf-8") as f:
            f.write(json.dumps({"model": args.model, "vocab": cfg.vocab_size, "data": args.data, **r.to_dict()}) + "\n")
    if r.max_loss_diff is not None and r.max_loss_diff > args.tolerance:
        print(f"losses differ by {r.max_loss_diff:.1e} > {args.tolerance}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
