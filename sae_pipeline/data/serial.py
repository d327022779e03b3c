"""Torch ops in the reader's own threads, without waking torch's whole intra-op team for each one.

    with serial_torch_ops():      # in a reading thread: its randperm, copies and gathers run inline
        ...

Every torch op big enough to be split (a copy or an index_select over a window, an ones/fill) starts a
parallel region over all intra-op threads; from a thread other than the main one that region has its own
team, so each call wakes `torch.get_num_threads()` more threads on cores the training step is using,
for work that takes microseconds. Inside the block the calling thread runs them on itself.

`torch.set_num_threads` sets the calling thread's own count (OpenMP's per-thread setting; the training
thread keeps its count and its bits) and also the process-wide default that a thread starting its first
torch op later copies. The default is restored when the last thread inside leaves, whatever order the
threads leave in, and on exceptions too; until then a thread doing its first torch op may copy 1.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_lock = threading.Lock()
_inside = 0  # threads inside `serial_torch_ops` now
_outside = 1  # the thread count seen when the first of them entered


@contextmanager
def serial_torch_ops() -> Iterator[None]:
    """The calling thread's torch ops run on one thread inside the block; its count is restored after."""
    global _inside, _outside
    with _lock:
        if _inside == 0:
            _outside = torch.get_num_threads()
        _inside += 1
        torch.set_num_threads(1)
    try:
        yield
    finally:
        with _lock:
            _inside -= 1
            torch.set_num_threads(_outside)
