"""How close llama.cpp's reading of `nanogemma export --to gguf` files is to nanogemma, per `--type`.

    .venv/bin/python bench/bench_gguf_export.py [--model gemma3-270m] [--types f32,f16,bf16,q8_0]

For each type: export the model, run llama.cpp (llama-cpp-python, float32 K/V cache) on a few prompts, and
print the largest |logit difference| against nanogemma float32 and against nanogemma float64 (the
reference), and how many of 64 greedy tokens agree. The bounds in docs/TRAINING.md come from this.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

PROMPTS = [
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "The three primary colors are",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Die Hauptstadt von Frankreich ist Paris. Die Hauptstadt von Deutschland ist",
]


def main() -> None:
    import numpy as np
    import torch
    from llama_cpp import Llama

    import nanogemma
    from nanogemma.generation import generate_ids
    from nanogemma.tools.export_gguf import export_gguf

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--types", default="f32,f16,bf16,q8_0")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()

    model, tok = nanogemma.load(args.model)
    rows = [tok.encode(p) for p in PROMPTS]
    with torch.no_grad():
        ours = [model(torch.tensor([ids]))[0].numpy() for ids in rows]
        model64 = model.double()
        ref = [model64(torch.tensor([ids]))[0].numpy() for ids in rows]
        model.float()
    greedy = [list(generate_ids(model, ids, 64)) for ids in rows]
    print(f"nanogemma float32 vs float64: {max(np.abs(a - b).max() for a, b in zip(ours, ref, strict=True)):.3g}")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.types.split(","):
            path = export_gguf(args.model, Path(tmp) / f"m-{kind}.gguf", kind)
            llm = Llama(model_path=str(path), n_ctx=256, n_batch=256, n_ubatch=256, n_threads=args.threads,
                        logits_all=True, type_k=0, type_v=0, verbose=False)
            d32 = d64 = 0.0
            same = []
            for ids, o, r, g in zip(rows, ours, ref, greedy, strict=True):
                llm.reset()
                llm.eval(ids)
                theirs = np.array(llm.scores[:len(ids)], dtype=np.float64)
                d32, d64 = max(d32, np.abs(theirs - o).max()), max(d64, np.abs(theirs - r).max())
                out = []
                for t in llm.generate(ids, top_k=1, temp=0.0, reset=True):
                    out.append(t)
                    if len(out) == 64:
                        break
                same.append(next((i for i, (a, b) in enumerate(zip(out, g, strict=True)) if a != b), 64))
            print(f"{kind:5s} {path.stat().st_size / 1e6:7.0f} MB  max |llama.cpp - nanogemma f32| {d32:.3g}  "
                  f"vs f64 {d64:.3g}  greedy tokens equal before the first difference: {same}")
            del llm
            path.unlink()


if __name__ == "__main__":
    main()
