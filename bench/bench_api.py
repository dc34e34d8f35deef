"""The Python API against transformers in one process: what a library user gets from `nanogemma.generate`.

    .venv/bin/python bench/bench_api.py [--rounds 5] [--new-tokens 128] [--prompt-tokens 131]

One process holds nanogemma's model (`nanogemma.load()`, the official 270M GGUF, float32) and transformers'
Gemma3ForCausalLM on the same GGUF. Each round runs, in turn: transformers' greedy `generate`, then
`nanogemma.generate` (the default: decoding through the packed twin, `quantize.packed_view`), then
`nanogemma.generate(..., fast=False)` (the plain modules). The order rotates round by round, so a shared
machine's drift falls on every contender alike; medians are printed. Speed is the whole call's wall time
over the new tokens (prefill included), and the decode rate from per-token time stamps after the first two
(`tools.bench.steady_step`), as `nanogemma bench` measures it. nanogemma's text is checked against
transformers' (greedy parity), which also shows that both produced the same number of tokens.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    import nanogemma
    from nanogemma import quantize
    from nanogemma.tools.bench import machine, prompt_ids, steady_step
    from nanogemma.weight_files import default_gguf_path

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=131)
    args = ap.parse_args()

    path = default_gguf_path()
    model, tok = nanogemma.load()
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ids = prompt_ids(tok, args.prompt_tokens)
    text = tok.decode(ids[1:])  # the API takes text; it adds the <bos> back
    if tok.encode(text) != ids:
        raise SystemExit("the bench prompt does not round-trip through the tokenizer")
    n = args.new_tokens

    class Stamps(BaseStreamer):
        def __init__(self) -> None:
            self.t: list[float] = []

        def put(self, value) -> None:
            self.t.append(time.perf_counter())

        def end(self) -> None:
            pass

    def run_transformers() -> tuple[float, list[float], str]:
        s = Stamps()
        start = time.perf_counter()
        with torch.inference_mode():
            out = ref.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=s)
        return time.perf_counter() - start, s.t[1:], tok.decode(out[0, len(ids):].tolist())  # t[0]: the prompt

    def run_ours(fast: bool) -> tuple[float, list[float], str]:
        stamps: list[float] = []
        start = time.perf_counter()
        out = nanogemma.generate(model, tok, text, max_new_tokens=n, fast=fast,
                                 stream=lambda _piece: stamps.append(time.perf_counter()))
        return time.perf_counter() - start, stamps, out

    contenders = {"transformers": run_transformers, "nanogemma.generate": lambda: run_ours(True),
                  "nanogemma.generate(fast=False)": lambda: run_ours(False)}
    run_ours(True)  # the first call builds the packed twin: a one-off cost, reported below
    start = time.perf_counter()
    quantize._VIEWS.clear()
    quantize.packed_view(model)
    build = time.perf_counter() - start
    run_transformers()  # warm-up
    print(f"# {machine()}")
    print(f"# prompt {len(ids)} tokens, {n} greedy tokens, {args.rounds} rounds, rotated; packing the twin took "
          f"{build:.2f} s once")
    wall: dict[str, list[float]] = {k: [] for k in contenders}
    decode: dict[str, list[float]] = {k: [] for k in contenders}
    texts: dict[str, str] = {}
    names = list(contenders)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            seconds, stamps, out = contenders[name]()
            wall[name].append(n / seconds)
            decode[name].append(1 / steady_step(stamps))
            texts[name] = out
    base_wall, base_decode = statistics.median(wall["transformers"]), statistics.median(decode["transformers"])
    print(f"| {'contender':<32} | {'tokens/s (call)':>15} | {'x transformers':>14} | {'decode tokens/s':>15} "
          f"| {'x transformers':>14} | same text |")
    print(f"| {'-' * 32} | {'-' * 15}: | {'-' * 14}: | {'-' * 15}: | {'-' * 14}: | --- |")
    for name in names:
        w, d = statistics.median(wall[name]), statistics.median(decode[name])
        same = "yes" if texts[name] == texts["transformers"] else "no"
        print(f"| {name:<32} | {w:15.1f} | {w / base_wall:13.2f}x | {d:15.1f} | {d / base_decode:13.2f}x | {same} |")


if __name__ == "__main__":
    main()
