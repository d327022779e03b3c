"""One shuffled pass over a store that may still be harvested (`sae-train train.stream=true`).

    reader = StreamReader(open_source(store), batch_size=4096, seed=0, val_tokens=8192, window_shards=4)
    x_BD = reader.next_batch()     # float32 rows; None once the finished store has no full batch left
    state = reader.state()         # JSON-able; StreamReader(..., state=state) continues exactly

The order of rows is a function of the shard sequence and the seed alone:
  - window w is shards [w*k, (w+1)*k) (k = `window_shards`), in the order the harvest numbered them;
  - its rows (each shard already shuffled over its own contexts by the harvest) are permuted
    together with a generator seeded by (seed, w); windows follow each other, once.
The reader waits for window w until all k shards are listed in the manifest, or until the manifest
says the store is complete (the last window may hold fewer shards), so a harvest that runs ahead of
training or behind it gives the same batches; timing only decides how long `next_batch` blocks.

Mixing, compared with `ShuffledReader` on a finished store (which permutes every chunk of the whole
store): a batch here draws from the contexts of k consecutive shards only. The harvest packs documents
in a seeded random order, so a window still mixes many documents, but two windows never share rows and
the run makes exactly one pass. scripts/bench_stream.py measures what this costs in FVU.

Validation rows are whole contexts with the highest context ids of shard 0 (the last shard is not
known while the harvest runs); they never appear in a batch.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from sae_pipeline.data import consumers
from sae_pipeline.data.follow import StoreFollower
from sae_pipeline.data.reader import _put, _rng, _tensor_index
from sae_pipeline.data.source import ShardEntry, StoreSource
from sae_pipeline.errors import UserError

_STREAM_KEY = 0x5EED  # keeps the window permutations apart from ShuffledReader's
_END = object()


def planned_rows(manifest: dict) -> int | None:
    """Rows the harvest will write, known from its first manifest (None when it does not say)."""
    req, per = manifest.get("n_tokens_requested"), manifest.get("rows_per_context")
    if isinstance(req, int) and isinstance(per, int) and per > 0:
        return -(-req // per) * per
    if manifest.get("complete"):
        return sum(int(s["n_rows"]) for s in manifest["shards"])
    return None


class StreamReader:
    def __init__(
        self,
        source: StoreSource,
        batch_size: int,
        seed: int = 0,
        val_tokens: int = 0,
        window_shards: int = 4,
        prefetch: int = 1,
        state: dict | None = None,
        pin_memory: bool = False,
        wait_s: float = 3600.0,
        consumer: tuple[str, str] | None = None,
    ):
        if batch_size <= 0 or window_shards <= 0:
            raise UserError("train.batch_size and train.advanced.stream_window_shards must be positive")
        self.source, self.batch_size, self.seed = source, int(batch_size), int(seed)
        self.k, self.pin_memory, self._prefetch = int(window_shards), pin_memory, max(1, int(prefetch))
        self.on_wait = None  # called (once per window) when next_batch must wait for the harvest
        self.follower = StoreFollower(source, wait_s)
        self.d_in = int(self.follower.manifest["d_in"])
        # a bounded store (harvest.keep_shards): register as a consumer, refused if a needed shard is gone
        # (before shard 0 is read for the validation rows: its file may be one of them)
        self.bounded = bool(self.follower.manifest.get("bounded")) and consumer is not None
        self.consumer = consumer
        keep = int((self.follower.manifest.get("bounded") or {}).get("keep_shards", 0))
        if self.bounded and keep < 2 * self.k + 1:
            raise UserError(
                f"the store {source} keeps at most {keep} shards on disk (harvest.keep_shards), too few for "
                f"train.advanced.stream_window_shards={self.k}: it needs at least {2 * self.k + 1} (two windows and shard 0)"
            )
        if self.bounded:
            consumers.register(
                source.place,
                self.follower.manifest,
                consumer[0],
                consumer[1],
                int((state or {}).get("window", 0)) * self.k,
            )
        first = self.follower.shards_upto(1)
        if not first:
            raise UserError(f"the store {source} is complete but holds no shards")
        self._val_mask = self._choose_validation(first[0], int(val_tokens))
        self.n_validation_rows = 0 if self._val_mask is None else int(self._val_mask.sum())
        planned = planned_rows(self.follower.manifest)
        self.epoch_rows = None if planned is None else planned - self.n_validation_rows
        state = state or {}
        self.epoch = 0
        self.position = int(state.get("position", 0))
        self._w = int(state.get("window", 0))
        self._window_start = int(state.get("window_start", 0))
        self._window: torch.Tensor | None = None
        self._ended = False
        self._batch_start: dict | None = None
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()

    # ---- consumer progress (bounded stores) ---------------------------------------------------------
    def checkpointed(self) -> None:
        """A checkpoint holding `state()` is on disk: shards before its window may be deleted."""
        if self.bounded:
            consumers.progress(self.source.place, *self.consumer, self.state()["window"] * self.k)

    def finished(self) -> None:
        if self.bounded:
            consumers.progress(self.source.place, *self.consumer, 0, done=True)

    # ---- shards ----------------------------------------------------------------------------------
    def _acts(self, entry: ShardEntry):
        path = self.source.local_path(entry)  # sha256 checked
        acts = _tensor_index(path).get("activations")
        if acts is None or acts.shape != (entry.n_rows, self.d_in):
            got = None if acts is None else acts.shape
            raise UserError(
                f"the shard {path} has activations of shape {got}, but the manifest says ({entry.n_rows}, {self.d_in})"
            )
        return path, acts

    def _choose_validation(self, entry: ShardEntry, val_tokens: int) -> torch.Tensor | None:
        if val_tokens <= 0:
            return None
        if val_tokens > entry.n_rows:
            raise UserError(
                f"train.val_tokens={val_tokens} is more than the {entry.n_rows} rows of the store's first shard, "
                "where a streamed run's validation contexts come from; lower it"
            )
        path, acts = self._acts(entry)
        ctx = _tensor_index(path).get("context_ids")
        if ctx is None:
            raise UserError(f"the shard {path} has no context_ids, so no validation contexts can be held out")
        ctx_ids = ctx.read_rows(0, ctx.shape[0]).long()
        uniq, counts = torch.unique(ctx_ids, return_counts=True)
        n_ctx = int((torch.cumsum(counts.flip(0), 0) < val_tokens).sum()) + 1
        mask = torch.isin(ctx_ids, uniq.flip(0)[:n_ctx])
        self._val_rows = acts.read_rows(0, entry.n_rows)[mask].float()
        self.source.release(path)
        return mask

    def validation_rows(self) -> torch.Tensor:
        return self._val_rows if self._val_mask is not None else torch.empty(0, self.d_in)

    # ---- windows ---------------------------------------------------------------------------------
    def _window_shards(self, w: int) -> list[ShardEntry]:
        return self.follower.shards_upto((w + 1) * self.k)[w * self.k :]

    def _build(self, w: int, shards: list[ShardEntry]) -> torch.Tensor:
        parts = []
        with ThreadPoolExecutor(
            max_workers=min(4, len(shards))
        ) as pool:  # a remote window: parallel downloads
            found = list(pool.map(self._acts, shards))
        for entry, (path, acts) in zip(shards, found, strict=True):
            rows = acts.read_rows(0, entry.n_rows)
            self.source.release(path)
            if entry.index == 0 and self._val_mask is not None:
                rows = rows[~self._val_mask]
            parts.append(rows.float())
        x = torch.cat(parts)
        x = x[torch.randperm(x.shape[0], generator=_rng(self.seed, _STREAM_KEY, w))]
        return x.pin_memory() if self.pin_memory else x

    def _producer(self, w: int, out: queue.Queue, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                shards = self._window_shards(w)
                item = (w, self._build(w, shards)) if shards else _END
                _put(out, item, stop)
                if item is _END:
                    return
                w += 1
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            out.put(err)

    def _next_window(self) -> bool:
        if self._thread is None:
            self._queue, self._stop = queue.Queue(maxsize=self._prefetch), threading.Event()
            first = self._w if self._window is None else self._w + 1
            self._thread = threading.Thread(
                target=self._producer,
                args=(first, self._queue, self._stop),
                name="stream-reader",
                daemon=True,
            )
            self._thread.start()
        told = False
        while True:
            try:
                item = self._queue.get(timeout=0.2)
                break
            except queue.Empty:  # the harvest is behind: let the trainer checkpoint (and free shards) first
                if self.follower.waiting and self.on_wait is not None and not told:
                    self.on_wait()
                    told = True
        if isinstance(item, BaseException):
            self.close()
            if isinstance(item, UserError):
                raise UserError(str(item)) from None
            raise item
        if item is _END:
            self._ended = True
            return False
        if self._window is not None:
            self._window_start += self._window.shape[0]
        self._w, self._window = item
        return True

    # ---- public API --------------------------------------------------------------------------------
    def next_batch(self) -> torch.Tensor | None:
        """The next `batch_size` rows [B, D] (float32), or None when the complete store has fewer left."""
        parts, need = [], self.batch_size
        self._batch_start = self.state()  # what state() says until the batch is complete (see on_wait)
        while need > 0:
            if self._window is None or self.position >= self._window_start + self._window.shape[0]:
                if self._ended or not self._next_window():
                    return None
                continue
            offset = self.position - self._window_start
            take = min(need, self._window.shape[0] - offset)
            parts.append(self._window[offset : offset + take])
            need -= take
            self.position += take
        self._batch_start = None
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def state(self) -> dict:
        """Where the next batch starts (the window holding it and that window's first row); asked from
        `on_wait`, in the middle of a batch, where that batch started."""
        if self._batch_start is not None:
            return dict(self._batch_start)
        if self._window is not None and self.position == self._window_start + self._window.shape[0]:
            return {
                "epoch": 0,
                "position": self.position,
                "window": self._w + 1,
                "window_start": self.position,
            }
        return {"epoch": 0, "position": self.position, "window": self._w, "window_start": self._window_start}

    def sample(self, n: int) -> torch.Tensor:
        """The first `n` rows of the stream (window 0 on; no effect on the stream)."""
        out, got, w = [], 0, 0
        while got < n:
            shards = self._window_shards(w)
            if not shards:
                break
            out.append(self._build(w, shards)[: n - got])
            got, w = got + out[-1].shape[0], w + 1
        return torch.cat(out)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._thread = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
