"""The CPU line every benchmark prints: model, instruction sets, torch's kernel family, any caps in force."""

from __future__ import annotations

import torch

from nanogemma.machine import ISA_FLAGS, cpu_info, describe_cpu


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
