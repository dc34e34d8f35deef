"""`nanogemma generate`, `chat` and `bench`: the commands that run a model on prompts.

generate and chat share the flags of speed (--quantize, --compile), sampling and speculation, and the
loading they imply (`_load_for_inference`); bench runs each mode in a fresh process (`tools/bench.py`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..decoding import DEFAULT_DRAFT_TOKENS, DEFAULT_DRAFT_VOCAB
from ..errors import NanogemmaError
from ..files import read_stdin, read_text, unescape
from ..flags import POSITIVE, SEED, device, number
from .common import add_adapter_flag, add_model_flags


def _add_speed_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", default=None, choices=["int8", "int8-wo"],
                   help="int8 weights for faster CPU decoding: int8 (dynamic, fastest on x86) or int8-wo "
                        "(weight-only); see docs/BENCHMARKS.md")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step over a static cache (CUDA graphs on a GPU)")


def _add_speculation_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speculate", action="store_true",
                   help="self-speculative decoding (one prompt at a time): draft tokens with a head over common "
                        "tokens, check several at once with the full head; greedy output is unchanged, "
                        "sampling keeps its distribution (see nanogemma/speculative.py)")
    p.add_argument("--lookup", action="store_true",
                   help="prompt-lookup decoding (one prompt at a time): draft the tokens that followed the last "
                        "earlier occurrence of the latest few tokens, check them in one pass through the model; "
                        "fastest on text that repeats or quotes its prompt; with --speculate too, the head drafts "
                        "where the text has nothing to copy (see nanogemma/speculative.py)")
    p.add_argument("--draft-tokens", type=POSITIVE, default=DEFAULT_DRAFT_TOKENS,
                   help=f"drafts per check with --speculate or --lookup (default {DEFAULT_DRAFT_TOKENS})")
    p.add_argument("--draft-vocab", type=POSITIVE, default=DEFAULT_DRAFT_VOCAB,
                   help="with --speculate, the draft head starts with the first N ids of the vocabulary, plus "
                        f"single characters and the prompt's tokens (default {DEFAULT_DRAFT_VOCAB})")


def _add_sampling_flags(p: argparse.ArgumentParser, temperature: float = 0.0, top_k: int | None = None,
                        top_p: float | None = None) -> None:
    p.add_argument("--temperature", type=number(float, 0), default=temperature,
                   help=f"0 for greedy decoding; > 0 samples from softmax(logits / T) (default {temperature})")
    p.add_argument("--top-k", type=POSITIVE, default=top_k, help="sample only among the K most likely tokens"
                   + (f" (default {top_k})" if top_k is not None else " (default: all)"))
    p.add_argument("--top-p", type=number(float, 0, 1, lo_open=True), default=top_p,
                   help="sample only among the smallest set of tokens whose probability reaches P"
                   + (f" (default {top_p})" if top_p is not None else " (default: off)"))
    p.add_argument("--min-p", type=number(float, 0, 1), default=None,
                   help="drop tokens less likely than P times the most likely one")
    p.add_argument("--repetition-penalty", type=number(float, 0, lo_open=True), default=1.0,
                   help="> 1 discourages tokens already in the text (default 1: off)")
    p.add_argument("--seed", type=SEED, default=None, help="random seed, for reproducible sampling")


def _sampling(args: argparse.Namespace):
    from ..decoding import SamplingParams

    return SamplingParams(args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty,
                          args.seed).validate()


def _load_for_inference(args: argparse.Namespace):
    """The model and tokenizer for generate and chat: int8 with --quantize, else packed (not with --compile)."""
    from ..weights import load_for_inference

    return load_for_inference(args.model, args.dtype, args.device, args.quantize, pack=not args.compile,
                              adapter=getattr(args, "adapter", None))


def _speculation(args: argparse.Namespace, tok):
    from ..speculative import Speculation

    if not (args.speculate or args.lookup):
        return None
    return Speculation.for_tokenizer(tok, args.draft_vocab, args.draft_tokens, lookup=args.lookup,
                                     head=args.speculate)


def add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue prompts, streaming the text to stdout",
                       description="Continue one or more prompts with a Gemma 3 model. One prompt streams its "
                                   "new text to stdout; several are generated together as a batch.")
    p.add_argument("prompt", nargs="*", default=None,
                   help="the prompt; several arguments are several prompts (else --prompt-file, --prompts-file, "
                        "else standard input)")
    p.add_argument("--prompt-file", default=None, help="read one prompt from this UTF-8 file")
    p.add_argument("--prompts-file", default=None,
                   help="read several prompts from this UTF-8 file, one prompt a line (empty lines skipped)")
    add_model_flags(p)
    add_adapter_flag(p)
    _add_speed_flags(p)
    p.add_argument("--max-new-tokens", type=POSITIVE, default=64,
                   help="most tokens to generate per prompt (default 64); generation also ends at the "
                        "model's context limit")
    _add_sampling_flags(p)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text appears (not printed); repeat for several")
    _add_speculation_flags(p)
    p.add_argument("--batch-size", type=POSITIVE, default=8, help="prompts generated together (default 8)")
    p.add_argument("--jsonl", action="store_true",
                   help="print one JSON object per prompt: {\"prompt\": ..., \"completion\": ...}")
    p.add_argument("--no-bos", action="store_true", help="do not prepend <bos> to the prompt")
    p.add_argument("--backend", default="torch", choices=["torch", "jax"],
                   help="torch (default) or jax: the same model in JAX, jitted (pip install 'nanogemma[jax]'); "
                        "its --seed draws from JAX's random stream, so sampled text differs from PyTorch's")
    p.add_argument("--stats", "--verbose", "-v", dest="stats", action="store_true",
                   help="print a timing summary to stderr: prompt and generated tokens, tokens/s")
    p.set_defaults(run=_run_generate)


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None and args.prompt_file is not None:
        raise NanogemmaError("give the prompt as an argument or with --prompt-file, not both")
    if args.prompt_file is not None:
        return read_text(args.prompt_file, "prompt file")
    if args.prompt is not None:
        return args.prompt
    if sys.stdin is not None and not sys.stdin.isatty():
        text = read_stdin()  # one trailing newline dropped, as shells do for $(...): `echo` adds it
        text = text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text
        if text:
            return text
    raise NanogemmaError("no prompt: pass it as an argument, with --prompt-file, or on standard input")


def _read_prompts(args: argparse.Namespace) -> list[str]:
    given = [n for n, v in (("arguments", args.prompt), ("--prompt-file", args.prompt_file),
                            ("--prompts-file", args.prompts_file)) if v]
    if len(given) > 1:
        raise NanogemmaError(f"give prompts one way only, not with both {given[0]} and {given[1]}")
    if args.prompts_file is not None:
        path = Path(args.prompts_file)
        prompts = [line for line in read_text(path, "prompts file").splitlines() if line.strip()]
        if not prompts:
            raise NanogemmaError(f"{path} holds no prompts (one prompt a line)")
        return prompts
    if args.prompt:
        return list(args.prompt)
    args.prompt = None
    return [_read_prompt(args)]


def _run_generate(args: argparse.Namespace) -> int:
    """One prompt streams to stdout; several print as blocks (or JSON lines) when their batch is done."""
    import json

    jax = getattr(args, "backend", "torch") == "jax"
    if jax:  # flags that mean something only to PyTorch are refused, not silently ignored
        for flag in ("quantize", "speculate", "lookup", "adapter"):
            if getattr(args, flag, None):
                raise NanogemmaError(f"--{flag} is a PyTorch feature; drop it or use --backend torch")
    prompts, params, stop = _read_prompts(args), _sampling(args), [unescape(s, "--stop") for s in args.stop]
    drafting = "--speculate" if args.speculate else "--lookup" if args.lookup else None
    if drafting and len(prompts) > 1:
        raise NanogemmaError(f"{drafting} decodes one prompt at a time, and {len(prompts)} were given; "
                             f"give one prompt, or drop {drafting} to generate them as a batch")
    if args.batch_size < 1:
        raise NanogemmaError(f"--batch-size must be >= 1, got {args.batch_size}")
    if jax:
        from ..jax.generation import generate_batch
        from ..jax.load import check_device, load

        check_device(args.device)
        model, tok = load(args.model, args.dtype)  # --compile is implied: the JAX path is always jitted
        extra = {}
    else:
        from ..generation import generate_batch

        model, tok = _load_for_inference(args)
        extra = {"compile": args.compile, "speculation": _speculation(args, tok)}

    def emit(_row: int, piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    if getattr(args, "compile", False):
        print("nanogemma: compiling the decode step (torch.compile: a minute or so the first time; torch keeps "
              "the compiled kernels in its on-disk cache for later runs)…", file=sys.stderr, flush=True)
    single = len(prompts) == 1 and not args.jsonl
    totals = {"prompt_tokens": 0, "tokens": 0, "prefill": 0.0, "decode": 0.0}
    for first in range(0, len(prompts), args.batch_size):
        group = prompts[first:first + args.batch_size]
        timing: dict = {}
        texts = generate_batch(model, tok, group, args.max_new_tokens, params, add_bos=not args.no_bos,
                               stop=stop, stream=emit if single else None, timing=timing, **extra)
        end = time.perf_counter()
        totals["prompt_tokens"] += timing["prompt_tokens"]
        totals["tokens"] += timing["tokens"]
        totals["prefill"] += (timing["first"] or end) - timing["start"]
        totals["decode"] += end - (timing["first"] or end)
        for i, (prompt, text) in enumerate(zip(group, texts, strict=True)):
            if args.jsonl:
                print(json.dumps({"prompt": prompt, "completion": text}, ensure_ascii=False), flush=True)
            elif single:
                sys.stdout.write("\n")
            else:
                print(f"=== [{first + i + 1}] {prompt}", flush=True)
                print(text, end="\n\n", flush=True)
    if args.stats:
        print(_timing_summary(totals, len(prompts)), file=sys.stderr, flush=True)
    return 0


def _timing_summary(t: dict, prompts: int) -> str:
    """llama.cpp-style: the prompt's tokens and their rate (prefill, up to the first new token), then the
    generated tokens and the decode rate (the tokens after the first, over the time after it)."""
    rate = lambda n, s: f"{n / s:,.1f} tokens/s" if s > 0 else "-"  # noqa: E731
    total = t["prefill"] + t["decode"]
    return (f"timing: {prompts} prompt(s), {t['prompt_tokens']:,} prompt tokens in {t['prefill']:.2f} s "
            f"({rate(t['prompt_tokens'], t['prefill'])}); {t['tokens']:,} generated tokens in {t['decode']:.2f} s "
            f"after the first ({rate(max(t['tokens'] - prompts, 0), t['decode'])}); total {total:.2f} s")


def add_chat(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="talk with a model in the terminal (Gemma's chat template)",
                       description="An interactive chat: each reply streams as it is generated, and the "
                                   "conversation stays in the KV cache, so earlier turns are not recomputed. "
                                   "Commands: /help, /reset, /exit. Replies are sampled as Gemma recommends "
                                   "(temperature 1.0, top-k 64, top-p 0.95; the sampling flags below change it). "
                                   "Made for an instruction-tuned model (--model google/gemma-3-270m-it); the "
                                   "bundled gemma3-270m is a base model, whose replies stop where it starts "
                                   "writing a new turn.")
    add_model_flags(p)
    add_adapter_flag(p)
    _add_speed_flags(p)
    p.add_argument("--system", default=None, help="a system prompt (folded into the first user turn, as Gemma does)")
    p.add_argument("--plain-text", action="store_true",
                   help="encode what you type as plain text: control tokens written in a message, such as "
                        "<start_of_turn>, stay text (by default they are parsed as the reference tokenizer does, "
                        "which lets a message forge turns)")
    _add_speculation_flags(p)
    _add_sampling_flags(p, temperature=1.0, top_k=64, top_p=0.95)
    p.add_argument("--max-new-tokens", type=POSITIVE, default=1024, help="longest reply in tokens (default 1024)")
    p.add_argument("--context", type=POSITIVE, default=None,
                   help="tokens of conversation kept (default 8192, at most the model's context)")
    p.set_defaults(run=_run_chat)


def _run_chat(args: argparse.Namespace) -> int:
    from ..chat import INSTRUCT_MODEL, TURN_STOPS, Chat, model_kind, run_chat

    params = _sampling(args)
    if args.context is not None and args.context < 16:
        raise NanogemmaError(f"--context must be at least 16 tokens, got {args.context}")
    from ..weight_files import resolve_model

    path = resolve_model(args.model)[1]
    tuned, why = model_kind(args.model, path)
    model, tok = _load_for_inference(args)
    mode = args.quantize or ("torch.compile" if args.compile else "packed")
    sampling = ("greedy" if params.greedy else f"temperature {params.temperature:g}"
                + (f", top-k {params.top_k}" if params.top_k else "") + (f", top-p {params.top_p:g}" if params.top_p
                                                                         else ""))
    print(f"nanogemma chat: {args.model or path.name} ({args.dtype}, {args.device}, {mode}"
          f"{', speculative' if args.speculate else ', prompt lookup' if args.lookup else ''}; {sampling}): "
          f"{'instruction-tuned' if tuned else 'a base model'} ({why})", file=sys.stderr, flush=True)
    if not tuned:
        print(f"  a base model continues text and was never taught to answer, so replies may ramble or repeat; "
              f"they stop where it starts a new turn or repeats a line three times. For a chat model: --model {INSTRUCT_MODEL}",
              file=sys.stderr, flush=True)
    if args.compile:
        print("nanogemma: compiling the decode step (torch.compile, at the first reply: a minute or so the first "
              "time; torch keeps the compiled kernels in its on-disk cache for later runs)…", file=sys.stderr,
              flush=True)
    chat = Chat(model, tok, system=args.system, params=params, max_new_tokens=args.max_new_tokens,
                context=args.context, compile=args.compile, speculation=_speculation(args, tok),
                stop=() if tuned else TURN_STOPS, stop_loops=not tuned, plain_text=args.plain_text)
    return run_chat(chat)


def add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="prefill and decode speed, time to first token and memory, per mode",
                       description="Measure prefill tokens/s, decode tokens/s, time to first token and peak "
                                   "memory for each mode (each in a fresh process), optionally against "
                                   "transformers on the same prompt.")
    p.add_argument("--model", default=None, help="as for generate (default: the official 270M GGUF)")
    p.add_argument("--device", default="cpu", type=device, help="cpu, cuda or cuda:N")
    p.add_argument("--modes", default=None,
                   help="comma-separated: float32 (prepacked weights), float32-unpacked (plain PyTorch "
                        "weights), bfloat16, int8, int8-wo, each optionally with +compile (torch.compile) and/or "
                        "+spec (self-speculative decoding) and/or +lookup (prompt lookup), e.g. int8+compile+spec "
                        "(default "
                        "float32,bfloat16,int8,int8+compile; on CUDA float32 and bfloat16, plain and +compile)")
    p.add_argument("--prompt-tokens", type=POSITIVE, default=128, help="prompt length in tokens (default 128)")
    p.add_argument("--new-tokens", type=POSITIVE, default=256, help="tokens to decode (default 256)")
    p.add_argument("--compare", default=None, choices=["transformers"],
                   help="also run transformers' generate (float32) on the same prompt and print ratios")
    p.add_argument("--peak-bandwidth", type=number(float, 0, lo_open=True), default=None,
                   help="the device's memory bandwidth in GB/s, to print the achieved fraction")
    p.add_argument("--threads", type=POSITIVE, default=None,
                   help="torch threads in every worker (default: PyTorch's choice, one per core)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON here")
    p.set_defaults(run=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from ..tools.bench import run

    return run(args.model, args.modes, args.device, args.prompt_tokens, args.new_tokens, args.threads, args.compare,
               args.peak_bandwidth, args.json)
