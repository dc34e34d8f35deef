"""The `nanogemma` command line. It only parses arguments and calls into the library.

Each sub-command has an `_add_<name>` function that declares its flags and a `_run_<name>` function that
calls the library (or `_lazy(module, name)` where one library call is the whole command). Errors a user can
cause surface as `NanogemmaError` and print as one line, exit 1. The `_add_` functions are alike in shape
(`duplicates` pairs some): argparse declarations, kept one per command so each reads on its own.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

from .decoding import DEFAULT_DRAFT_TOKENS, DEFAULT_DRAFT_VOCAB
from .errors import NanogemmaError
from .files import check_text, describe_os_error, read_stdin, read_text, unescape
from .flags import NON_NEGATIVE, POSITIVE, SEED, OneLineParser, device, number


def _lazy(module: str, name: str):
    """A command whose whole work is `module.name(args)`, imported when it runs (so --help stays quick)."""
    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(f".{module}", __package__), name)(args)
    return run


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


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="a preset name (gemma3-270m, the default), a Hugging Face repository id "
                        "(google/gemma-3-270m-it: downloaded once into the hub cache), a .gguf file, a Hugging "
                        "Face folder (config.json + safetensors + tokenizer) or a nanogemma run folder")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights and activations dtype (float16 overflows in Gemma 3; not offered)")
    p.add_argument("--device", default="cpu", type=device, help="cpu, cuda or cuda:N")


def _add_adapter_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a LoRA adapter merged into the model after loading: a peft folder (adapter_config.json "
                        "+ adapter_model.safetensors) or a run of `nanogemma train --lora-rank N`")


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
    p.add_argument("--draft-tokens", type=POSITIVE, default=DEFAULT_DRAFT_TOKENS,
                   help=f"drafts per check with --speculate (default {DEFAULT_DRAFT_TOKENS})")
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
    from .decoding import SamplingParams

    return SamplingParams(args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty,
                          args.seed).validate()


def _load_for_inference(args: argparse.Namespace):
    """The model and tokenizer for generate and chat: int8 with --quantize, else packed (not with --compile)."""
    from .weights import load_for_inference

    return load_for_inference(args.model, args.dtype, args.device, args.quantize, pack=not args.compile,
                              adapter=getattr(args, "adapter", None))


def _speculation(args: argparse.Namespace, tok):
    from .speculative import Speculation

    return Speculation.for_tokenizer(tok, args.draft_vocab, args.draft_tokens) if args.speculate else None


def _unescape(text: str, flag: str = "--stop") -> str:
    """Shells pass "\n" as two characters; stop strings usually mean the newline."""
    return unescape(text, flag)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue prompts, streaming the text to stdout",
                       description="Continue one or more prompts with a Gemma 3 model. One prompt streams its "
                                   "new text to stdout; several are generated together as a batch.")
    p.add_argument("prompt", nargs="*", default=None,
                   help="the prompt; several arguments are several prompts (else --prompt-file, --prompts-file, "
                        "else standard input)")
    p.add_argument("--prompt-file", default=None, help="read one prompt from this UTF-8 file")
    p.add_argument("--prompts-file", default=None,
                   help="read several prompts from this UTF-8 file, one prompt a line (empty lines skipped)")
    _add_model_flags(p)
    _add_adapter_flag(p)
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
        for flag in ("quantize", "speculate", "adapter"):
            if getattr(args, flag, None):
                raise NanogemmaError(f"--{flag} is a PyTorch feature; drop it or use --backend torch")
    prompts, params, stop = _read_prompts(args), _sampling(args), [_unescape(s) for s in args.stop]
    if args.speculate and len(prompts) > 1:
        raise NanogemmaError(f"--speculate decodes one prompt at a time, and {len(prompts)} were given; "
                             "give one prompt, or drop --speculate to generate them as a batch")
    if args.batch_size < 1:
        raise NanogemmaError(f"--batch-size must be >= 1, got {args.batch_size}")
    if jax:
        from .jax.generation import generate_batch
        from .jax.load import check_device, load

        check_device(args.device)
        model, tok = load(args.model, args.dtype)  # --compile is implied: the JAX path is always jitted
        extra = {}
    else:
        from .generation import generate_batch

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


def _add_chat(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="talk with a model in the terminal (Gemma's chat template)",
                       description="An interactive chat: each reply streams as it is generated, and the "
                                   "conversation stays in the KV cache, so earlier turns are not recomputed. "
                                   "Commands: /help, /reset, /exit. Replies are sampled as Gemma recommends "
                                   "(temperature 1.0, top-k 64, top-p 0.95; the sampling flags below change it). "
                                   "Made for an instruction-tuned model (--model google/gemma-3-270m-it); the "
                                   "bundled gemma3-270m is a base model, whose replies stop where it starts "
                                   "writing a new turn.")
    _add_model_flags(p)
    _add_adapter_flag(p)
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
    from .chat import INSTRUCT_MODEL, TURN_STOPS, Chat, model_kind, run_chat

    params = _sampling(args)
    if args.context is not None and args.context < 16:
        raise NanogemmaError(f"--context must be at least 16 tokens, got {args.context}")
    from .weight_files import resolve_model

    path = resolve_model(args.model)[1]
    tuned, why = model_kind(args.model, path)
    model, tok = _load_for_inference(args)
    mode = args.quantize or ("torch.compile" if args.compile else "packed")
    sampling = ("greedy" if params.greedy else f"temperature {params.temperature:g}"
                + (f", top-k {params.top_k}" if params.top_k else "") + (f", top-p {params.top_p:g}" if params.top_p
                                                                         else ""))
    print(f"nanogemma chat: {args.model or path.name} ({args.dtype}, {args.device}, {mode}"
          f"{', speculative' if args.speculate else ''}; {sampling}): "
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


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="prefill and decode speed, time to first token and memory, per mode",
                       description="Measure prefill tokens/s, decode tokens/s, time to first token and peak "
                                   "memory for each mode (each in a fresh process), optionally against "
                                   "transformers on the same prompt.")
    p.add_argument("--model", default=None, help="as for generate (default: the official 270M GGUF)")
    p.add_argument("--device", default="cpu", type=device, help="cpu, cuda or cuda:N")
    p.add_argument("--modes", default=None,
                   help="comma-separated: float32 (prepacked weights), float32-unpacked (plain PyTorch "
                        "weights), bfloat16, int8, int8-wo, each optionally with +compile (torch.compile) and/or "
                        "+spec (self-speculative decoding), e.g. int8+compile+spec (default "
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
    from .tools.bench import run

    return run(args.model, args.modes, args.device, args.prompt_tokens, args.new_tokens, args.threads, args.compare,
               args.peak_bandwidth, args.json)


def _add_prepare(sub: argparse._SubParsersAction) -> None:
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
    from .data import prepare

    delimiter = _unescape(args.delimiter, "--delimiter") if args.delimiter else args.delimiter  # or a rule name
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


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="config, parameters, KV-cache bytes and FLOPs of a model",
                       description="Show a model's config, its parameters per component, the KV-cache bytes per "
                                   "token by layer type and at a chosen context, and the FLOPs per token.")
    p.add_argument("--model", default=None,
                   help="a preset name (gemma3-270m, the default, gemma3-1b, -4b, -12b, -27b, tiny: other presets "
                        "need no weights), a Hugging Face repository id, a .gguf file, a Hugging Face folder or a "
                        "nanogemma run folder")
    p.add_argument("--context", type=POSITIVE, default=None,
                   help="context length for the KV-cache and FLOPs figures (default: the model's maximum)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="number format for the weight and KV-cache bytes (default float32)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(run=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> int:
    import json

    from .tools.inspect_model import load_for_inspect, render, report

    if args.context is not None and args.context < 1:
        raise NanogemmaError(f"--context must be at least 1, got {args.context}")
    cfg, state, source = load_for_inspect(args.model)
    r = report(cfg, state, args.context, args.dtype)
    print(json.dumps(r, indent=2) if args.json else render(r, source))
    return 0


def _add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="compare nanogemma with transformers, step by step, on a checkpoint",
                       description="Run nanogemma and the reference (transformers) on the same weights and tokens; "
                                   "print the largest difference after the embedding, each block's attention "
                                   "and MLP, the final norm and the logits. Exit 1 past the tolerance.")
    _add_model_flags(p)
    p.add_argument("--prompt", default=None, help="the text to run (default: a built-in paragraph)")
    p.add_argument("--tokens", type=POSITIVE, default=None,
                   help="repeat the prompt up to N tokens (default: sliding window + 32, so sliding layers drop "
                        "keys, or the prompt's length if longer)")
    p.add_argument("--tolerance", type=number(float, 0), default=None,
                   help="largest allowed max|ours-ref| / max|ref| (default 1e-4 in float32, 1e-2 in bfloat16)")
    p.set_defaults(run=_run_verify)


def _run_verify(args: argparse.Namespace) -> int:
    import torch

    from .tools.verify import DEFAULT_PROMPT, verify

    report = verify(args.model, args.prompt or DEFAULT_PROMPT, args.tokens, getattr(torch, args.dtype),
                    args.device, args.tolerance)
    print(report.table())
    return 0 if report.passed else 1


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="loss, perplexity and accuracy on data; story quality graded by a judge LLM",
                       description="Evaluate a model: loss, perplexity and token accuracy on a prepared dataset "
                                   "or text files, and/or story quality scored by a language model through an "
                                   "OpenAI-compatible chat endpoint.")
    _add_model_flags(p)
    g = p.add_argument_group("loss, perplexity and token accuracy")
    g.add_argument("--data", default=None, help="a prepared dataset folder (made by `nanogemma prepare`)")
    g.add_argument("--split", default="val", help="which split of --data (default val)")
    g.add_argument("--text", nargs="+", default=None, metavar="FILE",
                   help="UTF-8 text files (one document each), tokenized with the model's tokenizer")
    g.add_argument("--seq-len", type=POSITIVE, default=None, help="tokens of context per window (default 512)")
    g.add_argument("--batch-size", type=POSITIVE, default=1, help="windows per forward pass (default 1)")
    g.add_argument("--max-tokens", type=POSITIVE, default=None, help="evaluate at most this many tokens")
    t = p.add_argument_group("held-out exact match on a task (greedy generation through the chat template)")
    t.add_argument("--task", default=None, metavar="FILE",
                   help="JSON lines of conversations (e.g. from `nanogemma task extract`): the model answers "
                        "each one's last user turn; reports the share of replies equal to the reference")
    t.add_argument("--task-limit", type=POSITIVE, default=None, help="score only the first N records")
    t.add_argument("--task-batch", type=POSITIVE, default=8, help="records generated together (default 8)")
    j = p.add_argument_group("story quality, judged by a language model")
    j.add_argument("--judge-url", default=None,
                   help="OpenAI-compatible endpoint, e.g. https://api.openai.com/v1 (POSTs to /chat/completions)")
    j.add_argument("--judge-model", default=None, help="the judge's model name at that endpoint")
    j.add_argument("--judge-key-env", default=None,
                   help="environment variable holding the API key (default: OPENAI_API_KEY if set)")
    j.add_argument("--prompts", default=None,
                   help="prompt file: JSON lines {\"prompt\": ..., \"instruction\": ...} or one prompt per line "
                        "(default: 10 built-in story prompts, 4 with instructions)")
    j.add_argument("--num-prompts", type=POSITIVE, default=None, help="use the first N prompts (default all)")
    j.add_argument("--samples", type=POSITIVE, default=2, help="stories generated per prompt (default 2)")
    j.add_argument("--max-new-tokens", type=POSITIVE, default=200, help="story length limit in tokens (default 200)")
    j.add_argument("--temperature", type=number(float, 0), default=1.0, help="sampling temperature (default 1.0)")
    j.add_argument("--top-k", type=POSITIVE, default=64, help="top-k sampling (default 64)")
    j.add_argument("--top-p", type=number(float, 0, 1, lo_open=True), default=0.95, help="top-p sampling (default 0.95)")
    j.add_argument("--seed", type=SEED, default=0, help="first sampling seed; story i uses seed + i (default 0)")
    j.add_argument("--judge-timeout", type=number(float, 0, lo_open=True), default=120.0,
                   help="seconds to wait for one judge reply; a judge that does not answer in time is not asked "
                        "again for that story (default 120)")
    j.add_argument("--judge-deadline", type=number(float, 0), default=3600.0,
                   help="seconds all judging may take; stories left when it passes are not judged, and what "
                        "was judged is kept (default 3600; 0: no limit)")
    p.add_argument("--out", default=None,
                   help="write results as JSON here (judging: default eval_judge.json in the run or model "
                        "folder; judged stories are appended to OUT.partial.jsonl as they come)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(run=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    """LM metrics (--data / --text) and/or judged story quality (--judge-url)."""
    import torch

    from .tools import judge
    from .tools.evaluate import dataset_tokens, evaluate_lm, load_model, text_encoder, text_tokens, write_json

    if args.task:
        return _run_task_eval(args)
    if not (args.data or args.text or args.judge_url):
        raise NanogemmaError("nothing to evaluate: give --data FOLDER or --text FILE... for loss and perplexity, "
                             "or --judge-url URL --judge-model NAME for judged story quality")
    if args.data and args.text:
        raise NanogemmaError("give --data or --text, not both")
    if args.judge_url and not args.judge_model:
        raise NanogemmaError("--judge-url needs --judge-model (the model name the endpoint should use)")
    if args.samples < 1 or (args.num_prompts is not None and args.num_prompts < 1):
        raise NanogemmaError("--samples and --num-prompts must be at least 1")
    # Check the judge set-up before spending minutes on loading and generating.
    client = prompts = None
    if args.judge_url:
        client = judge.JudgeClient(args.judge_url, args.judge_model, judge.api_key_from_env(args.judge_key_env),
                                   timeout=args.judge_timeout)
        prompts = judge.read_prompts(args.prompts)[: args.num_prompts]
    model, path = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    progress = not args.no_progress
    results: dict = {"model": str(path)}
    if args.data or args.text:
        if args.data:
            tokens, source = dataset_tokens(args.data, args.split), f"{args.data} ({args.split})"
        else:
            tokens, source = text_tokens(args.text, text_encoder(path)), ", ".join(args.text)
        lm = evaluate_lm(model, tokens, args.seq_len, args.batch_size, args.max_tokens, source, progress)
        print(lm.table())
        results["lm"] = lm.to_dict()
    out = args.out or (_judge_out(args.model, path) if client is not None else None)
    if client is not None:
        return _judge(args, model, path, client, prompts, results, out, progress)
    if out:
        write_json(out, results)
        print(f"results written to {out}")
    return 0


def _judge_out(model: str | None, path: Path) -> str:
    """Where judged results go by default: beside the run (in a run or model folder, next to a model file
    given by path), not wherever the command happened to run; the bundled model's go to the current folder."""
    if model is None or not Path(model).expanduser().exists():
        return "eval_judge.json"
    return str(path / "eval_judge.json" if path.is_dir() else path.with_name(f"{path.stem}.eval_judge.json"))


