"""The GPU check: nanogemma's CUDA paths against the CPU, and their speed, in one run of a few minutes.

    bash bench/gpu_check.sh                      # on the GPU machine: writes gpu_check.json, prints a table
    python bench/gpu_check.py --device cpu --quick --out /tmp/g.json     # its logic, on a CPU (the tests)

Made for a bare CUDA machine that holds only this repository (PyTorch, Triton, transformers installed, no
internet): the official GGUF cannot travel, so every model here has random weights in a real shape (the
270M and 1B configurations); real-weight parity stays with the CPU tests. Sections, each timed against one
overall deadline (`--budget`; a section that would start past it is recorded as skipped):

1. **parity**: the tiny preset on the device against the CPU: float32 logits (error against a float64
   CPU reference, bounded by 4x the CPU float32 error plus 64 float32 steps of the largest logit), greedy
   tokens of cached generation (equal, or parting only at a float64 tie), the compiled decode step
   against the eager one, bfloat16 logits, one training step's loss and gradient norm, and the engine
   (continuous batching) against lone generation.
2. **decode**: batch-1 greedy decode tokens/s of each shape, eager and compiled (on CUDA: CUDA graphs),
   with the memory-bandwidth utilisation (MBU): bytes one step reads (weights and KV cache) x tokens/s,
   over the card's nominal bandwidth and over a measured device-to-device copy.
3. **batch**: decode throughput of the 270M shape at batch 1..64.
4. **train**: training tokens/s and MFU of the 270M shape at T = 2,048 in bfloat16 (the same step as
   `nanogemma train`), beside transformers' Gemma 3 on the same batches.
5. **engine**: the serving engine's throughput with 64 requests in its slots.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from nanogemma.config import GLOBAL, GemmaConfig, get_preset
from nanogemma.decoding import SamplingParams
from nanogemma.engine import Engine
from nanogemma.generation import Decoder, generate_ids
from nanogemma.machine import describe_cpu
from nanogemma.model import Gemma
from nanogemma.tools import train_bench
from nanogemma.tools.bench import gpu_bandwidth, steady_step, weight_bytes_per_token


class Deadline:
    """One budget for the whole check: a section starts only while time is left."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_model(cfg: GemmaConfig, device: torch.device, dtype: torch.dtype = torch.float32, seed: int = 0) -> Gemma:
    """A model of this shape with seeded random weights, norms included (zero norms would hide their arithmetic)."""
    torch.manual_seed(seed)
    model = Gemma(cfg).init_weights(seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.2)
    return model.to(device=device, dtype=dtype).eval()


# ---------------------------------------------------------------------------------------------- 1. parity
def _greedy_parts_at_tie(model64: Gemma, prompt: list[int], a: list[int], b: list[int], noise: float) -> bool:
    """Whether two greedy runs are equal, or part where the float64 logits of the two tokens tie within `noise`."""
    i = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
    if i is None:
        return len(a) == len(b)
    with torch.no_grad():
        exact = model64(torch.tensor([prompt + a[:i]]), last_only=True)[0, -1]
    return abs(float(exact[a[i]] - exact[b[i]])) <= 4 * noise


