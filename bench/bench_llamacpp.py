"""nanogemma's modes against llama.cpp on the same GGUF and the same prompt ids, run after run.

    .venv/bin/python bench/bench_llamacpp.py --llama-python /path/to/venv/bin/python [--rounds 3]

llama.cpp is not a dependency of this project: install `llama-cpp-python` in any environment (it compiles
llama.cpp for this CPU) and pass that environment's interpreter. Each round runs every nanogemma mode (in a
fresh process, as `nanogemma bench` does) and then llama.cpp, on the 128-token bench prompt, 256 greedy
tokens, stop tokens ignored, both with the same number of threads. Decode tokens/s is measured the same way
for both: wall time over tokens after the first two (`nanogemma.tools.bench.steady_step`). Alternating the
contenders round by round keeps a shared machine's drift out of the ratios; the medians are printed.
Prefill is the 128-token prompt alone, best of three, for both. Quality beside speed: each mode's greedy
tokens against float32's, and the perplexity of each mode's weights (and of llama.cpp's Q4_K_M) on the same
ids of a held-out text (`--quality-text`, default docs/ARCHITECTURE.md, written after the model's release).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess

LLAMA_WORKER = """
import json, sys, time
from llama_cpp import Llama
spec = json.loads(sys.argv[1])
draft = None
if spec.get("lookup_tokens"):  # llama.cpp's own prompt lookup, the peer of nanogemma's +lookup
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
    draft = LlamaPromptLookupDecoding(max_ngram_size=3, num_pred_tokens=spec["lookup_tokens"])
llm = Llama(model_path=spec["model"], n_ctx=len(spec["ids"]) + spec["new_tokens"] + 8,
            n_threads=spec["threads"], n_batch=512, verbose=False, draft_model=draft)
prefill = []
for _ in range(3):  # the prompt alone, best of three, as nanogemma's worker times its prefill
    llm.reset()
    t = time.perf_counter()
    llm.eval(spec["ids"])
    prefill.append(time.perf_counter() - t)
stamps, tokens = [], []
for t in llm.generate(spec["ids"], top_k=1, temp=0.0, reset=True):
    stamps.append(time.perf_counter())
    tokens.append(t)
    if len(tokens) == spec["new_tokens"]:
        break
print(json.dumps({"stamps": stamps, "tokens": tokens, "prefill_tok_s": len(spec["ids"]) / min(prefill)}))
"""

# Perplexity of the same ids through llama.cpp: every position's logits in one evaluation.
LLAMA_PPL_WORKER = """
import json, sys
import numpy as np
from llama_cpp import Llama
spec = json.loads(sys.argv[1])
ids = spec["ids"]
llm = Llama(model_path=spec["model"], n_ctx=len(ids) + 8, n_batch=len(ids), n_ubatch=len(ids),
            n_threads=spec["threads"], logits_all=True, verbose=False)
