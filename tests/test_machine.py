"""The CPU line every benchmark prints: model, instruction sets, torch's kernel family, any caps in force;
and malloc's thresholds, which decide whether a decode step's large blocks are reused."""

from __future__ import annotations

import os
import platform

import pytest
import torch

from nanogemma.machine import ISA_FLAGS, MALLOC_ENV, cpu_info, describe_cpu


def test_cpu_info_names_the_processor_and_its_instruction_sets():
    info = cpu_info()
    assert info["model"] and info["cores"] >= 1
    assert set(info["isa"]) <= set(ISA_FLAGS.values())
    assert info["torch_isa"] == torch.backends.cpu.get_cpu_capability()  # torch is imported here
    flags = open("/proc/cpuinfo").read().split() if __import__("os").path.exists("/proc/cpuinfo") else []
    assert ("AVX2" in info["isa"]) == ("avx2" in flags)
    line = describe_cpu(info)
    assert line.startswith(info["model"]) and f"torch kernels: {info['torch_isa']}" in line


def test_caps_in_force_are_named(monkeypatch):
    for name in ("ATEN_CPU_CAPABILITY", "XLA_FLAGS"):  # set by `make test-avx2`
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("FBGEMM_ENABLE_INSTRUCTIONS", "AVX2")
    info = cpu_info()
    assert info["isa_limits"] == {"ONEDNN_MAX_CPU_ISA": "AVX2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}
    assert "[limited by ONEDNN_MAX_CPU_ISA=AVX2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2]" in describe_cpu(info)


_STEPS = """
import resource, sys, torch
from nanogemma.machine import keep_freed_memory
print(keep_freed_memory())
def step():  # what a 16-row decode step does with its logits: two 16 MiB blocks, made, used, freed
    a, b = torch.ones(4 << 20), torch.ones(4 << 20)
    return float(a[-1] + b[-1])
for _ in range(4):
    step()
windows = []
for _ in range(3):  # the quietest of three windows: the host may reclaim idle pages once (seen in one CI run)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    windows.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(windows))
"""


def _run_steps(env: dict[str, str]) -> tuple[str, int]:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _STEPS], env=env, capture_output=True, text=True, check=True)
    kept, faults = out.stdout.split()
    return kept, int(faults)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_large_blocks_freed_each_step_are_reused_not_faulted_in_again():
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
    kept, faults = _run_steps(env)
    # Ten steps of 32 MiB each: 81,920 pages if every block came fresh from the system (glibc's own
    # thresholds gave that at some steps and not others); reused blocks fault in none.
    assert kept == "True" and faults < 1_000
    kept, _ = _run_steps({**env, "MALLOC_TOP_PAD_": "0"})
    assert kept == "False"  # a tunable the user set is theirs: the thresholds are left alone
