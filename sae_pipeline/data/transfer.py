"""Host rows onto the training device: pinned buffers, copies on a side stream, rows gathered there.

    buf = host_buffer(n_rows, d_in, torch.bfloat16, device)   # pinned when the device is CUDA
    window = DeviceWindow.send(buf, order_N, device)          # reader thread: starts the copies
    x_BD = window.rows(offset, take)                          # training thread: float32 rows on the device

The rows cross in the store's dtype (a bf16 store moves half the bytes of float32); the shuffle's gather
and the conversion to float32 run on the device. On CUDA the copies are issued on a side stream from the
reader thread, so they overlap the training step, and the training stream waits on an event, not the host.
On the CPU the whole window is gathered and converted once, in the reader thread, so that work overlaps
the step too and a batch is a slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def host_buffer(n_rows: int, d: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An empty [n_rows, d] buffer for reading rows into: page-locked when they go on to a GPU."""
    return torch.empty((n_rows, d), dtype=dtype, pin_memory=device.type == "cuda")


_streams: dict[torch.device, torch.cuda.Stream] = {}


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _streams:
        _streams[device] = torch.cuda.Stream(device=device)
    return _streams[device]


@dataclass
class DeviceWindow:
    """A shuffle window on the device: its rows in the store's dtype and the order to serve them in."""

    raw_ND: torch.Tensor  # rows as read (store dtype), validation rows included
    order_M: torch.Tensor | None  # int64 row indices into raw_ND: the window's training rows, shuffled
    ready: torch.cuda.Event | None = None  # set when the copies have landed (CUDA only)

    @classmethod
    def send(cls, raw_ND: torch.Tensor, order_M: torch.Tensor, device: torch.device) -> DeviceWindow:
        if device.type != "cuda":  # gathered here, in the calling (reader) thread: None = in order
            return cls(raw_ND.index_select(0, order_M).float().to(device), None)
        stream = _copy_stream(device)
        with torch.cuda.stream(stream):
            raw = raw_ND.to(device, non_blocking=True)
            order = order_M.pin_memory().to(device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(stream)
        return cls(raw, order, ready)

    def __len__(self) -> int:
        return self.raw_ND.shape[0] if self.order_M is None else self.order_M.shape[0]

    def rows(self, offset: int, take: int) -> torch.Tensor:
        """Rows [offset, offset + take) of the shuffled window, float32, on the window's device."""
        if self.ready is not None:  # first use on the training stream: wait for the copies, keep the memory
            stream = torch.cuda.current_stream(self.raw_ND.device)
            stream.wait_event(self.ready)
            self.raw_ND.record_stream(stream)
            self.order_M.record_stream(stream)
            self.ready = None
        if self.order_M is None:
            return self.raw_ND[offset : offset + take].float()
        return self.raw_ND.index_select(0, self.order_M[offset : offset + take]).float()
