"""Speculative decoding on varied prompts: speed against plain decoding, drafts accepted, same tokens?

    .venv/bin/python bench/bench_speculative.py [--quantize int8] [--new-tokens 200] [--draft-tokens 6] [--lookup]

`nanogemma bench` times speculation on one fixed English paragraph, which the model continues with common
tokens. This script asks how it fares on other text: a story, history, Python code and German, each decoded
greedily (stop tokens ignored) with and without `--speculate` (or `--lookup`: drafts copied from the
text), one after the other in this process. It
prints tokens/s of both, the ratio, the share of drafts the full head accepted, and how many of the tokens
are equal (in float32 every one should be).
"""

from __future__ import annotations

import argparse
import time

PROMPTS = {
    "story": "Once upon a time, in a small village by the sea, there lived",
    "history": "The French Revolution began in 1789 when",
    "code": 'def quicksort(items):\n    """Sort a list of numbers."""\n',
    "german": "Die Geschichte der Stadt Berlin beginnt im",
}


def main() -> None:
    import torch

    from nanogemma.generation import Decoder
    from nanogemma.speculative import Speculation
    from nanogemma.weights import load_for_inference

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--quantize", default=None, choices=["int8", "int8-wo"])
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--draft-tokens", type=int, default=6)
    ap.add_argument("--draft-vocab", type=int, default=32_768)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--lookup", action="store_true", help="prompt-lookup drafts instead of the head over S")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_for_inference(args.model, quantize=args.quantize)
    spec = Speculation.for_tokenizer(tok, args.draft_vocab, args.draft_tokens, lookup=args.lookup)
    drafts = "prompt lookup" if args.lookup else f"|S| = {len(spec.common_ids)} at the start"
    print(f"# {args.quantize or 'float32'}, {args.new_tokens} greedy tokens, k = {args.draft_tokens}, "
          f"{drafts}, {torch.get_num_threads()} threads")
    print("| prompt | plain tok/s | speculative tok/s | ratio | drafts accepted | same tokens |")
    print("|---|---|---|---|---|---|")
    for name, text in PROMPTS.items():
        ids, runs = tok.encode(text), {}
        for label, s in (("plain", None), ("spec", spec)):
            decoder = Decoder(model, [ids], args.new_tokens, stop_ids=set(), speculation=s)
            t = time.perf_counter()
            tokens = [row[0] for row in decoder]
            runs[label] = (tokens, len(tokens) / (time.perf_counter() - t), decoder.stats)
        (plain, plain_speed, _), (fast, fast_speed, stats) = runs["plain"], runs["spec"]
        same = sum(a == b for a, b in zip(plain, fast, strict=True))
        print(f"| {name} | {plain_speed:.1f} | {fast_speed:.1f} | {fast_speed / plain_speed:.2f}x | "
              f"{stats.accepted}/{stats.drafted} ({stats.accepted / max(stats.drafted, 1):.0%}) | {same}/{len(plain)} |",
              flush=True)


if __name__ == "__main__":
    main()
