"""nanogemma's modes against llama.cpp on the same GGUF and the same prompt ids, run after run.

    .venv/bin/python bench/bench_llamacpp.py --llama-python /path/to/venv/bin/python [--rounds 3]

llama.cpp is not a dependency of this project: install `llama-cpp-python` in any environment (it compiles
llama.cpp for this CPU) and pass that environment's interpreter. Each round runs every nanogemma mode (in a
fresh process, as `nanogemma bench` does) and then llama.cpp, on the 128-token bench prompt, 256 greedy
tokens, stop tokens ignored, both with the same number of threads. Decode tokens/s is measured the same way
for both: wall time over tokens after the first two (`nanogemma.tools.bench.steady_step`). Alternating the
contenders round by round keeps a shared machine's drift out of the ratios; the medians are printed.
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
llm = Llama(model_path=spec["model"], n_ctx=len(spec["ids"]) + spec["new_tokens"] + 8,
            n_threads=spec["threads"], n_batch=512, verbose=False)
stamps, tokens = [], []
for t in llm.generate(spec["ids"], top_k=1, temp=0.0, reset=True):
    stamps.append(time.perf_counter())
    tokens.append(t)
    if len(tokens) == spec["new_tokens"]:
        break
print(json.dumps({"stamps": stamps, "tokens": tokens}))
"""


def main() -> None:
    import torch

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
    args = ap.parse_args()

    kind, path = resolve_model(args.model)
    if kind != "gguf":
        raise SystemExit(f"llama.cpp needs a .gguf file, got {path}")
    ids = prompt_ids(load_tokenizer(path), args.prompt_tokens)
    spec = {"model": str(path), "ids": ids, "new_tokens": args.new_tokens, "threads": args.threads,
            "device": "cpu"}
    print(f"# {machine()}", flush=True)
    speeds: dict[str, list[float]] = {}
    agree: dict[str, int] = {}
    for r in range(args.rounds):
        llama_tokens = None
        for mode in [*args.modes.split(","), "llama.cpp"]:
            if mode == "llama.cpp":
                done = subprocess.run([args.llama_python, "-c", LLAMA_WORKER, json.dumps(spec)],
                                      capture_output=True, text=True, check=True)
                out = json.loads(done.stdout.strip().splitlines()[-1])
                tok_s, llama_tokens = 1 / steady_step(out["stamps"]), out["tokens"]
            else:
                res = spawn("nanogemma", {**spec, "mode": mode})
                tok_s = res["decode_tok_s"]
                agree[mode] = res["token_ids"]
            speeds.setdefault(mode, []).append(tok_s)
            print(f"# round {r + 1}: {mode} {tok_s:.1f} decode tok/s", flush=True)
    ref = statistics.median(speeds["llama.cpp"])
    print(f"\n{args.rounds} rounds, {args.prompt_tokens}-token prompt, {args.new_tokens} greedy tokens, "
          f"{args.threads} threads\n")
    print("| contender | decode tok/s (median) | each round | vs llama.cpp | tokens equal llama.cpp's |")
    print("|---|---|---|---|---|")
    for mode, values in speeds.items():
        same = "" if mode == "llama.cpp" else \
            f"{sum(a == b for a, b in zip(agree[mode], llama_tokens, strict=False))}/{len(llama_tokens)}"
        print(f"| {mode} | {statistics.median(values):.1f} | {', '.join(f'{v:.1f}' for v in values)} | "
              f"{statistics.median(values) / ref:.2f}x | {same} |")


if __name__ == "__main__":
    main()
