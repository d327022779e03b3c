"""Host rows onto the training device: reused (pinned) host buffers, copies on a side stream, rows gathered there.

    buffers = HostBuffers(prefetch + 2, d_in, torch.bfloat16, device)  # pinned when the device is CUDA
    buf = buffers.take(n_rows)                                # reader thread: the next buffer of the ring
    window = DeviceWindow.send(buf, order_N, device)          # reader thread: starts the copies
    buffers.sent(window)                                      # its buffer is free again once they land
    x_BD = window.rows(offset, take)                          # training thread: float32 rows (a new tensor)

The rows cross in the store's dtype (a bf16 store moves half the bytes of float32); the shuffle's gather
and the conversion to float32 run on the device. On CUDA the copies are issued on a side stream from the
reader thread, so they overlap the training step, and the training stream waits on an event, not the host.
On the CPU the window stays in its host buffer and each batch is gathered from it in the training thread
(a copy, so a batch never aliases a buffer that is read into again).

Host buffers are reused, not allocated per window: a fresh buffer of a window's size (tens to hundreds of
MB) is mapped anew by malloc for each window in a reading thread, and filling it costs a page fault per
4 KB. The ring holds `prefetch + 2` buffers: the one being read into, the `prefetch` windows queued for the
consumer and the one it is serving, so a buffer comes round again only after its window is done with; on
CUDA `take` also waits for the copies out of it to land.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def host_buffer(n_rows: int, d: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An empty [n_rows, d] buffer for reading rows into: page-locked when they go on to a GPU."""
    return torch.empty((n_rows, d), dtype=dtype, pin_memory=device.type == "cuda")


class HostBuffers:
    """A ring of `size` host buffers for windows of rows, each handed out again `size` windows later."""

    def __init__(self, size: int, d: int, dtype: torch.dtype, device: torch.device):
        self.d, self.dtype, self.device = d, dtype, device
        self._bufs: list[torch.Tensor | None] = [None] * size
        self._copied: list[torch.cuda.Event | None] = [None] * size  # when a CUDA copy out of each lands
        self._next = 0

    def take(self, n_rows: int) -> torch.Tensor:
        """The ring's next buffer as an [n_rows, d] tensor (contents undefined), grown if it is too small."""
        i = self._next
        self._next = (i + 1) % len(self._bufs)
        if self._copied[i] is not None:
            self._copied[i].synchronize()
            self._copied[i] = None
        buf = self._bufs[i]
        if buf is None or buf.shape[0] < n_rows:
            self._bufs[i] = buf = None  # the old one is freed before its successor is allocated
            self._bufs[i] = buf = host_buffer(n_rows, self.d, self.dtype, self.device)
        return buf[:n_rows]

    def sent(self, window: DeviceWindow) -> DeviceWindow:
        """The last buffer taken is read by `window`'s copies until they land (CUDA); returns `window`."""
        self._copied[(self._next - 1) % len(self._bufs)] = window.ready
        return window


_streams: dict[torch.device, torch.cuda.Stream] = {}


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _streams:
        _streams[device] = torch.cuda.Stream(device=device)
    return _streams[device]


@dataclass
class DeviceWindow:
    """A shuffle window on the device: its rows in the store's dtype and the order to serve them in."""

    raw_ND: torch.Tensor  # rows as read (store dtype), validation rows included
    order_M: torch.Tensor  # int64 row indices into raw_ND: the window's training rows, shuffled
    ready: torch.cuda.Event | None = None  # set when the copies have landed (CUDA only)

    @classmethod
    def send(cls, raw_ND: torch.Tensor, order_M: torch.Tensor, device: torch.device) -> DeviceWindow:
        if device.type != "cuda":  # gathered batch by batch in the training thread
            return cls(raw_ND.to(device), order_M)
        stream = _copy_stream(device)
        with torch.cuda.stream(stream):
            raw = raw_ND.to(device, non_blocking=True)
            order = order_M.pin_memory().to(device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(stream)
        return cls(raw, order, ready)

    def __len__(self) -> int:
        return self.order_M.shape[0]

    def rows(self, offset: int, take: int) -> torch.Tensor:
        """Rows [offset, offset + take) of the shuffled window: a new float32 tensor on the window's device."""
        if self.ready is not None:  # first use on the training stream: wait for the copies, keep the memory
            stream = torch.cuda.current_stream(self.raw_ND.device)
            stream.wait_event(self.ready)
            self.raw_ND.record_stream(stream)
            self.order_M.record_stream(stream)
            self.ready = None
        return self.raw_ND.index_select(0, self.order_M[offset : offset + take]).float()
