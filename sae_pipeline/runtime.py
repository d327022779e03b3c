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


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model's parameters live (the CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


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


def compute_record(device: torch.device) -> dict:
    """What a run's last bits depend on: torch's build, the device and the CPU thread count.

    A resumed run is bit-identical to an uninterrupted one only when all three are the same (config.json
    and every checkpoint record them; `compute_change` says what differs)."""
    name = str(device)
    if device.type == "cuda":
        name += f" ({torch.cuda.get_device_name(device)})"
    return {"torch": torch.__version__, "device": name, "threads": torch.get_num_threads()}


def compute_change(old: dict | None, new: dict) -> str | None:
    """One sentence naming what differs between the compute that wrote a checkpoint and this one, else None
    (also None for a checkpoint written before the record existed)."""
    if not old:
        return None
    labels = {"torch": "torch {}", "device": "device {}", "threads": "{} CPU threads"}
    diffs = [
        f"{labels[k].format(old.get(k))} -> {labels[k].format(new[k])}"
        for k in labels
        if k in old and old[k] != new[k]
    ]
    if not diffs:
        return None
    return (
        f"note: this resume runs with {', '.join(diffs)}; it continues exactly, but its result will differ "
        "from an uninterrupted run in the last bits (bit-identity needs the same device, thread count and torch build)"
    )
