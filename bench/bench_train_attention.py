"""Training attention: today's dense T×T mask against `attention.py`'s kernels, forward + backward, on CPU.

One attention call of the 270M shape (4 query heads, 1 key/value head, head_dim 256, W = 512) per layer
type, as a training step runs it: the dense path builds `causal_mask` (B, 1, T, T) and hands it to SDPA;
the new path is `attention.attend` with the sequence's `Layout` (sliding: W-wide key blocks; global: the
causal kernel). Each (path, layer, T) runs in a fresh process, so its peak resident memory is its own.

    nice -n 0 python bench/bench_train_attention.py --lengths 2048 8192 --repeats 3

`--whole-model`: the same comparison for a whole training step — the 270M shape with random weights and
Gemma's 262,144-token vocabulary, batch 1, forward + backward through the fused loss as `nanogemma train`
runs it (float32, no optimizer: attention does not touch it). The dense path is the model as it was: two
(1, 1, T, T) masks per forward (sliding, global), built once and handed to SDPA by every layer; the bench
routes the model's attention through them (`dense_attention`), model.py has no switch for it. Each (path, T)
is a fresh process; its peak is the resident memory above the model and its gradients (allocated first).
Both paths' peaks include the fused loss's vocabulary-sized buffers (the head's V × d gradient, then the
embedding's: about 2 GiB at 262,144 × 640), so the difference of the two is attention's.
`--quick` runs the same logic on the tiny shape (seconds; what the tests run).

    nice -n 0 python bench/bench_train_attention.py --whole-model --lengths 2048 8192 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

QUICK = ("tiny", 512)  # --quick: the tiny shape (window 8) and a small vocabulary
WHOLE = ("gemma3-270m", 262_144)  # the 270M shape with Gemma's vocabulary


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


# ------------------------------------------------------------------------------------------ whole model


@contextmanager
def dense_attention():
    """While open, the model's attention takes the dense path it had before attention.py: for a sequence
    (a `Layout`), `causal_mask` (B, 1, T, T) of each window, built once per forward and shared by the layers
    of that kind, handed to SDPA as its mask. Yields the shapes of the masks built, one per (forward, kind)."""
    import torch

    import nanogemma.model as model_py
    from nanogemma.attention import Layout
    from nanogemma.cache import causal_mask

    original = model_py.attend
    built: list[tuple[int, ...]] = []

    def dense(q, k, v, mask, scale, window):
        if isinstance(mask, Layout):
            if mask.doc_start is not None:
                raise ValueError("the dense path of this bench takes one document per row (no positions)")
            masks = mask.__dict__.setdefault("dense_masks", {})  # the Layout lives for one forward
            if window not in masks:
                pos = torch.arange(mask.length, device=q.device).expand(q.shape[0], -1)
                masks[window] = causal_mask(pos, pos, window)
                built.append(tuple(masks[window].shape))
            mask = masks[window]
        return original(q, k, v, mask, scale, window)  # a mask tensor goes to SDPA as it is

    model_py.attend = dense
    try:
        yield built
    finally:
        model_py.attend = original


def training_model(T: int, quick: bool):
    """A TrainingGemma of the bench's shape (random weights) with its fused loss, as `nanogemma train` builds them."""
    from nanogemma.train.config import TrainConfig, model_config
    from nanogemma.train.loss import LanguageModelLoss, TrainingGemma

    shape, vocab = QUICK if quick else WHOLE
    cfg = model_config(TrainConfig(model=shape, seq_len=T), vocab)
    model = TrainingGemma(cfg).init_weights(seed=0).train()
    return model, LanguageModelLoss(model, fused=True)


def batch(T: int, vocab: int):
    import torch

    ids = torch.randint(0, vocab, (1, T + 1), generator=torch.Generator().manual_seed(0))
    return ids[:, :-1], ids[:, 1:]


