"""Shuffled, resumable streaming reader over an activation store.

    reader = ShuffledReader(store, batch_size=4096, seed=0, val_tokens=8192)
    x_BD = reader.next_batch()          # float32 on `device` (default cpu), shuffled, never a validation row
    state = reader.state()              # {"epoch": e, "position": p}: JSON-able
    ShuffledReader(store, ..., state=state) continues with exactly the same batches.

How rows are ordered (a pure function of seed and epoch, so any position can be re-created
without replaying the past):
  1. every shard is cut into chunks of `chunk_rows` contiguous rows;
  2. each epoch permutes all chunks of the store (seed, epoch);
  3. consecutive runs of permuted chunks form windows of about `buffer_rows` rows (the shuffle
     buffer); the rows of each window are permuted again (seed, epoch, window).
The epoch's stream is the concatenation of its windows; epochs follow each other without a
gap, so a batch may straddle two passes. Resident memory is bounded by the buffer size
(`prefetch + 2` windows at most), whatever the store size.

How rows travel (data/transfer.py): `read_threads` threads (torch ops inline, data/serial.py), a share of a
window's chunks each, read them from the shard files into one host buffer in the store's dtype (a ring of
`prefetch + 2`, page-locked for CUDA); the buffer and the window's order (its permutation, validation rows
left out) go to `device` together, and `next_batch` gathers a new float32 tensor there. The order is the
same on every device, so a run and its resume see the same rows wherever the gather runs.

Validation: whole contexts with the highest context ids of the last shard (at least
`val_tokens` rows) are kept out of training; `validation_rows()` returns them.
"""

from __future__ import annotations

import contextlib
import json
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch

from sae_pipeline.data.serial import serial_torch_ops
from sae_pipeline.data.store import ActivationStore
from sae_pipeline.data.transfer import DeviceWindow, HostBuffers
from sae_pipeline.errors import UserError
from sae_pipeline.integrity.shard import ShardChecker

_NP_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I32": np.int32, "I64": np.int64}
_TORCH_VIEW = {"BF16": torch.bfloat16}
_TORCH_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "I64": torch.int64,
}


@dataclass(frozen=True)
class _Tensor:
    """Where one tensor lives inside a safetensors file."""

    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * np.dtype(_NP_DTYPES[self.dtype]).itemsize

    def read_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) through a short-lived memory map (copied out, then unmapped)."""
        try:
            mm = np.memmap(
                self.path,
                dtype=_NP_DTYPES[self.dtype],
                mode="r",
                offset=self.offset + start * self.row_bytes,
                shape=(stop - start, *self.shape[1:]),
            )
            out = torch.from_numpy(np.array(mm))
            del mm
        except (OSError, ValueError) as err:
            raise UserError(f"the shard {self.path} could not be read ({err})") from None
        if self.dtype in _TORCH_VIEW:
            out = out.view(_TORCH_VIEW[self.dtype])
        return out

    def read_into(self, start: int, out: torch.Tensor) -> None:
        """Rows [start, start + len(out)) straight from the file into `out` (a contiguous host tensor)."""
        want = out.shape[0] * self.row_bytes
        view = memoryview(out.view(torch.uint8).numpy()).cast("B")
        try:
            with open(self.path, "rb", buffering=0) as f:
                f.seek(self.offset + start * self.row_bytes)
                got = 0
                while got < want:  # readinto releases the GIL: several chunks are read at once
                    n = f.readinto(view[got:want])
                    if not n:
                        raise OSError(
                            f"it ends {want - got} bytes before rows {start}..{start + out.shape[0]}"
                        )
                    got += n
        except OSError as err:
            raise UserError(f"the shard {self.path} could not be read ({err})") from None


def _tensor_index(path: Path) -> dict[str, _Tensor]:
    """Parse a safetensors header and check the file holds all the bytes it promises."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError("header length beyond the end of the file")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise UserError(f"the shard {path} listed in the manifest is missing") from None
    except (OSError, ValueError) as err:
        raise UserError(f"the shard {path} is corrupt or truncated ({err})") from None
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        if 8 + n + end > size:
            raise UserError(
                f"the shard {path} is truncated: it has {size} bytes but its tensor {name!r} ends at byte {8 + n + end}"
            )
        out[name] = _Tensor(path, info["dtype"], tuple(info["shape"]), 8 + n + begin)
    return out


@dataclass(frozen=True)
class _Chunk:
    shard: int
    start: int
    stop: int
    n_train: int  # rows of [start, stop) that are not validation rows


def _rng(*keys: int) -> torch.Generator:
    gen = torch.Generator()
    seed = 0
    for k in keys:  # a simple, stable mix of the keys into 63 bits
        seed = (seed * 1_000_003 + int(k) + 0x9E3779B9) % (1 << 63)
    gen.manual_seed(seed)
    return gen


def _put(out: queue.Queue, item, stop: threading.Event) -> bool:
    """Put `item` in `out` unless `stop` is set first; whether to go on (`stop` still not set)."""
    while not stop.is_set():
        with contextlib.suppress(queue.Full):
            out.put(item, timeout=0.1)
            break
    return not stop.is_set()