def parity(device: torch.device, compile_how: bool | str) -> dict:
    cfg = get_preset("tiny")
    cpu = random_model(cfg, torch.device("cpu"))
    dev = random_model(cfg, device)
    ids = torch.randint(3, cfg.vocab_size, (2, 200), generator=torch.Generator().manual_seed(1))
    model64 = random_model(cfg, torch.device("cpu"), torch.float64)
    with torch.no_grad():
        exact = model64(ids)
        cpu_err = float((cpu(ids) - exact).abs().max())
        dev_err = float((dev(ids.to(device)).cpu().double() - exact).abs().max())
    floor = 64 * float(torch.finfo(torch.float32).eps) * float(exact.abs().max())
    out: dict = {"float32_logits": {"device_error": dev_err, "cpu_error": cpu_err,
                                    "ok": dev_err <= 4 * cpu_err + floor}}

    prompt = ids[0, :40].tolist()
    cpu_tokens = list(generate_ids(cpu, prompt, 64))
    dev_tokens = list(generate_ids(dev, prompt, 64))
    noise = 4 * cpu_err + floor
    out["greedy_cached"] = {"same_tokens": cpu_tokens == dev_tokens,
                            "ok": _greedy_parts_at_tie(model64, prompt, cpu_tokens, dev_tokens, noise)}
    compiled = [row[0] for row in Decoder(dev, [prompt], 64, compile=compile_how)]
    out["compiled_decode"] = {"same_tokens": compiled == dev_tokens,
                              "ok": _greedy_parts_at_tie(model64, prompt, dev_tokens, compiled, noise)}

    bf_cpu, bf_dev = random_model(cfg, torch.device("cpu"), torch.bfloat16), random_model(cfg, device, torch.bfloat16)
    with torch.no_grad():
        e_cpu = float((bf_cpu(ids).double() - exact).abs().max())
        e_dev = float((bf_dev(ids.to(device)).cpu().double() - exact).abs().max())
    out["bfloat16_logits"] = {"device_error": e_dev, "cpu_error": e_cpu, "ok": e_dev <= 2 * e_cpu + floor}

    losses, norms = {}, {}
    for name, model in (("cpu", random_model(cfg, torch.device("cpu"))), ("device", random_model(cfg, device))):
        model.train()
        x = ids[:, :-1].to(model.device)
        y = ids[:, 1:].to(model.device)
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        losses[name] = float(loss.detach())
        norms[name] = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())))
    rel = abs(norms["device"] - norms["cpu"]) / norms["cpu"]
    out["train_step"] = {"loss_cpu": losses["cpu"], "loss_device": losses["device"], "grad_norm_rel_diff": rel,
                         "ok": abs(losses["device"] - losses["cpu"]) <= 1e-4 * abs(losses["cpu"]) and rel <= 1e-3}

    prompts = [ids[0, :n].tolist() for n in (5, 60, 130)] + [ids[1, :90].tolist()]
    lone = [list(generate_ids(dev, p, 24)) for p in prompts]
    batched = Engine(dev, slots=3, max_len=256).generate(prompts, 24)
    out["engine"] = {"same_tokens": batched == lone,
                     "ok": all(_greedy_parts_at_tie(model64, p, a, b, noise)
                               for p, a, b in zip(prompts, lone, batched, strict=True))}
    return out


# ---------------------------------------------------------------------------------------------- 2-3. decode
def measured_bandwidth(device: torch.device) -> float:
    """Bytes/s of a device-to-device copy (read + write), the empirical ceiling a decode step streams at."""
    n = (1 << 30) if device.type == "cuda" else (1 << 26)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n / min(times)


def nominal_bandwidth(device: torch.device) -> float | None:
    """The card's published bandwidth in bytes/s (`tools.bench.GPU_BANDWIDTH`), None where unknown."""
    gb_s = gpu_bandwidth() if device.type == "cuda" else None
    return gb_s * 1e9 if gb_s else None


def kv_bytes_per_token(cfg: GemmaConfig, context: float, dtype: torch.dtype) -> float:
    """Bytes of keys and values one decode step reads at a given context length."""
    per_entry = 2 * cfg.num_kv_heads * cfg.head_dim * torch.finfo(dtype).bits // 8
    return sum(per_entry * (context if t == GLOBAL else min(context, cfg.sliding_window)) for t in cfg.layer_types)


def decode_speed(model: Gemma, batch: int, prompt_len: int, new_tokens: int, compile_how: bool | str) -> dict:
    """Greedy decode tokens/s (all rows together) from per-step time stamps after the first two."""
    cfg = model.config
    gen = torch.Generator().manual_seed(batch)
    prompts = torch.randint(3, cfg.vocab_size, (batch, prompt_len), generator=gen).tolist()
    for _ in range(2 if compile_how else 1):  # a compiled step compiles (and captures its graph) on its first run
        stamps = []
        for _row in Decoder(model, prompts, new_tokens, SamplingParams(), compile=compile_how):
            sync(model.device)
            stamps.append(time.perf_counter())
    step = steady_step(stamps)
    return {"batch": batch, "tokens_per_s": batch / step, "ms_per_step": 1e3 * step}


