"""The flags of `nanogemma train`, generated from `TrainConfig`, and the command's entry point."""

from __future__ import annotations

import argparse
import os
import sys

from .config import FIELDS, _field_type, flag_help, preset_table

DESCRIPTION = """\
Train Gemma 3 from scratch on a prepared dataset, or continue training a model (--init-from).
Settings resolve as: defaults < --preset < --config FILE.toml < flags (each flag is --key=value; booleans
also as a bare --key). The defaults shown are what a run without flags uses: the default preset's
values where it sets them ("from preset small"). The resolved settings are saved as RUN_DIR/train.toml.
Presets:
"""

EPILOG = """\
examples:
  nanogemma prepare --source synthetic:20000 --tokenizer bpe:512 --out data/synthetic
  nanogemma train --data data/synthetic --preset small
  nanogemma train --data data/synthetic --out-dir runs/synthetic --resume      # continue, exactly
  nanogemma train --data data/stories-gemma --preset finetune                   # the official 270M weights
  torchrun --nproc_per_node=2 -m nanogemma train --data data/synthetic --grad-accum 1
  nanogemma generate --model runs/synthetic "Once upon a time"
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION + preset_table()
    p.epilog = EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--config", default=None, metavar="FILE.toml",
                   help="TOML file of settings (keys as below, with underscores; tables only group them)")
    for name in FIELDS:
        base, _ = _field_type(name)
        flag = "--" + name.replace("_", "-")
        kw: dict = {"dest": name, "default": argparse.SUPPRESS}
        if base is bool:
            kw.update(nargs="?", const="true", metavar="BOOL")
        else:
            kw.update(metavar={int: "N", float: "X", str: "TEXT"}[base])
        p.add_argument(flag, help=flag_help(name), **kw)
        if "_" in name:  # --max_steps=10 works as well as --max-steps=10
            p.add_argument("--" + name, help=argparse.SUPPRESS, **kw)


def run(args: argparse.Namespace) -> int:
    """`nanogemma train [--backend jax]`: resolve the settings, run the loop, say where the model is."""
    from .config import resolve

    flags = {k: v for k, v in vars(args).items() if k in FIELDS}
    cfg = resolve(flags, args.config)
    jax = getattr(args, "backend", "torch") == "jax"
    if jax:
        from ..jax.load import check_device
        from ..jax.loop import train

        if cfg.lora_rank:
            from ..errors import NanogemmaError

            raise NanogemmaError("LoRA (--lora-rank) is a PyTorch feature; drop --backend jax")
        if cfg.device not in ("auto", "cpu"):
            check_device(cfg.device)
    else:
        from .loop import train
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return 130 if result.interrupted else 0
    out = result.run_dir
    if result.interrupted:
        print(f"interrupted at step {result.step}: checkpoint written to {out / 'last'}; continue with\n"
              f"  nanogemma train{' --backend jax' if jax else ''} --out-dir {out} --resume", file=sys.stderr)
        return 130
    val = "" if result.val_loss is None else f", val loss {result.val_loss:.4f} (best {result.best_val_loss:.4f})"
    then = (f"nanogemma generate --model {out} [--backend jax]" if jax else
            f"nanogemma generate --model {out}; plot: nanogemma plot {out}; "
            f"export: nanogemma export {out} --to hf OUT_DIR")
    from .checkpoint import disk_usage

    print(f"done: {result.step} steps, {result.tokens:,} tokens{val}, {result.tokens_per_s:,.0f} tokens/s\n"
          f"model: {out}, {_size(disk_usage(out))} on disk (best and last share what is identical)  ({then})")
    return 0



def _size(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
