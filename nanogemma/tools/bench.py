"""`nanogemma bench`: how fast is generation, per mode, and against transformers.

Every mode runs in a fresh Python process (a *worker*: `python -m nanogemma.tools.bench --worker ...`), so that
peak memory is that mode's alone and the time to first token is what a user waits for: process start,
imports, loading (the weights cache already built: a warm start), prefill and the first token. The worker
then measures, on the same prompt:

* prefill tokens/s — the prompt through the model (best of 3 runs, after the cold one);
* decode tokens/s — greedy decoding of `new_tokens` tokens, stop tokens ignored so every run is as long;
  one over the median time per step, after the first two (with `+compile` those compile: `compile_s`);
* weight GB/s — bytes of weights read per decode step x steps/s: decoding at batch 1 is memory-bound, so
  this against the device's bandwidth says how close to the limit the mode runs.

The transformers worker (`--compare transformers`) loads the same file with `AutoModelForCausalLM`,
float32, and times `model.generate` on the same prompt ids, each token time-stamped through its streamer
hook, so both sides' decode speed is measured the same way. Its load takes tens of seconds (the GGUF is
dequantised every time), so its cold time to first token is reported but not comparable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ..errors import NanogemmaError

MODES = ("float32", "float32-unpacked", "bfloat16", "int8", "int8-wo")
# A neutral English paragraph, repeated as needed to make the prompt.
PROMPT_TEXT = (
    "The history of the lighthouse begins with fires lit on hilltops to guide ships home. Over the centuries "
    "these became towers of stone with lamps of oil, then lenses that could throw a beam many miles out to "
    "sea. Keepers lived in small houses at the foot of each tower, trimming wicks, winding clockwork and "
    "writing the weather in a log every few hours. "
)


def parse_mode(mode: str) -> tuple[str, str | None, bool, str | None]:
    """'int8+compile+spec' -> (dtype name, quantization or None, compile?, speculation: "spec", "lookup",
    "lookup+spec" (the text's drafts, else the head's) or None)."""
    base, *extras = mode.split("+")
    speculation = [e for e in ("lookup", "spec") if e in extras]
    if base not in MODES or not set(extras) <= {"compile", "spec", "lookup"} or len(set(extras)) != len(extras):
        raise NanogemmaError(f"unknown bench mode '{mode}'; use {', '.join(MODES)}, each optionally +compile "
                             "and +spec (self-speculative decoding) and/or +lookup (prompt lookup)")
    dtype = "bfloat16" if base == "bfloat16" else "float32"
    weights = base if base.startswith("int8") or base == "float32-unpacked" else None
    return dtype, weights, "compile" in extras, "+".join(speculation) or None


def prompt_ids(tok, n: int) -> list[int]:
    ids = tok.encode(PROMPT_TEXT * (n // 40 + 1))[:n]
    if len(ids) < n:
        raise NanogemmaError(f"could not build a {n}-token prompt")
    return ids


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: every projection and the head (the embedding gives one row)."""
    from torch import nn

    from ..model import TiedHead

    total = 0
    for m in model.modules():
        if hasattr(m, "weight_bytes"):  # an inference kernel (quantize.py) knows its own size
            total += m.weight_bytes()
        elif isinstance(m, nn.Linear | TiedHead):
            total += m.weight.numel() * m.weight.element_size()
    return total


def steady_step(stamps: list[float]) -> float:
    """Seconds per decoded token from per-token time stamps: wall time over tokens, after the first two.

    The first steps may compile (`+compile`). A mean over the whole run, not a median of intervals:
    speculative decoding delivers tokens in bursts, so only the mean measures it, and every mode (and
    transformers) is measured the same way.
    """
    if len(stamps) < 4:
        return (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)
    return (stamps[-1] - stamps[2]) / (len(stamps) - 3)