def decode_section(shapes: dict[str, GemmaConfig], device: torch.device, dtype: torch.dtype, compile_how: bool | str,
                   prompt_len: int, new_tokens: int, deadline: Deadline) -> dict:
    measured, nominal = measured_bandwidth(device), nominal_bandwidth(device)
    out: dict = {"measured_bandwidth_gb_s": measured / 1e9, "nominal_bandwidth_gb_s": nominal and nominal / 1e9,
                 "dtype": str(dtype).removeprefix("torch."), "rows": []}
    for name, cfg in shapes.items():
        model = random_model(cfg, device, dtype)
        read = weight_bytes_per_token(model) + kv_bytes_per_token(cfg, prompt_len + new_tokens / 2, dtype)
        for how in (False, compile_how):
            label = "compiled" if how else "eager"
            if deadline.left() < 30:
                out["rows"].append({"shape": name, "mode": label, "skipped": "out of time"})
                continue
            r = decode_speed(model, 1, prompt_len, new_tokens, how)
            r.update(shape=name, mode=label, bytes_per_step=read,
                     mbu_measured=read * r["tokens_per_s"] / measured,
                     mbu_nominal=nominal and read * r["tokens_per_s"] / nominal)
            out["rows"].append(r)
        del model
    return out


def batch_section(name: str, cfg: GemmaConfig, device: torch.device, dtype: torch.dtype, batches: list[int], prompt_len: int,
                  new_tokens: int, deadline: Deadline) -> list[dict]:
    model = random_model(cfg, device, dtype)
    rows = []
    for b in batches:
        if deadline.left() < 20:
            rows.append({"shape": name, "batch": b, "skipped": "out of time"})
            continue
        rows.append({"shape": name, **decode_speed(model, b, prompt_len, new_tokens, False)})
    return rows


# ---------------------------------------------------------------------------------------------- 4. train
def train_section(cfg: GemmaConfig, device: torch.device, seq_len: int, batch: int, steps: int,
                  compile: bool, warmup: int = 2) -> dict:
    tokens = np.random.default_rng(0).integers(3, cfg.vocab_size, size=batch * seq_len * 4 + 1, dtype=np.int64)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    r = train_bench.run(cfg, tokens, steps=steps, batch_size=batch, seq_len=seq_len, dtype=dtype, compare=True,
                        compile=compile, warmup=warmup, device=str(device))
    out = r.to_dict()
    out.update(seq_len=seq_len, batch=batch)
    if device.type == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return out


# ---------------------------------------------------------------------------------------------- 5. engine
def engine_section(cfg: GemmaConfig, device: torch.device, dtype: torch.dtype, requests: int, slots: int,
                   new_tokens: int) -> dict:
    model = random_model(cfg, device, dtype)
    gen = torch.Generator().manual_seed(7)
    longest = min(256, cfg.max_seq_len - new_tokens - 1)
    prompts = [torch.randint(3, cfg.vocab_size, (int(n),), generator=gen).tolist()
               for n in torch.randint(4, longest, (requests,), generator=gen)]
    engine = Engine(model, slots=slots, max_len=256 + new_tokens)
    engine.generate(prompts[:2], 4)  # warm-up
    sync(device)
    t = time.perf_counter()
    out = engine.generate(prompts, new_tokens)
    sync(device)
    seconds = time.perf_counter() - t
    produced = sum(len(o) for o in out)
    return {"requests": requests, "slots": slots, "new_tokens": produced, "seconds": seconds,
            "tokens_per_s": produced / seconds}


