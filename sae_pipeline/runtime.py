"""Where and how the process computes: the device, and process-wide CPU settings that make steps fast."""

from __future__ import annotations

import ctypes
import sys

import torch

from sae_pipeline.errors import UserError

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"device={name!r} was asked for but this machine has no CUDA GPU; use device=auto or cpu"
        )
    return device


AUTOCAST_MODES = ("auto", "bf16", "off")


def autocast_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The dtype the training forward autocasts to, or None for plain float32.

    auto: bfloat16 on CUDA, off elsewhere (bf16 matmuls on CPUs are ~100x slower); bf16: on any device (on the
    CPU this is the test/debug way to run the GPU code path); off: float32 everywhere. Weights, gradients and
    optimizer state stay float32 in every mode."""
    if mode not in AUTOCAST_MODES:
        raise UserError(f"train.autocast must be one of {', '.join(AUTOCAST_MODES)}, got {mode!r}.")
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed large blocks instead of returning them to the OS.

    A training step allocates several batch x dictionary buffers (75 MB at 4096 x 4608); by default
    each one is mmap'ed fresh and page-faulted in, which costs ~60 ms per buffer here against ~8 ms for
    a reused one. The price is that peak memory is not given back until the process ends.
    Returns False where this is not glibc (the setting is then simply skipped)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
        )
    except (OSError, AttributeError):
        return False
