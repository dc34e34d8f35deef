"""`nanogemma prepare` and `task`: text into token files, and a fine-tuning task written offline."""

from __future__ import annotations

import argparse
import sys

from ..files import unescape
from ..flags import POSITIVE, SEED, number


def add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="tokenize a text dataset into train.bin / val.bin for training",
                       description="Tokenize a text dataset into flat token files (train.bin, val.bin) and "
                                   "meta.json, in parallel. Safe to interrupt: re-running finishes the job, "
                                   "and re-running a finished job does nothing.")
    p.add_argument("--source", action="append", default=None, metavar="SOURCE",
                   help="a Hugging Face dataset (default roneneldan/TinyStories; hf:NAME forces the hub), "
                        ".txt / .jsonl / .parquet files or folders (also .gz; repeat --source for several), "
                        "or synthetic:N for N stories of the built-in story grammar")
    p.add_argument("--out", default=None, help="output folder (default data/<source>-<tokenizer>)")
    p.add_argument("--tokenizer", default="gpt2",
                   help="gpt2 (default), gemma, or bpe:N (a byte-level BPE of N tokens trained on the data)")
    p.add_argument("--tokenizer-file", default=None,
                   help="local gpt2.tiktoken, used when tiktoken cannot download it (or $NANOGEMMA_GPT2_TIKTOKEN)")
    p.add_argument("--text-column", default="text", help="text column (Parquet, datasets) or field (JSON lines)")
    p.add_argument("--delimiter", default=None,
                   help="how text files split into documents: auto (the default: text with blank lines, such "
                        "as prose or code, is one document per file; text with <|endoftext|> markers is split "
                        "at them; text without blank lines is one document per line), file, paragraph, line, "
                        r"or a separator string such as '<|endoftext|>' (escapes such as \n are understood)")
    p.add_argument("--glob", default=None, metavar="PATTERN",
                   help="in folders, read only the files matching this pattern (e.g. '*.py' or 'src/**/*.md'; "
                        "default: .jsonl, .parquet and every file that is UTF-8 text by its content)")
    p.add_argument("--split", default="train",
                   help="the training split's name (default train): a folder of that name, or a file name "
                        "starting or ending with it")
    p.add_argument("--val-split", default=None,
                   help="the validation split's name (default: validation, valid, val or dev as a folder name "
                        "or the first or last word of a file name); none: ignore names, hold out documents")
    p.add_argument("--hf-config", default=None, help="configuration (subset) of a Hugging Face dataset")
    p.add_argument("--val-fraction", type=number(float, 0, 1, lo_open=True), default=0.01,
                   help="share of documents held out for validation when the source has no validation split")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the held-out choice and of synthetic stories")
    p.add_argument("--workers", type=POSITIVE, default=None, help="worker processes (default: one per core)")
    p.add_argument("--format", default="auto", choices=["auto", "text", "chat"],
                   help="chat: .jsonl conversations ({\"messages\": [...]} or {\"prompt\", \"completion\"}) "
                        "rendered with Gemma 3's chat template, with a loss mask on the replies; auto (default) "
                        "detects them from the first record")
    p.add_argument("--context", type=POSITIVE, default=2048,
                   help="chat data: the longest conversation kept, in tokens; longer ones are reported and "
                        "skipped (default 2048)")
    p.add_argument("--overwrite", action="store_true", help="replace a folder prepared with other arguments")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_prepare)


def _run_prepare(args: argparse.Namespace) -> int:
    from ..data import prepare

    delimiter = unescape(args.delimiter, "--delimiter") if args.delimiter else args.delimiter  # or a rule name
    r = prepare(args.source, args.out, args.tokenizer, tokenizer_file=args.tokenizer_file,
                text_column=args.text_column, delimiter=delimiter, split=args.split, val_split=args.val_split,
                hf_config=args.hf_config, val_fraction=args.val_fraction, seed=args.seed, workers=args.workers,
                overwrite=args.overwrite, progress=not args.no_progress and sys.stderr.isatty(), glob=args.glob,
                format=args.format, context=args.context)
    if r.skipped:
        print(f"{r.folder} is already prepared with these arguments: nothing to do")
        return 0
    m, s = r.meta, r.meta["splits"]
    print(f"{r.folder}: train {s['train']['tokens']:,} tokens ({s['train']['documents']:,} documents), "
          f"val {s['val']['tokens']:,} tokens ({s['val']['documents']:,} documents); {m['tokenizer']['spec']}, "
          f"{m['tokenizer']['vocab_size']:,} ids as {m['dtype']}; {r.tokens_per_second:,.0f} tokens/s")
    files = m["source"].get("files") or []
    if files:
        from collections import Counter

        per_split = Counter(f["split"] for f in files)
        rules = Counter(f["documents"] for f in files if "documents" in f)
        order = sorted(per_split, key=lambda s: {"train": 0, "val": 1}.get(s, 2))
        counts = ", ".join(f"{per_split[s]:,} {s}" for s in order)
        print(f"files: {counts}"
              + (" (splits by folder and file names; --val-split none to hold out instead)" if per_split["val"]
                 else "") + (f"; text: {', '.join(f'{r} ({n:,} files)' for r, n in rules.items())} "
                             "(--delimiter to choose)" if rules else ""))
    print(f"validation: {m['validation']}")
    if "chat" in m:
        c = m["chat"]
        print(f"chat: {c['conversations']:,} conversations ({c['bad_records']:,} bad records skipped), the longest "
              f"{c['longest']:,} tokens; loss on {s['train']['loss_tokens']:,} training tokens (the replies)")
    if "synthetic" in m:
        print(f"entropy floor of this grammar: {m['synthetic']['entropy_nats_per_token']:.4f} nats/token")
    return 0


def add_task(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("task", help="write a fine-tuning task with checkable answers (train/test JSON lines)",
                       description="Generate a task offline: OUT/train.jsonl and OUT/test.jsonl of conversations "
                                   "in `messages` form. Fine-tune with `nanogemma prepare --source OUT/train.jsonl "
                                   "--tokenizer gemma` and `nanogemma train --preset sft`, score with "
                                   "`nanogemma eval --task OUT/test.jsonl`.")
    p.add_argument("name", choices=["extract"], help="extract: orders in free sentences -> one line of JSON")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--train", type=POSITIVE, default=4000, help="training records (default 4000)")
    p.add_argument("--test", type=POSITIVE, default=200, help="held-out test records (default 200)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of both files (default 0)")
    p.set_defaults(run=_run_task)


def _run_task(args: argparse.Namespace) -> int:
    from ..data.tasks import write_task

    train, test = write_task(args.name, args.out, args.train, args.test, args.seed)
    print(f"wrote {train} ({args.train:,} records) and {test} ({args.test:,} records)")
    return 0