# ---------------------------------------------------------------------------------------------- the run
def table(report: dict) -> str:
    lines = [f"# {report['machine']}", "", "| check | result |", "| --- | --- |"]
    for name, r in report.get("parity", {}).items():
        lines.append(f"| parity: {name} | {'ok' if r.get('ok') else 'FAILED'} "
                     f"{'(same tokens)' if r.get('same_tokens') else ''} |")
    for r in report.get("decode", {}).get("rows", []):
        if "skipped" in r:
            lines.append(f"| decode {r['shape']} {r['mode']} | skipped: {r['skipped']} |")
            continue
        mbu = f"{100 * r['mbu_nominal']:.0f}% nominal, " if r.get("mbu_nominal") else ""
        lines.append(f"| decode {r['shape']} {r['mode']} batch 1 | {r['tokens_per_s']:.1f} tokens/s, MBU {mbu}"
                     f"{100 * r['mbu_measured']:.0f}% of measured copy |")
    for r in report.get("batch", []):
        lines.append(f"| decode {r['shape']} eager batch {r['batch']} | " +
                     (f"skipped: {r['skipped']}" if "skipped" in r else f"{r['tokens_per_s']:.0f} tokens/s") + " |")
    for key, r in report.items():
        if key.startswith("train") and isinstance(r, dict) and "ours_tokens_per_s" in r:
            mfu = f", MFU {100 * r['ours_mfu']:.0f}%" if r.get("ours_mfu") else ""
            ratio = f", {r['ratio']:.2f}x transformers" if r.get("ratio") else ""
            lines.append(f"| {key} T={r['seq_len']} batch {r['batch']} {r['dtype']} | "
                         f"{r['ours_tokens_per_s']:.0f} tokens/s{mfu}{ratio} |")
    if "engine" in report and "tokens_per_s" in report["engine"]:
        e = report["engine"]
        lines.append(f"| engine {e['requests']} requests, {e['slots']} slots | {e['tokens_per_s']:.0f} tokens/s |")
    for key, why in report.get("skipped", {}).items():
        lines.append(f"| {key} | skipped: {why} |")
    lines.append(f"| total | {report['seconds']:.0f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for the whole check (default 420)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and few tokens: the check's logic on a CPU")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (pass --device cpu --quick to test the script)", file=sys.stderr)
        return 2
    start, deadline = time.monotonic(), Deadline(args.budget)
    cuda = device.type == "cuda"
    if args.quick:  # the same code over tiny shapes; "eager" compiles without a C++ toolchain
        shapes = {"tiny": get_preset("tiny")}
        compile_how: bool | str = "eager"
        prompt_len, new_tokens, batches, train_shape = 24, 12, [1, 4], get_preset("tiny")
        seq_len, train_batch, train_steps, requests, slots = 64, 2, 1, 6, 3
    else:
        shapes = {"270M": get_preset("gemma3-270m"), "1B": get_preset("gemma3-1b")}
        compile_how = True
        prompt_len, new_tokens, batches, train_shape = 128, 128, [1, 2, 4, 8, 16, 32, 64], get_preset("gemma3-270m")
        seq_len, train_batch, train_steps, requests, slots = 2048, 8, 8, 64, 32
    dtype = torch.bfloat16 if cuda else torch.float32
    report: dict = {"machine": describe_cpu() + (f", GPU {torch.cuda.get_device_name(device)}" if cuda else ""),
                    "torch": torch.__version__, "device": str(device), "quick": args.quick, "skipped": {}}

    def section(name: str, need: float, fn) -> None:
        if deadline.left() < need:
            report["skipped"][name] = f"out of time ({deadline.left():.0f} s left, needs ~{need:.0f})"
            return
        t = time.monotonic()
        try:
            report[name] = fn()
        except Exception as e:  # one failing section must not lose the others' figures
            report["skipped"][name] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        print(f"[gpu_check] {name}: {time.monotonic() - t:.1f} s", file=sys.stderr, flush=True)

    section("parity", 0, lambda: parity(device, compile_how))
    section("decode", 60, lambda: decode_section(shapes, device, dtype, compile_how, prompt_len, new_tokens, deadline))
    first = next(iter(shapes))
    section("batch", 30, lambda: batch_section(first, shapes[first], device, dtype, batches, prompt_len,
                                               new_tokens, deadline))
    section("train", 60, lambda: train_section(train_shape, device, seq_len, train_batch, train_steps, False,
                                               warmup=1 if args.quick else 2))
    if args.quick:  # inductor's C++ build of a training graph takes minutes on a CPU
        report["skipped"]["train_compiled"] = "--quick"
    else:
        section("train_compiled", 120, lambda: train_section(train_shape, device, seq_len, train_batch, train_steps,
                                                             True))
    section("engine", 30, lambda: engine_section(shapes[first], device, dtype, requests, slots,
                                                 new_tokens))
    report["seconds"] = time.monotonic() - start
    report["ok"] = all(r.get("ok") for r in report.get("parity", {}).values()) and "parity" in report
    tmp = Path(args.out).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1, default=lambda o: None if isinstance(o, float) and math.isnan(o)
                              else str(o)))
    tmp.replace(args.out)
    print(table(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
