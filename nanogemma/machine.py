"""What the program runs on: the CPU model and the instruction sets that decide which kernels run.

oneDNN, fbgemm and XLA pick their kernels by instruction set (AVX2; AVX-512; its VNNI int8 and BF16
products; AMX tiles), so speed figures, and the last bits of float results, belong to a processor. Every
benchmark names it. torch-free, so the JAX side and the CI script can use it too.
"""

from __future__ import annotations

import ctypes
import os
import platform
from pathlib import Path

# /proc/cpuinfo flag -> the name people use for it, in the order a reader compares processors by.
ISA_FLAGS = {
    "avx2": "AVX2",
    "fma": "FMA",
    "avx512f": "AVX-512",
    "avx512_vnni": "AVX512-VNNI",
    "avx_vnni": "AVX-VNNI",
    "avx512_bf16": "AVX512-BF16",
    "avx512_fp16": "AVX512-FP16",
    "amx_bf16": "AMX-BF16",
    "amx_int8": "AMX-INT8",
}


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():  # the first core speaks for all
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model is None:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:  # not Linux: the model from platform, no flags
        pass
    return model or platform.processor() or platform.machine(), flags


def cpu_info() -> dict:
    """{"model", "cores", "isa": [names of the instruction sets above that the CPU has], "torch_isa"}.

    `torch_isa` is the kernel family PyTorch dispatches to (it honours ATEN_CPU_CAPABILITY), or None
    when torch is not imported here."""
    model, flags = _cpuinfo()
    info = {"model": model, "cores": os.cpu_count(), "isa": [name for flag, name in ISA_FLAGS.items() if flag in flags]}
    torch = __import__("sys").modules.get("torch")
    info["torch_isa"] = torch.backends.cpu.get_cpu_capability() if torch is not None else None
    env = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "FBGEMM_ENABLE_INSTRUCTIONS",
                                  "XLA_FLAGS") if k in os.environ}
    if env:
        info["isa_limits"] = env
    return info


def describe_cpu(info: dict | None = None) -> str:
    """One line: 'AMD EPYC 9R45, 2 cores, AVX2 FMA AVX-512 AVX512-VNNI AVX512-BF16 (torch kernels: AVX512)'."""
    info = info or cpu_info()
    line = f"{info['model']}, {info['cores']} cores, {' '.join(info['isa']) or 'no AVX2'}"
    if info.get("torch_isa"):
        line += f" (torch kernels: {info['torch_isa']})"
    if info.get("isa_limits"):
        line += " [limited by " + " ".join(f"{k}={v}" for k, v in info["isa_limits"].items()) + "]"
    return line


# glibc's mallopt parameters (malloc.h) and the values `keep_freed_memory` sets.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts: blocks up to 32 MiB come from the heap, kept for reuse
TRIM_THRESHOLD = 256 << 20  # free memory at the heap's top that may stay in the process before it is returned
MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_kept: bool | None = None


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed blocks of up to 32 MiB for reuse instead of giving them back to the
    system; True if the setting is in force (Linux with glibc, and the user set no MALLOC_* tunable).

    A decode step allocates the same large tensors every time: at 16 rows the logits alone are 16 MiB. By
    default glibc tunes its thresholds as it goes, and a pattern of frees can leave it returning such blocks
    to the system at every step, so the next step touches fresh pages: a page fault per 4 KiB, 8,000 a step,
    which made a 16-row decode step 2.5-3x slower on a virtual machine (docs/BENCHMARKS.md). Fixed thresholds stop
    that: blocks up to `MMAP_THRESHOLD` come from the heap, and up to `TRIM_THRESHOLD` of free memory stays
    with it. Larger blocks are mapped and unmapped as before. Process-wide and idempotent; the loaders call
    it (`weights.load`)."""
    global _kept
    if _kept is None:
        _kept = False
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" \
                and not any(k in os.environ for k in MALLOC_ENV):
            try:
                mallopt = ctypes.CDLL("libc.so.6").mallopt
            except (OSError, AttributeError):
                return False
            _kept = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _kept


if __name__ == "__main__":  # python -m nanogemma.machine: the line, with torch's kernel family if installed
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    print(describe_cpu())