def _judge(args: argparse.Namespace, model, path: Path, client, prompts, results: dict, out: str,
           progress: bool) -> int:
    """Judged story quality: each story appended to OUT.partial.jsonl as it is judged, OUT written at the end
    (or, on Ctrl-C or the deadline, with what was judged, marked incomplete)."""
    import json
    import time

    from .tokenizer import load_tokenizer
    from .tools import judge
    from .tools.evaluate import write_json

    gen = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
           "top_p": args.top_p, "seed": args.seed}
    partial = Path(f"{out}.partial.jsonl")
    partial.parent.mkdir(parents=True, exist_ok=True)
    stories: list = []
    interrupted, abort = False, None
    if args.judge_deadline:
        client.deadline = time.monotonic() + args.judge_deadline
    with open(partial, "w", encoding="utf-8") as log:
        def keep(rec: dict) -> None:
            log.write(json.dumps(rec, ensure_ascii=False) + "\n")
            log.flush()

        try:
            judge.judge_stories(judge.story_generator(model, load_tokenizer(path), **gen), client, prompts,
                                args.samples, progress, on_record=keep, results=stories)
        except KeyboardInterrupt:
            interrupted = True
        except NanogemmaError as e:  # every request failing: stop, but keep what the judge said
            abort = e
    summary = judge.summarize(stories)
    complete = not interrupted and abort is None and len(stories) == len(prompts) * args.samples
    if abort is None:
        print(("\n" if "lm" in results else "") + judge.summary_table(summary))
    results["judge"] = {"url": client.url, "model": client.model, "generation": gen,
                        "prompts": len(prompts), "samples_per_prompt": args.samples, "complete": complete,
                        "summary": summary, "stories": stories}
    write_json(out, results)
    partial.unlink(missing_ok=True)
    if abort is not None:
        raise NanogemmaError(f"{abort}; the replies are in {out}")
    if interrupted:
        print(f"interrupted: the {len(stories)} judged stories are in {out} (marked incomplete)", file=sys.stderr)
        return 130
    print(f"results written to {out}" + ("" if complete else f" ({len(stories)} of "
                                                              f"{len(prompts) * args.samples} stories: incomplete)"))
    if summary["scored"] == 0:
        raise NanogemmaError(f"no judge reply could be read as scores (first error: {judge.first_error(stories)}); "
                             f"the replies are in {out}")
    return 0


