"""Checked command-line values: one numeric flag type and one device type for every command.

argparse's `type=float` takes "nan", "inf" and "-1" for a temperature, and `type=int` a seed of any size;
each then fails deep inside (or, worse, runs and prints nonsense). `number(...)` is the one type every
numeric flag uses: finite, within a range, said in one line. The training settings (generated from
`TrainConfig`, written in TOML or as flags) are checked by the same `check_number`.
"""

from __future__ import annotations

import argparse
import math
import re

from .errors import NanogemmaError

SEED_MAX = 2**64 - 1  # what torch.manual_seed accepts
DEVICE = re.compile(r"(cpu|cuda|mps|xpu)(:\d+)?")


def check_number(value: float, name: str, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False) -> float:
    """`value` if finite and within [lo, hi] (lo excluded with `lo_open`); else a NanogemmaError."""
    if isinstance(value, float) and not math.isfinite(value):
        raise NanogemmaError(f"{name} must be a finite number, got {value}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise NanogemmaError(f"{name} must be {'above' if lo_open else 'at least'} {lo:g}, got {value}")
    if hi is not None and value > hi:
        raise NanogemmaError(f"{name} must be at most {hi:g}, got {value}")
    return value


INT_MAX = 2**63 - 1  # what a tensor index, a count or a torch size can hold


def number(kind: type = float, lo: float | None = None, hi: float | None = None, lo_open: bool = False):
    """An argparse `type=`: a finite `kind` (int or float) within the range (whole numbers: at most 2**63 - 1
    unless `hi` says otherwise)."""
    if kind is int and hi is None:
        hi = INT_MAX
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            try:  # 1e4 is a fine way to write ten thousand
                f = float(text)
            except ValueError:
                f = math.nan
            if kind is not int or not f.is_integer():
                raise argparse.ArgumentTypeError(
                    f"{'a whole number' if kind is int else 'a number'} expected, got {text!r}") from None
            value = int(f)
        try:
            return check_number(value, "the value", lo, hi, lo_open)
        except NanogemmaError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix("the value ")) from None
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


SEED = number(int, 0, SEED_MAX)
POSITIVE = number(int, 1)
NON_NEGATIVE = number(int, 0)


def device(text: str) -> str:
    """An argparse `type=` for --device: cpu, cuda, cuda:N (mps, xpu where PyTorch has them)."""
    if not DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu, cuda or cuda:N")
    return text


def check_device(name: str) -> None:
    """Refuse a device PyTorch cannot use here, in one line (before any model is built on it)."""
    import torch

    if not DEVICE.fullmatch(name):
        raise NanogemmaError(f"unknown device {name!r}; use cpu, cuda or cuda:N")
    kind, _, index = name.partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise NanogemmaError(f"--device {name} was asked for, but PyTorch sees no CUDA GPU; use --device cpu")
        if index and int(index) >= torch.cuda.device_count():
            raise NanogemmaError(f"--device {name}: PyTorch sees {torch.cuda.device_count()} CUDA GPU(s), "
                                 f"numbered from 0")
    elif kind == "mps" and not torch.backends.mps.is_available():
        raise NanogemmaError("--device mps was asked for, but this PyTorch has no MPS device; use --device cpu")
    elif kind == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise NanogemmaError("--device xpu was asked for, but PyTorch sees no XPU; use --device cpu")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what is wrong, where the help is), exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"nanogemma: error: {message} (see {self.prog} --help)\n")
