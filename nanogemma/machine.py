"""What the program runs on: the CPU model and the instruction sets that decide which kernels run.

oneDNN, fbgemm and XLA pick their kernels by instruction set (AVX2; AVX-512; its VNNI int8 and BF16
products; AMX tiles), so speed figures, and the last bits of float results, belong to a processor. Every
benchmark names it. torch-free, so the JAX side and the CI script can use it too.
"""

from __future__ import annotations

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


if __name__ == "__main__":  # python -m nanogemma.machine: the line, with torch's kernel family if installed
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    print(describe_cpu())
