"""The `nanogemma` command line. It only parses arguments and calls into the library.

Each command group has its module: `generate` (generate, chat, bench), `data` (prepare, task), `training`
(train, plot, export), `evaluate` (eval, inspect, verify) and `serve`; `common` holds the flags several
groups declare. In each, a command has an `add_<name>` function that declares its flags and a `_run_<name>`
function that calls the library. Errors a user can cause surface as `NanogemmaError` and print as one line,
exit 1. The `add_` functions are alike in shape (`duplicates` pairs some): argparse declarations, kept one
per command so each reads on its own.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import NanogemmaError
from ..files import check_text, describe_os_error
from ..flags import OneLineParser
from .data import add_prepare, add_task
from .evaluate import add_eval, add_inspect, add_verify
from .generate import add_bench, add_chat, add_generate
from .serve import add_serve
from .training import add_export, add_plot, add_train


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = OneLineParser(prog="nanogemma", description="Gemma 3 from scratch in plain PyTorch.")
    parser.add_argument("--version", action="version", version=f"nanogemma {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_generate(sub)
    add_chat(sub)
    add_bench(sub)
    add_inspect(sub)
    add_verify(sub)
    add_eval(sub)
    add_prepare(sub)
    add_task(sub)
    add_train(sub)
    add_plot(sub)
    add_export(sub)
    add_serve(sub)
    return parser


def _check_arguments(args: argparse.Namespace) -> None:
    """Every text argument must be UTF-8 (a lone surrogate is a byte the shell passed that is not)."""
    for name, value in vars(args).items():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str):
                check_text(v, "--" + name.replace("_", "-") if name not in ("prompt", "source") else f"the {name}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:  # bare `nanogemma`: what it can do, not a usage error
        parser.print_help()
        return 0
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "generate" and not any(e.startswith("-") and e != "-" for e in extra):
        args.prompt = [*(args.prompt or []), *extra]  # prompts anywhere among the flags: "A" --max-new-tokens 4 "B"
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        _check_arguments(args)
        return args.run(args)
    except NanogemmaError as e:
        print(f"nanogemma: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("nanogemma: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:  # the filesystem's failures (full disk, read-only, a file in the way): one line
        print(f"nanogemma: error: {describe_os_error(e)}", file=sys.stderr)
        return 1