class ShuffledReader:
    def __init__(
        self,
        store: ActivationStore,
        batch_size: int,
        seed: int = 0,
        val_tokens: int = 0,
        buffer_rows: int = 65_536,
        chunk_rows: int = 4_096,
        prefetch: int = 1,
        state: dict | None = None,
        device: torch.device | str = "cpu",
        read_threads: int = 4,
    ):
        if batch_size <= 0 or buffer_rows <= 0 or chunk_rows <= 0 or read_threads <= 0:
            raise UserError(
                "train.batch_size, train.advanced.buffer_rows, train.advanced.chunk_rows and "
                "train.advanced.read_threads must be positive"
            )
        self.store, self.batch_size, self.seed = store, int(batch_size), int(seed)
        self.device, self.read_threads = torch.device(device), int(read_threads)
        self._pool: ThreadPoolExecutor | None = None
        self._checker = ShardChecker.of(store)  # each shard's sha256, the first time its rows are read
        self._acts = []
        for shard in store.shards:
            index = _tensor_index(shard.path)
            acts = index.get("activations")
            if acts is None or acts.shape != (shard.n_rows, store.d_in) or acts.dtype not in _NP_DTYPES:
                got = None if acts is None else (acts.dtype, acts.shape)
                raise UserError(
                    f"the shard {shard.path} has activations {got}, but the manifest says ({shard.n_rows}, {store.d_in})"
                )
            self._acts.append(acts)
        dtypes = {a.dtype for a in self._acts}  # one dtype per store; a mixed one is read as float32
        self._dtype = dtypes.pop() if len(dtypes) == 1 else "F32"
        last = store.shards[-1]
        self._val_mask, self._val_rows = self._choose_validation(last, int(val_tokens))
        self.chunks = []
        for shard in store.shards:
            for start in range(0, shard.n_rows, chunk_rows):
                stop = min(start + chunk_rows, shard.n_rows)
                n_val = 0
                if shard.index == last.index and self._val_mask is not None:
                    n_val = int(self._val_mask[start:stop].sum())
                if stop - start - n_val > 0:
                    self.chunks.append(_Chunk(shard.index, start, stop, stop - start - n_val))
        self.epoch_rows = sum(c.n_train for c in self.chunks)
        if self.epoch_rows == 0:
            raise UserError(
                f"train.val_tokens={val_tokens} leaves no training rows in the store {store.folder}"
            )
        self.chunks_per_window = max(1, round(buffer_rows / chunk_rows))
        state = state or {"epoch": 0, "position": 0}
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        if not 0 <= self.position < self.epoch_rows:
            raise UserError(
                f"the reader position {self.position} is outside the store ({self.epoch_rows} rows)"
            )
        self._prefetch = max(1, int(prefetch))
        self._buffers = self._host_buffers(1)  # for `_window_order` called directly (tests, benchmarks)
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._window: torch.Tensor | None = None  # the window holding `position`
        self._window_start = 0  # its first position within the epoch

    def _host_buffers(self, size: int) -> HostBuffers:
        return HostBuffers(size, self.store.d_in, _TORCH_DTYPES[self._dtype], self.device)

    # ---- validation -------------------------------------------------------------------------
    def _choose_validation(self, last, val_tokens: int):
        if val_tokens <= 0:
            return None, 0
        path = last.path
        if val_tokens > last.n_rows:
            raise UserError(
                f"train.val_tokens={val_tokens} is more than the {last.n_rows} rows of the store's last shard "
                f"{path}, where validation contexts come from; lower it"
            )
        self._checker.check(last.index)
        ctx = _tensor_index(path).get("context_ids")
        if ctx is None:
            raise UserError(f"the shard {path} has no context_ids, so no validation contexts can be held out")
        ctx_ids = ctx.read_rows(0, ctx.shape[0]).long()
        uniq, counts = torch.unique(ctx_ids, return_counts=True)
        cum = torch.cumsum(counts.flip(0), 0)  # rows of the highest contexts, largest id first
        n_ctx = int((cum < val_tokens).sum()) + 1
        held = uniq.flip(0)[: min(n_ctx, len(uniq))]
        mask = torch.isin(ctx_ids, held)
        return mask, int(mask.sum())

    def validation_rows(self) -> torch.Tensor:
        """The held-out rows (float32), never returned by `next_batch`."""
        if self._val_mask is None:
            return torch.empty(0, self.store.d_in)
        acts, mask, out = self._acts[-1], self._val_mask, []
        for start in range(0, acts.shape[0], 8192):
            stop = min(start + 8192, acts.shape[0])
            if mask[start:stop].any():
                out.append(acts.read_rows(start, stop)[mask[start:stop]].float())
        return torch.cat(out)

    @property
    def n_validation_rows(self) -> int:
        return self._val_rows

    # ---- the deterministic order --------------------------------------------------------------
    def _read_into(self, c: _Chunk, out: torch.Tensor) -> None:
        self._checker.check(c.shard)
        acts = self._acts[c.shard]
        if acts.dtype == self._dtype:
            acts.read_into(c.start, out)
        else:
            out.copy_(acts.read_rows(c.start, c.stop))

    def _read_share(self, chunks: list[_Chunk], outs: list[torch.Tensor]) -> None:
        with serial_torch_ops():
            for c, o in zip(chunks, outs, strict=True):
                self._read_into(c, o)

    def _window_rows(self, chunks: list[_Chunk], buffers: HostBuffers | None = None) -> tuple:
        """The chunks' rows as read (store dtype, in the next buffer of `buffers`, by default `_buffers`) and the
        positions of their training rows in it (None: all); each reading thread reads a run of chunks."""
        sizes = [c.stop - c.start for c in chunks]
        raw = (buffers or self._buffers).take(sum(sizes))
        starts = np.cumsum([0, *sizes]).tolist()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.read_threads, thread_name_prefix="store-read")
        outs = [raw[a:b] for a, b in zip(starts, starts[1:], strict=False)]
        cuts = np.searchsorted(starts, np.linspace(0, starts[-1], self.read_threads + 1)[1:-1]).tolist()
        tasks = [(chunks[a:b], outs[a:b]) for a, b in pairwise([0, *cuts, len(chunks)]) if b > a]
        for done in [self._pool.submit(self._read_share, *task) for task in tasks]:
            done.result()
        last = len(self._acts) - 1
        if self._val_mask is None or all(c.shard != last for c in chunks):
            return raw, None
        keep = torch.ones(raw.shape[0], dtype=torch.bool)
        for c, a in zip(chunks, starts, strict=False):
            if c.shard == last:
                keep[a : a + c.stop - c.start] = ~self._val_mask[c.start : c.stop]
        return raw, keep.nonzero().squeeze(1)

    def _windows(self, epoch: int) -> list[list[_Chunk]]:
        order = torch.randperm(len(self.chunks), generator=_rng(self.seed, epoch)).tolist()
        per = self.chunks_per_window
        return [[self.chunks[i] for i in order[k : k + per]] for k in range(0, len(order), per)]

    def _window_order(self, epoch: int, w: int, chunks: list[_Chunk], buffers: HostBuffers | None = None):
        """(rows as read, the shuffled order of the window's training rows in them)."""
        raw, keep = self._window_rows(chunks, buffers)
        n = raw.shape[0] if keep is None else keep.shape[0]
        perm = torch.randperm(n, generator=_rng(self.seed, epoch, w + 1))
        return raw, (perm if keep is None else keep[perm])

    def _build_window(self, epoch: int, w: int, chunks: list[_Chunk], buffers: HostBuffers) -> DeviceWindow:
        return buffers.sent(DeviceWindow.send(*self._window_order(epoch, w, chunks, buffers), self.device))

    def _producer(self, epoch: int, position: int, out: queue.Queue, stop: threading.Event) -> None:
        """Puts (epoch, window start, rows) for every window from the one holding `position` on."""
        buffers = self._host_buffers(self._prefetch + 2)  # > windows queued (prefetch) and served (1)
        try:
            with serial_torch_ops():
                while not stop.is_set():
                    start = 0
                    for w, chunks in enumerate(self._windows(epoch)):
                        n = sum(c.n_train for c in chunks)
                        if start + n > position:
                            item = (epoch, start, self._build_window(epoch, w, chunks, buffers))
                            if not _put(out, item, stop):
                                return
                        start += n
                    epoch, position = epoch + 1, 0
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            out.put(err)

    def _next_window(self) -> None:
        if self._thread is None:
            self._queue, self._stop = queue.Queue(maxsize=self._prefetch), threading.Event()
            self._thread = threading.Thread(
                target=self._producer,
                args=(self.epoch, self.position, self._queue, self._stop),
                name="store-reader",
                daemon=True,
            )
            self._thread.start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            if isinstance(item, UserError):
                raise UserError(str(item)) from None
            raise item
        epoch, self._window_start, self._window = item
        assert epoch == self.epoch, "reader thread out of step"

    # ---- public API -------------------------------------------------------------------------
    def next_batch(self) -> torch.Tensor:
        """The next `batch_size` training rows [B, D] (float32, on `device`)."""
        parts, need = [], self.batch_size
        while need > 0:
            if self._window is None or self.position >= self._window_start + len(self._window):
                self._next_window()
            offset = self.position - self._window_start
            take = min(need, len(self._window) - offset)
            parts.append(self._window.rows(offset, take))
            need -= take
            self.position += take
            if self.position == self.epoch_rows:
                self.epoch, self.position = self.epoch + 1, 0
                self._window_start, self._window = 0, None
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def state(self) -> dict:
        """Where the next batch starts: pass it back as `state=` to continue exactly."""
        return {"epoch": self.epoch, "position": self.position}

    def sample(self, n: int) -> torch.Tensor:
        """The first `n` rows of epoch 0, float32 on the CPU (a deterministic data sample; no effect on the
        stream)."""
        out, got = [], 0
        for w, chunks in enumerate(self._windows(0)):
            if got >= n:
                break
            window = DeviceWindow(*self._window_order(0, w, chunks, self._host_buffers(1)))
            out.append(window.rows(0, min(n - got, len(window))))
            got += out[-1].shape[0]
        return torch.cat(out)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._thread = None
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
