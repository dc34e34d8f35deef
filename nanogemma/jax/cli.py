"""`nanogemma generate --backend jax` and `nanogemma train --backend jax`: the commands' JAX halves.

The CLI parses the same flags for both backends and calls here when `--backend jax` is given; flags that
only mean something to PyTorch are refused with a one-line error rather than silently ignored.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import NanogemmaError


def _check_device(device: str) -> None:
    import jax

    if device.startswith("cuda") and jax.default_backend() == "cpu":
        raise NanogemmaError("--device cuda was asked for, but JAX sees no GPU (install jax[cuda12]); "
                             "use --device cpu")


def run_generate(args: argparse.Namespace) -> int:
    from ..cli import _read_prompts, _sampling, _unescape
    from .generation import generate_batch
    from .load import load

    for flag in ("quantize", "speculate"):
        if getattr(args, flag, None):
            raise NanogemmaError(f"--{flag} is a PyTorch feature; drop it or use --backend torch")
    prompts = _read_prompts(args)
    params = _sampling(args)
    if args.batch_size < 1:
        raise NanogemmaError(f"--batch-size must be >= 1, got {args.batch_size}")
    _check_device(args.device)
    model, tok = load(args.model, args.dtype)  # --compile is implied: the JAX path is always jitted
    stop = [_unescape(s) for s in args.stop]

    def emit(_row: int, piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    single = len(prompts) == 1 and not args.jsonl
    for first in range(0, len(prompts), args.batch_size):
        group = prompts[first:first + args.batch_size]
        texts = generate_batch(model, tok, group, args.max_new_tokens, params, add_bos=not args.no_bos,
                               stop=stop, stream=emit if single else None)
        for i, (prompt, text) in enumerate(zip(group, texts, strict=True)):
            if args.jsonl:
                print(json.dumps({"prompt": prompt, "completion": text}, ensure_ascii=False), flush=True)
            elif single:
                sys.stdout.write("\n")
            else:
                print(f"=== [{first + i + 1}] {prompt}", flush=True)
                print(text, end="\n\n", flush=True)
    return 0


def run_train(args: argparse.Namespace) -> int:
    from ..train.config import FIELDS, resolve
    from .loop import train

    flags = {k: v for k, v in vars(args).items() if k in FIELDS}
    cfg = resolve(flags, args.config)
    if cfg.device not in ("auto", "cpu"):
        _check_device(cfg.device)
    result = train(cfg)
    out = result.run_dir
    if result.interrupted:
        print(f"interrupted at step {result.step}: checkpoint written to {out / 'last'}; continue with\n"
              f"  nanogemma train --backend jax --out-dir {out} --resume", file=sys.stderr)
        return 130
    val = "" if result.val_loss is None else f", val loss {result.val_loss:.4f} (best {result.best_val_loss:.4f})"
    print(f"done: {result.step} steps, {result.tokens:,} tokens{val}, {result.tokens_per_s:,.0f} tokens/s\n"
          f"model: {out}  (nanogemma generate --model {out} [--backend jax])")
    return 0