def _peak_mb(device) -> float:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker_nanogemma(spec: dict) -> dict:
    """Measure one mode in this (fresh) process; `spec['t_spawn']` is when the parent started it."""
    import torch

    from ..decoding import DEFAULT_DRAFT_TOKENS, DEFAULT_DRAFT_VOCAB
    from ..generation import Decoder, Session
    from ..speculative import Speculation

    dtype, quant, compiled, speculative = parse_mode(spec["mode"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    from ..weights import load_for_inference

    t0 = time.perf_counter()
    # What generate and chat run: int8, or else float32 weights prepacked for oneDNN unless compiled.
    int8 = quant if quant and quant.startswith("int8") else None
    model, tok = load_for_inference(spec["model"], dtype, spec["device"], int8,
                                    pack=quant is None and not compiled)
    load_s = time.perf_counter() - t0
    device, ids, n_new = model.device, spec["ids"], spec["new_tokens"]
    with torch.inference_mode():
        session = Session(model, 1, len(ids) + n_new + 1)
        session.prefill([ids]).argmax(-1)
        _sync(device)
        ttft_cold = time.time() - spec["t_spawn"]
        prefill = []
        for _ in range(3):
            session.reset()
            _sync(device)
            t = time.perf_counter()
            session.prefill([ids]).argmax(-1)
            _sync(device)
            prefill.append(time.perf_counter() - t)
    stamps, generated = [], []
    t = time.perf_counter()
    decoder = Decoder(model, [ids], n_new, stop_ids=set(), compile=compiled,
                      speculation=Speculation.for_tokenizer(tok, spec.get("draft_vocab", DEFAULT_DRAFT_VOCAB),
                                                            spec.get("draft_tokens", DEFAULT_DRAFT_TOKENS),
                                                            lookup="lookup" in speculative,
                                                            head="spec" in speculative)
                      if speculative else None)
    for row in decoder:
        stamps.append(time.perf_counter())  # each stamp follows one sampled token
        generated.append(row[0])
    step_s = steady_step(stamps)
    stats = decoder.stats
    return {
        "draft_accepted": stats.accepted / stats.drafted if stats and stats.drafted else None,
        "token_ids": generated,
        "mode": spec["mode"], "load_s": load_s, "ttft_cold_s": ttft_cold, "ttft_s": stamps[0] - t,
        "compile_s": (stamps[1] - stamps[0]) if compiled else 0.0,
        "prefill_tok_s": len(ids) / min(prefill), "decode_tok_s": 1 / step_s, "tokens": len(stamps),
        "weight_gb_s": weight_bytes_per_token(model) / step_s / 1e9, "peak_mb": _peak_mb(device),
    }


def worker_transformers(spec: dict) -> dict:
    """transformers' generate on the same ids, float32, greedy."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..weight_files import resolve_model

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    kind, path = resolve_model(spec["model"])
    if kind == "run":
        raise NanogemmaError("--compare transformers needs a .gguf file or a Hugging Face folder")
    t0 = time.perf_counter()
    extra = {"gguf_file": path.name} if kind == "gguf" else {}
    model = AutoModelForCausalLM.from_pretrained(str(path.parent if kind == "gguf" else path), dtype=torch.float32,
                                                 **extra).to(spec["device"]).eval()
    load_s = time.perf_counter() - t0
    device = model.device
    ids = torch.tensor([spec["ids"]], device=device)
    n_new = spec["new_tokens"]

    class Stamps:  # transformers' streamer interface: put() is called with each new token
        def __init__(self):
            self.times: list[float] = []

        def put(self, _value) -> None:
            _sync(device)
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    def run(n: int, streamer: Stamps | None = None) -> float:
        _sync(device)
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=streamer)
        _sync(device)
        assert out.shape[1] == ids.shape[1] + n
        return time.perf_counter() - t

    run(1)
    ttft_cold = time.time() - spec["t_spawn"]
    with torch.inference_mode():
        prefill = []
        for _ in range(3):
            _sync(device)
            t = time.perf_counter()
            model(ids)
            _sync(device)
            prefill.append(time.perf_counter() - t)
    first = min(run(1) for _ in range(2))
    stamps = Stamps()
    run(n_new, stamps)
    step_s = steady_step(stamps.times[1:])  # the first put() is the prompt itself
    wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "mode": "transformers", "load_s": load_s, "ttft_cold_s": ttft_cold, "ttft_s": first,
        "prefill_tok_s": ids.shape[1] / min(prefill), "decode_tok_s": 1 / step_s, "tokens": n_new,
        "weight_gb_s": wbytes / step_s / 1e9, "peak_mb": _peak_mb(device),
    }


def spawn(kind: str, spec: dict, timeout: float = 1800) -> dict:
    """Run one worker in a fresh interpreter; returns its result dict."""
    spec = {**spec, "t_spawn": time.time()}
    proc = subprocess.run([sys.executable, "-m", "nanogemma.tools.bench", "--worker", kind, json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise NanogemmaError(f"the {spec.get('mode', kind)} benchmark failed: {tail}")
    return json.loads(lines[-1])


# Published peak memory bandwidth, GB/s, for the fraction column when --peak-bandwidth is not given.
GPU_BANDWIDTH = {"H200": 4800, "H100 SXM": 3350, "H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100": 3350,
                 "A100-SXM4-80GB": 2039, "A100 80GB PCIe": 1935, "A100": 1555, "L40S": 864, "L4": 300,
                 "RTX 4090": 1008, "A10G": 600, "T4": 320}


def gpu_bandwidth() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((bw for key, bw in GPU_BANDWIDTH.items() if key in name), None)


def table(rows: list[dict], peak_bw: float | None = None) -> str:
    """The results as a Markdown table, with decode speed relative to transformers when it ran."""
    ref = next((r for r in rows if r["mode"] == "transformers"), None)
    head = ["mode", "prefill tok/s", "decode tok/s", "TTFT s", "cold TTFT s", "load s", "peak MB", "weights GB/s"]
    if peak_bw:
        head.append("of bandwidth")
    if ref:
        head.append("decode vs transformers")
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["mode"], f"{r['prefill_tok_s']:.0f}", f"{r['decode_tok_s']:.1f}", f"{r['ttft_s']:.3f}",
                 f"{r['ttft_cold_s']:.2f}", f"{r['load_s']:.2f}", f"{r['peak_mb']:.0f}", f"{r['weight_gb_s']:.1f}"]
        if peak_bw:
            cells.append(f"{r['weight_gb_s'] / peak_bw:.0%}")
        if ref:
            cells.append(f"{r['decode_tok_s'] / ref['decode_tok_s']:.2f}x")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def machine() -> str:
    """The header line: CPU model and instruction sets (see `machine.py`), threads, GPU, versions."""
    import platform

    import torch

    from ..machine import describe_cpu

    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{describe_cpu()}, {torch.get_num_threads()} torch threads{gpu}; "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def _agreement(rows: list[dict]) -> str:
    """For a +spec or +lookup mode: how many of its tokens equal those of the same mode without speculation."""
    new = rows[-1]
    kinds = [k for k in ("+spec", "+lookup") if k in new["mode"]]
    if not kinds:
        return ""
    if new.get("draft_accepted") is not None:
        note = f", {new['draft_accepted']:.0%} of drafts accepted"
    else:
        note = ""
    plain = new["mode"]
    for kind in kinds:
        plain = plain.replace(kind, "")
    ref = next((r for r in rows if r["mode"] == plain), None)
    if ref is None:
        return note
    same = sum(a == b for a, b in zip(new["token_ids"], ref["token_ids"], strict=False))
    return f"{note}, {same}/{len(ref['token_ids'])} tokens equal {plain}'s"


def run(model: str | None = None, modes: str | None = None, device: str = "cpu", prompt_tokens: int = 128,
        new_tokens: int = 256, threads: int | None = None, compare: str | None = None,
        peak_bandwidth: float | None = None, json_path: str | None = None) -> int:
    """`nanogemma bench`: every mode in a fresh process, the table printed (and written as JSON)."""
    import torch

    from ..tokenizer import load_tokenizer
    from ..weight_files import resolve_model

    if prompt_tokens < 2 or new_tokens < 2:
        raise NanogemmaError("--prompt-tokens and --new-tokens must be at least 2")
    cuda = str(device).startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise NanogemmaError("--device cuda was asked for, but PyTorch sees no CUDA GPU; use --device cpu")
    default = ("float32,bfloat16,float32+compile,bfloat16+compile" if cuda
               else "float32,bfloat16,int8,int8+compile")
    mode_list = [m.strip() for m in (modes or default).split(",") if m.strip()]
    for m in mode_list:
        parse_mode(m)
    _, path = resolve_model(model)
    ids = prompt_ids(load_tokenizer(path), prompt_tokens)
    if threads is not None and threads < 1:
        raise NanogemmaError(f"--threads must be >= 1, got {threads}")
    spec = {"model": model, "device": device, "ids": ids, "new_tokens": new_tokens,
            "threads": threads}
    if threads:
        torch.set_num_threads(threads)  # so that the header says so
    print(f"# {machine()}", flush=True)
    print(f"# model {path.name}, prompt {len(ids)} tokens, {new_tokens} new tokens, batch 1, greedy",
          flush=True)
    rows = []
    for kind, mode in [("nanogemma", m) for m in mode_list] + ([("transformers", "transformers")] if compare else []):
        try:
            rows.append(spawn(kind, {**spec, "mode": mode}))
        except NanogemmaError as e:  # one failing mode (say, no C++ compiler for +compile) spoils no other
            print(f"#   {mode}: failed: {e}", flush=True)
            continue
        print(f"#   {mode}: {rows[-1]['decode_tok_s']:.1f} decode tok/s{_agreement(rows)}", flush=True)
    if not any(r["mode"] != "transformers" for r in rows):
        raise NanogemmaError("every benchmark mode failed (see the lines above)")
    print(table(rows, peak_bandwidth or (gpu_bandwidth() if cuda else None)))
    best = max((r for r in rows if r["mode"] != "transformers"), key=lambda r: r["decode_tok_s"])
    print(f"fastest mode: {best['mode']}, {best['decode_tok_s']:.1f} tokens/s")
    if json_path:
        from ..machine import cpu_info

        Path(json_path).write_text(json.dumps({"machine": machine(), "cpu": cpu_info(), "rows": rows}, indent=2))
    return 0


def _worker_main(argv: list[str]) -> int:
    kind, spec = argv[1], json.loads(argv[2])
    result = worker_nanogemma(spec) if kind == "nanogemma" else worker_transformers(spec)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        sys.exit(_worker_main(sys.argv[1:]))
    sys.exit("usage: python -m nanogemma.tools.bench --worker KIND SPEC  (use `nanogemma bench` instead)")