def _run_task_eval(args: argparse.Namespace) -> int:
    import torch

    from .tokenizer import load_tokenizer
    from .tools.evaluate import load_model, write_json
    from .tools.task_eval import evaluate_task

    model, path = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    r = evaluate_task(model.eval(), load_tokenizer(path), args.task, batch_size=args.task_batch,
                      limit=args.task_limit, progress=not args.no_progress)
    print(r.table())
    for e in r.examples[:2]:
        print(f"  reference: {e['reference']}\n  output:    {e['output']}")
    if args.out:
        write_json(args.out, {"model": str(path), "task": r.to_dict()})
        print(f"results written to {args.out}")
    return 0


def _add_task(sub: argparse._SubParsersAction) -> None:
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
    from .data.tasks import write_task

    train, test = write_task(args.name, args.out, args.train, args.test, args.seed)
    print(f"wrote {train} ({args.train:,} records) and {test} ({args.test:,} records)")
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    from .train.cli import add_arguments

    p = sub.add_parser("train", help="train from scratch or fine-tune, resumably; torchrun for several devices")
    add_arguments(p)  # one flag per training setting, generated from nanogemma.train.TrainConfig
    p.add_argument("--backend", default="torch", choices=["torch", "jax"],
                   help="torch (default) or jax: the same run with a jitted JAX step; checkpoints cross over")
    p.set_defaults(run=_lazy("train.cli", "run"))


