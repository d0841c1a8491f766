"""Which torch device runs the network, and whether it computes in bfloat16 there.

Used alike by inference, training, fine-tuning and the benchmarks.
"""
from __future__ import annotations

import functools

import torch

from . import check_torch
from .config import Bf16
from .errors import InputError

check_torch(torch.__version__)  # one line (TorchVersionError) under a torch older than MIN_TORCH


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The torch device that ``device`` names: "auto" (CUDA when present), "gpu", "cpu", "cuda",
    "cuda:N" or "mps"; InputError for a device this machine lacks or a name torch does not know."""
    if isinstance(device, torch.device):
        return device
    if device in ("auto", "gpu"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if device == "gpu":
            raise InputError("a GPU was asked for, but torch sees no CUDA device")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError("CUDA is not available on this machine; use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"no device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             "numbered from 0")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InputError("MPS is not available on this machine; use --device cpu or auto")
    return dev


def bf16_enabled(device: torch.device, mode: str, option: str = "bf16") -> bool:
    """Whether to run under bf16 autocast on ``device`` (inference and training alike):
    ``mode`` "on", "off", or "auto" = where the hardware computes bf16 natively (CUDA
    GPUs with bf16, CPUs with avx512_bf16 or AMX)."""
    if mode not in Bf16.values():
        raise ValueError(f"{option} must be auto, on or off, not {mode!r}")
    if device.type not in ("cpu", "cuda"):
        return False
    if mode != Bf16.AUTO:
        return mode == Bf16.ON
    return torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_native_bf16()


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True where the CPU computes in bfloat16 natively (x86 avx512_bf16 or AMX).

    Elsewhere bf16 is emulated and slower than float32, so "auto" keeps float32.
    """
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False