def _reset_peak() -> bool:
    """Restart the kernel's count of peak resident memory (VmHWM) from now; False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _memory_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def whole_step(path: str, T: int, repeats: int, threads: int, quick: bool) -> dict:
    """Forward + backward of the whole model at batch 1 × T on `path` ("dense" or "new"), `repeats` times:
    the fastest step, every loss, and the peak resident memory above the model and its gradients."""
    import torch

    torch.set_num_threads(threads)
    model, loss_fn = training_model(T, quick)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # allocated before the baseline: the same for both paths, and not what is compared
        p.grad = torch.zeros_like(p)
    x, y = batch(T, model.config.vocab_size)
    times, losses = [], []
    with dense_attention() if path == "dense" else nullcontext():
        exact = _reset_peak()
        base = _memory_kib("VmRSS") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for _ in range(repeats):
            for p in params:
                p.grad.zero_()
            t0 = time.perf_counter()
            loss = loss_fn(model, x, y)
            loss.backward()
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())
        peak = _memory_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    shape, vocab = QUICK if quick else WHOLE
    return {"path": path, "T": T, "shape": shape, "vocab": vocab, "threads": threads, "seconds": min(times),
            "all_seconds": times, "losses": losses, "peak_mib_over_model": (peak - base) / 1024,
            "peak_exact": exact}


def run_whole(lengths: list[int], repeats: int, threads: int, quick: bool) -> list[dict]:
    rows = []
    for T in lengths:
        pair = {}
        for path in ("dense", "new"):
            out = subprocess.run([sys.executable, __file__, "--whole-one", path, str(T), "--repeats", str(repeats),
                                  "--threads", str(threads), *(["--quick"] if quick else [])],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"T={T} {path}: the step failed:\n{out.stderr}")
            r = pair[path] = json.loads(out.stdout)
            rows.append(r)
            print(f"T={T:>5} {path:>5}: {r['seconds']:8.2f} s forward+backward, peak +{r['peak_mib_over_model']:8.1f} MiB "
                  f"over model and gradients (loss {r['losses'][0]:.6f})", flush=True)
        d, n = pair["dense"], pair["new"]
        print(f"T={T:>5}  new / dense: time {n['seconds'] / d['seconds']:.2f}x, peak "
              f"{n['peak_mib_over_model'] - d['peak_mib_over_model']:+.1f} MiB", flush=True)
        if abs(d["losses"][0] - n["losses"][0]) > 1e-4 * abs(d["losses"][0]):  # same model, same batch
            raise SystemExit(f"T={T}: the two paths' losses differ: {d['losses'][0]} vs {n['losses'][0]}")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=None,
                   help="sequence lengths (default 2048 8192; with --quick 256)")
    p.add_argument("--repeats", type=int, default=None, help="steps per process (default 3; --whole-model 2)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--whole-model", action="store_true", help="a whole training step of the model, not one layer")
    p.add_argument("--quick", action="store_true", help="with --whole-model: the tiny shape (a smoke run)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--one", nargs=3, metavar=("PATH", "LAYER", "T"), help=argparse.SUPPRESS)
    p.add_argument("--whole-one", nargs=2, metavar=("PATH", "T"), help=argparse.SUPPRESS)
    a = p.parse_args()
    repeats = a.repeats or (2 if a.whole_model or a.whole_one else 3)
    if a.one:
        print(json.dumps(one(a.one[0], a.one[1], int(a.one[2]), repeats, a.threads)))
        return
    if a.whole_one:
        print(json.dumps(whole_step(a.whole_one[0], int(a.whole_one[1]), repeats, a.threads, a.quick)))
        return
    if a.quick and not a.whole_model:
        p.error("--quick is a setting of --whole-model")
    lengths = a.lengths or ([256] if a.quick else [2048, 8192])
    if a.whole_model:
        rows = run_whole(lengths, repeats, a.threads, a.quick)
    else:
        rows = []
        for T in lengths:
            for layer in ("sliding", "global"):
                for path in ("dense", "new"):
                    out = subprocess.run([sys.executable, __file__, "--one", path, layer, str(T), "--repeats",
                                          str(repeats), "--threads", str(a.threads)],
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
