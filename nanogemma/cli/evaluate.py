"""`nanogemma eval`, `inspect` and `verify`: how good a model is, what it holds, and whether it matches
the reference.

eval measures loss on data (`tools/evaluate.py`), exact match on a task (`tools/task_eval.py`) and story
quality graded by a judge model (`tools/judge.py`), whose stories are kept as they come.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import NanogemmaError
from ..flags import POSITIVE, SEED, number
from .common import add_model_flags


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="loss, perplexity and accuracy on data; story quality graded by a judge LLM",
                       description="Evaluate a model: loss, perplexity and token accuracy on a prepared dataset "
                                   "or text files, and/or story quality scored by a language model through an "
                                   "OpenAI-compatible chat endpoint.")
    add_model_flags(p)
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

    from ..tools import judge
    from ..tools.evaluate import (
        dataset_tokens,
        evaluate_lm,
        load_model,
        text_encoder,
        text_tokens,
        write_json,
    )

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

    from ..tokenizer import load_tokenizer
    from ..tools import judge
    from ..tools.evaluate import write_json

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

    from ..tokenizer import load_tokenizer
    from ..tools.evaluate import load_model, write_json
    from ..tools.task_eval import evaluate_task

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


def add_inspect(sub: argparse._SubParsersAction) -> None:
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

    from ..tools.inspect_model import load_for_inspect, render, report

    if args.context is not None and args.context < 1:
        raise NanogemmaError(f"--context must be at least 1, got {args.context}")
    cfg, state, source = load_for_inspect(args.model)
    r = report(cfg, state, args.context, args.dtype)
    print(json.dumps(r, indent=2) if args.json else render(r, source))
    return 0


def add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="compare nanogemma with transformers, step by step, on a checkpoint",
                       description="Run nanogemma and the reference (transformers) on the same weights and tokens; "
                                   "print the largest difference after the embedding, each block's attention "
                                   "and MLP, the final norm and the logits. Exit 1 past the tolerance.")
    add_model_flags(p)
    p.add_argument("--prompt", default=None, help="the text to run (default: a built-in paragraph)")
    p.add_argument("--tokens", type=POSITIVE, default=None,
                   help="repeat the prompt up to N tokens (default: sliding window + 32, so sliding layers drop "
                        "keys, or the prompt's length if longer)")
    p.add_argument("--tolerance", type=number(float, 0), default=None,
                   help="largest allowed max|ours-ref| / max|ref| (default 1e-4 in float32, 1e-2 in bfloat16)")
    p.set_defaults(run=_run_verify)


def _run_verify(args: argparse.Namespace) -> int:
    import torch

    from ..tools.verify import DEFAULT_PROMPT, verify

    report = verify(args.model, args.prompt or DEFAULT_PROMPT, args.tokens, getattr(torch, args.dtype),
                    args.device, args.tolerance)
    print(report.table())
    return 0 if report.passed else 1
