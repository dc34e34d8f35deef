"""The `nanogemma` command line. It only parses arguments and calls into the library.

Each sub-command has an `_add_<name>` function that declares its flags and a `_run_<name>` function that
calls the library. Errors a user can cause surface as `NanogemmaError` and print as one line, exit 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import NanogemmaError


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None and args.prompt_file is not None:
        raise NanogemmaError("give the prompt as an argument or with --prompt-file, not both")
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise NanogemmaError(f"prompt file not found: {path}")
        return path.read_text(encoding="utf-8")
    if args.prompt is not None:
        return args.prompt
    if not sys.stdin.isatty():
        return sys.stdin.read()
    raise NanogemmaError("no prompt: pass it as an argument, with --prompt-file, or on standard input")


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="a preset name (gemma3-270m, the default), a .gguf file, a Hugging Face folder "
                        "(config.json + safetensors + tokenizer) or a nanogemma run folder")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights and activations dtype (float16 overflows in Gemma 3; not offered)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt, streaming the text to stdout",
                       description="Continue a prompt with a Gemma 3 model, streaming the new text to stdout.")
    p.add_argument("prompt", nargs="?", default=None, help="the prompt (else --prompt-file, else standard input)")
    p.add_argument("--prompt-file", default=None, help="read the prompt from this UTF-8 file")
    _add_model_flags(p)
    p.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 for greedy decoding (default); > 0 samples from softmax(logits / T)")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the K most likely tokens")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample only among the smallest set of tokens whose probability reaches P")
    p.add_argument("--seed", type=int, default=None, help="random seed, for reproducible sampling")
    p.add_argument("--no-bos", action="store_true", help="do not prepend <bos> to the prompt")
    p.set_defaults(run=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    import torch

    from .generate import generate
    from .weights import load

    prompt = _read_prompt(args)
    model, tok = load(args.model, dtype=getattr(torch, args.dtype), device=args.device)

    def emit(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    generate(model, tok, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
             top_k=args.top_k, top_p=args.top_p, seed=args.seed, add_bos=not args.no_bos, stream=emit)
    sys.stdout.write("\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanogemma", description="Gemma 3 from scratch in plain PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except NanogemmaError as e:
        print(f"nanogemma: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("nanogemma: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