def _add_plot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="PNG curves of a training run: loss, validation loss, learning rate",
                       description="Draw the training and validation loss and the learning rate of a run "
                                   "(from RUN_DIR/metrics.jsonl) into a PNG file.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder of `nanogemma train`")
    p.add_argument("--out", default=None, help="the PNG file to write (default RUN_DIR/curves.png)")
    p.add_argument("--title", default=None, help="the figure's title (default: the run folder's name)")
    p.set_defaults(run=_run_plot)


def _run_plot(args: argparse.Namespace) -> int:
    from .tools.plot import plot_run

    print(plot_run(args.run_dir, args.out, args.title))
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
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
        from .tools.export_gguf import export_gguf

        if args.dtype is not None:
            raise NanogemmaError("--dtype is for --to hf; a GGUF's weights are chosen with --type f32|f16|bf16|q8_0")
        print(export_gguf(args.source, args.out_dir, args.type or "f32", args.overwrite))
        return 0
    from .tools.export import export_hf, export_peft

    if args.to == "peft":
        if args.dtype is not None or args.type is not None:
            raise NanogemmaError("--to peft writes the float32 adapters as trained; drop --dtype / --type")
        print(export_peft(args.source, args.out_dir, args.overwrite))
        return 0
    if args.type is not None:
        raise NanogemmaError("--type is for --to gguf; Hugging Face weights are chosen with --dtype")
    print(export_hf(args.source, args.out_dir, args.dtype or "float32", args.overwrite))
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching, and a chat page",
                       description="Serve the model over HTTP: POST /v1/chat/completions and /v1/completions "
                                   "(streaming or not), GET /v1/models, /health, /metrics, and a chat page at /. "
                                   "Requests share the model in slots (continuous batching). Needs the [serve] extra.")
    _add_model_flags(p)
    _add_adapter_flag(p)
    p.add_argument("--quantize", default=None, choices=["int8", "int8-wo"],
                   help="int8 weights (int8-wo keeps batched answers equal to lone ones; see nanogemma/engine.py)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step over all slots (CUDA graphs on a GPU)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=number(int, 0, 65535), default=8000, help="port (default 8000)")
    p.add_argument("--slots", type=POSITIVE, default=8, help="requests served at once (default 8)")
    p.add_argument("--max-queue", type=NON_NEGATIVE, default=64,
                   help="requests that may wait for a slot; more are answered 429 (default 64)")
    p.add_argument("--context", type=POSITIVE, default=None,
                   help="tokens per request, prompt plus reply (default 8192, at most the model's context)")
    p.add_argument("--step-tokens", type=POSITIVE, default=256,
                   help="tokens one engine step may feed, decode and prompt chunks together (default 256)")
    p.add_argument("--prefix-cache", type=NON_NEGATIVE, default=8,  # engine.DEFAULT_PREFIX_CACHE
                   help="prompt prefixes kept for reuse, e.g. a shared system prompt (default 8, 0: off; "
                        "each holds a slot's cache rows)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ routes")
    p.add_argument("--timeout", type=number(float, 0, lo_open=True), default=600.0, help="seconds a request may take (default 600)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(run=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from .server import serve

    return serve(args.model, args.host, args.port, args.dtype, args.device, args.quantize, args.slots,
                 args.max_queue, args.api_key, args.context, args.step_tokens, args.timeout,
                 compile=args.compile, log_level=args.log_level, prefix_cache=args.prefix_cache,
                 adapter=args.adapter)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = OneLineParser(prog="nanogemma", description="Gemma 3 from scratch in plain PyTorch.")
    parser.add_argument("--version", action="version", version=f"nanogemma {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate(sub)
    _add_chat(sub)
    _add_bench(sub)
    _add_inspect(sub)
    _add_verify(sub)
    _add_eval(sub)
    _add_prepare(sub)
    _add_task(sub)
    _add_train(sub)
    _add_plot(sub)
    _add_export(sub)
    _add_serve(sub)
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
