"""Training attention: today's dense T×T mask against `attention.py`'s kernels, forward + backward, on CPU.

One attention call of the 270M shape (4 query heads, 1 key/value head, head_dim 256, W = 512) per layer
type, as a training step runs it: the dense path builds `causal_mask` (B, 1, T, T) and hands it to SDPA;
the new path is `attention.attend` with the sequence's `Layout` (sliding: W-wide key blocks; global: the
causal kernel). Each (path, layer, T) runs in a fresh process, so its peak resident memory is its own.

    nice -n 0 python bench/bench_train_attention.py --lengths 2048 8192 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(path: str, layer: str, T: int, repeats: int, threads: int) -> dict:
    import torch

    from nanogemma.attention import Layout, attend
    from nanogemma.cache import causal_mask

    torch.set_num_threads(threads)
    H, Hkv, D, W = 4, 1, 256, 512
    window = W if layer == "sliding" else None
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, H, T, D, generator=gen, requires_grad=True)
    k = torch.randn(1, Hkv, T, D, generator=gen, requires_grad=True)
    v = torch.randn(1, Hkv, T, D, generator=gen, requires_grad=True)
    pos = torch.arange(T)[None]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mask = causal_mask(pos, pos, window) if path == "dense" else Layout.of(None, T)
        y = attend(q, k, v, mask, D**-0.5, window)
        y.sum().backward()
        times.append(time.perf_counter() - t0)
        q.grad = k.grad = v.grad = None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"path": path, "layer": layer, "T": T, "seconds": min(times), "peak_mib_over_inputs": (peak - base) / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--one", nargs=3, metavar=("PATH", "LAYER", "T"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.one[0], a.one[1], int(a.one[2]), a.repeats, a.threads)))
        return
    rows = []
    for T in a.lengths:
        for layer in ("sliding", "global"):
            for path in ("dense", "new"):
                out = subprocess.run([sys.executable, __file__, "--one", path, layer, str(T), "--repeats",
                                      str(a.repeats), "--threads", str(a.threads)],
                                     capture_output=True, text=True, check=True)
                rows.append(json.loads(out.stdout))
                r = rows[-1]
                print(f"T={T:>5} {layer:>7} {path:>5}: {r['seconds'] * 1e3:8.1f} ms fwd+bwd, "
                      f"peak +{r['peak_mib_over_inputs']:7.1f} MiB", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