llm.eval(ids)
logits = np.asarray(llm.scores[:len(ids) - 1], dtype=np.float64)
top = logits.max(axis=1, keepdims=True)
logp = logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
print(json.dumps({"nll": float(-logp[np.arange(len(ids) - 1), ids[1:]].mean())}))
"""


def perplexities(model_path: str, ids: list[int], modes: list[str], llama_python: str, threads: int) -> dict:
    """Perplexity of each mode's model (quantization is what changes it; compiling and speculation do not)
    and of llama.cpp on the same ids, as exp(mean negative log-likelihood of each next token)."""
    import math

    import torch

    from nanogemma.tools.bench import parse_mode
    from nanogemma.weights import load_for_inference

    out = {}
    for base in dict.fromkeys(m.split("+")[0] for m in modes):
        dtype, weights, _, _ = parse_mode(base)
        quant = weights if weights and weights.startswith("int8") else None
        model, _ = load_for_inference(model_path, dtype, quantize=quant, pack=base != "float32-unpacked")
        with torch.inference_mode():
            logits = model(torch.tensor([ids[:-1]]))[0].double()
        nll = float(-logits.log_softmax(-1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean())
        out[base] = math.exp(nll)
    done = subprocess.run([llama_python, "-c", LLAMA_PPL_WORKER,
                           json.dumps({"model": model_path, "ids": ids, "threads": threads})],
                          capture_output=True, text=True, check=True)
    out["llama.cpp"] = math.exp(json.loads(done.stdout.strip().splitlines()[-1])["nll"])
    return out


def main() -> None:
    import torch

    from nanogemma.decoding import DEFAULT_DRAFT_TOKENS
    from nanogemma.tokenizer import load_tokenizer
    from nanogemma.tools.bench import machine, prompt_ids, spawn, steady_step
    from nanogemma.weight_files import resolve_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-python", required=True, help="an interpreter that can import llama_cpp")
    ap.add_argument("--model", default=None, help="a .gguf file (default: the official 270M GGUF)")
    ap.add_argument("--modes", default="int8+compile+spec,float32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--quality-text", default="docs/ARCHITECTURE.md",
                    help="held-out text for the perplexity column ('' to skip)")
    ap.add_argument("--quality-tokens", type=int, default=1024)
    ap.add_argument("--draft-vocab", type=int, default=None, help="+spec modes: the draft head's first ids")
    ap.add_argument("--draft-tokens", type=int, default=None, help="+spec and +lookup modes: drafts per check")
    ap.add_argument("--llama-lookup", action="store_true",
                    help="also run llama.cpp with its own prompt lookup (llama-cpp-python's "
                         "LlamaPromptLookupDecoding, 3-grams, as many drafts as ours): the peer of +lookup")
    args = ap.parse_args()

    kind, path = resolve_model(args.model)
    if kind != "gguf":
        raise SystemExit(f"llama.cpp needs a .gguf file, got {path}")
    ids = prompt_ids(load_tokenizer(path), args.prompt_tokens)
    spec = {"model": str(path), "ids": ids, "new_tokens": args.new_tokens, "threads": args.threads,
            "device": "cpu"}
    spec.update({k: v for k, v in (("draft_vocab", args.draft_vocab), ("draft_tokens", args.draft_tokens)) if v})
    print(f"# {machine()}", flush=True)
    speeds: dict[str, list[float]] = {}
    prefill: dict[str, list[float]] = {}
    agree: dict[str, int] = {}
    for r in range(args.rounds):
        llama_tokens = None
        llamas = ["llama.cpp", "llama.cpp+lookup"] if args.llama_lookup else ["llama.cpp"]
        for mode in [*args.modes.split(","), *llamas]:
            if mode.startswith("llama.cpp"):
                lookup = {"lookup_tokens": args.draft_tokens or DEFAULT_DRAFT_TOKENS} if "+lookup" in mode else {}
                done = subprocess.run([args.llama_python, "-c", LLAMA_WORKER, json.dumps({**spec, **lookup})],
                                      capture_output=True, text=True, check=True)
                out = json.loads(done.stdout.strip().splitlines()[-1])
                tok_s = 1 / steady_step(out["stamps"])
                if mode == "llama.cpp":
                    llama_tokens = out["tokens"]
                else:
                    agree[mode] = out["tokens"]
                prefill.setdefault(mode, []).append(out["prefill_tok_s"])
            else:
                res = spawn("nanogemma", {**spec, "mode": mode})
                tok_s = res["decode_tok_s"]
                prefill.setdefault(mode, []).append(res["prefill_tok_s"])
                agree[mode] = res["token_ids"]
            speeds.setdefault(mode, []).append(tok_s)
            print(f"# round {r + 1}: {mode} {tok_s:.1f} decode tok/s", flush=True)
    ppl: dict[str, float] = {}
    if args.quality_text:
        text = open(args.quality_text, encoding="utf-8").read()
        ppl_ids = load_tokenizer(path).encode(text)[:args.quality_tokens]
        ppl = perplexities(str(path), ppl_ids, args.modes.split(","), args.llama_python, args.threads)
        print(f"# perplexity on the first {len(ppl_ids)} tokens of {args.quality_text}: "
              + ", ".join(f"{k} {v:.3f}" for k, v in ppl.items()), flush=True)
    ref = statistics.median(speeds["llama.cpp"])
    float32 = agree.get("float32")
    print(f"\n{args.rounds} rounds, {args.prompt_tokens}-token prompt, {args.new_tokens} greedy tokens, "
          f"{args.threads} threads\n")
    ref_prefill = statistics.median(prefill["llama.cpp"])
    print("| contender | decode tok/s (median) | each round | vs llama.cpp | prefill tok/s (vs llama.cpp) "
          "| tokens equal llama.cpp's | greedy tokens equal float32's (first difference) | perplexity |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, values in speeds.items():
        tokens = llama_tokens if mode == "llama.cpp" else agree[mode]
        same = "" if mode == "llama.cpp" else f"{sum(a == b for a, b in zip(tokens, llama_tokens, strict=False))}" \
            f"/{len(llama_tokens)}"
        vs32 = ""
        if float32 is not None and mode != "float32":
            first = next((i for i, (a, b) in enumerate(zip(tokens, float32, strict=False)) if a != b), None)
            vs32 = f"{sum(a == b for a, b in zip(tokens, float32, strict=False))}/{len(float32)} " \
                   f"({'none' if first is None else first})"
        base = mode.split("+")[0]
        quality = f"{ppl[base]:.3f}" if base in ppl else ""  # llama.cpp+lookup: the same weights as llama.cpp
        print(f"| {mode} | {statistics.median(values):.1f} | {', '.join(f'{v:.1f}' for v in values)} | "
              f"{statistics.median(values) / ref:.2f}x | {statistics.median(prefill[mode]):.0f} "
              f"({statistics.median(prefill[mode]) / ref_prefill:.2f}x) | {same} | {vs32} | {quality} |")


if __name__ == "__main__":
    main()
