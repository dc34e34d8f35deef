"""`nanogemma train`, `plot` and `export`: a run made, drawn, and written out for other tools.

train's flags are generated from `nanogemma.train.TrainConfig`, and the run is `nanogemma.train.cli.run`.
"""

from __future__ import annotations

import argparse

from ..errors import NanogemmaError


def add_train(sub: argparse._SubParsersAction) -> None:
    from ..train.cli import add_arguments

    p = sub.add_parser("train", help="train from scratch or fine-tune, resumably; torchrun for several devices")
    add_arguments(p)  # one flag per training setting, generated from nanogemma.train.TrainConfig
    p.add_argument("--backend", default="torch", choices=["torch", "jax"],
                   help="torch (default) or jax: the same run with a jitted JAX step; checkpoints cross over")
    p.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from ..train.cli import run

    return run(args)


def add_plot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="PNG curves of a training run: loss, validation loss, learning rate",
                       description="Draw the training and validation loss and the learning rate of a run "
                                   "(from RUN_DIR/metrics.jsonl) into a PNG file.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder of `nanogemma train`")
    p.add_argument("--out", default=None, help="the PNG file to write (default RUN_DIR/curves.png)")
    p.add_argument("--title", default=None, help="the figure's title (default: the run folder's name)")
    p.set_defaults(run=_run_plot)


def _run_plot(args: argparse.Namespace) -> int:
    from ..tools.plot import plot_run

    print(plot_run(args.run_dir, args.out, args.title))
    return 0


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a model for transformers (--to hf) or llama.cpp / ollama (--to gguf)",
                       description="Export a model (a run folder of `nanogemma train`, RUN_DIR/last, or any "
                                   "model --model accepts) as config.json + model.safetensors + tokenizer "
                                   "files that transformers loads with from_pretrained (--to hf), or as one "
                                   ".gguf file with the tokenizer inside that llama.cpp runs (--to gguf).")
    p.add_argument("source", metavar="RUN_DIR", help="the model to export")
    p.add_argument("out_dir", metavar="OUT", help="the folder (hf) or .gguf file (gguf) to write")
    p.add_argument("--to", required=True, choices=["hf", "gguf", "peft"],
                   help="output format: hf (Hugging Face transformers; a LoRA run's adapters merged in), gguf "
                        "(llama.cpp, ollama) or peft (a LoRA run's adapters alone, for peft.PeftModel)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="hf: dtype of the written weights (default float32)")
    p.add_argument("--type", default=None, choices=["f32", "f16", "bf16", "q8_0"],
                   help="gguf: type of the weight matrices (default f32; norms always stay f32)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(run=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    if args.to == "gguf":
        from ..tools.export_gguf import export_gguf

        if args.dtype is not None:
            raise NanogemmaError("--dtype is for --to hf; a GGUF's weights are chosen with --type f32|f16|bf16|q8_0")
        print(export_gguf(args.source, args.out_dir, args.type or "f32", args.overwrite))
        return 0
    from ..tools.export import export_hf, export_peft

    if args.to == "peft":
        if args.dtype is not None or args.type is not None:
            raise NanogemmaError("--to peft writes the float32 adapters as trained; drop --dtype / --type")
        print(export_peft(args.source, args.out_dir, args.overwrite))
        return 0
    if args.type is not None:
        raise NanogemmaError("--type is for --to gguf; Hugging Face weights are chosen with --dtype")
    print(export_hf(args.source, args.out_dir, args.dtype or "float32", args.overwrite))
    return 0
