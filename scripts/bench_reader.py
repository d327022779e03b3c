"""Benchmark the shuffled reader against a plain sequential read of the same shard files, same run.

    .venv/bin/python scripts/bench_reader.py                        # d_in 576 and 2304, fp32 and bf16 stores
    .venv/bin/python scripts/bench_reader.py --before main~1        # also the reader of that git revision
    .venv/bin/python scripts/bench_reader.py --rows 262144 --repeats 5 --json out.json

For each store (random rows, shards of 16,384 rows, written to a temporary folder), three rates:
  plain:   every shard file read front to back into one reused buffer (what no reader can beat here);
  feed:    every shuffle window of one pass prepared for a GPU, i.e. the host's whole share of the work:
           rows read in the store's dtype into one buffer per window by the reading threads, plus the
           window's order (the gather and float32 conversion then run on the device). It runs in a
           thread of its own, as the reader's thread does (inside the reader module's
           `serial_torch_ops` where it has one), with a reader kept open across passes: the steady
           state of a long run, start-up untimed and buffers reused where the reader reuses them. For
           a reader without `_window_order` (e.g. 6085e4a), its window as it was handed to the device
           (float32, shuffled on the host);
  batches: one pass of float32 batches of 4096 rows on the CPU (device=cpu), start-up included.
--before REV loads reader.py of that git revision together with the transfer.py and serial.py it
imported there (where they exist), so both readers run in the same process on the same stores.
Freed memory is kept for reuse as sae-train keeps it on the CPU (runtime.keep_freed_memory). The
reader uses the schema's buffer, chunk and thread defaults. The page cache is warmed and the shards'
checksums are checked by an untimed pass first. Each measurement is repeated (in turn, so load on a
shared machine hits them alike) and the median is reported: rows/s, GB/s of activation bytes, and the
share of the plain read's rows/s. Every line printed ends with the load average (1, 5, 15 minutes):
compare only numbers of one run.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sae_pipeline.data.reader import ShuffledReader  # noqa: E402
from sae_pipeline.data.store import ActivationStore  # noqa: E402
from sae_pipeline.runtime import keep_freed_memory  # noqa: E402
from sae_pipeline.schema.train import TrainConfig  # noqa: E402
from tests.support.synthetic import write_store  # noqa: E402

SHARD_ROWS, BATCH = 16_384, 4096


def _load_old(rev: str, name: str, folder: Path):
    """sae_pipeline/data/<name>.py at git revision `rev` as the module `<name>_before` (None: not there)."""
    got = subprocess.run(
        ["git", "show", f"{rev}:sae_pipeline/data/{name}.py"], cwd=ROOT, capture_output=True, text=True
    )
    if got.returncode != 0:
        return None
    path = folder / f"{name}_before.py"
    path.write_text(got.stdout)
    spec = importlib.util.spec_from_file_location(f"{name}_before", path)
    module = sys.modules[f"{name}_before"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def old_reader_class(rev: str):
    """`ShuffledReader` as it was at git revision `rev`, importing the transfer and serial modules of `rev`
    (each loaded from a temporary file and standing in for today's while the old reader is imported)."""
    folder = Path(tempfile.mkdtemp())
    saved = {}
    try:
        for name in ("serial", "transfer"):
            key = f"sae_pipeline.data.{name}"
            saved[key] = sys.modules.get(key)
            old = _load_old(rev, name, folder)
            if old is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = old
        return _load_old(rev, "reader", folder).ShuffledReader
    finally:
        for key, module in saved.items():
            if module is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = module


def load() -> str:
    return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def make_store(folder: Path, rows: int, d_in: int, dtype: torch.dtype) -> ActivationStore:
    shard = torch.randn(SHARD_ROWS, d_in, generator=torch.Generator().manual_seed(d_in)).to(dtype)
    write_store(folder, [shard] * (rows // SHARD_ROWS), context_size=128)
    return ActivationStore(folder)


def plain_read(store: ActivationStore) -> float:
    """Seconds to read every shard file front to back."""
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    start = time.perf_counter()
    for shard in store.shards:
        with open(shard.path, "rb", buffering=0) as f:
            while f.readinto(view):
                pass
    return time.perf_counter() - start


def _open(cls, store: ActivationStore):
    cfg = TrainConfig()
    return cls(
        store,
        BATCH,
        seed=0,
        val_tokens=0,
        buffer_rows=cfg.advanced.buffer_rows,
        chunk_rows=cfg.advanced.chunk_rows,
    )


def reader_pass(cls, store: ActivationStore) -> float:
    """Seconds for one pass of a reader (float32 batches on the CPU), start-up included."""
    start = time.perf_counter()
    reader = _open(cls, store)
    for _ in range(reader.epoch_rows // BATCH):
        x = reader.next_batch()
        assert x.dtype == torch.float32
    reader.close()
    return time.perf_counter() - start


def feed_pass(reader) -> float:
    """Seconds for an open reader to prepare every window of one pass as it is handed to a GPU (see the
    module docstring), in a thread of its own."""
    serial = getattr(sys.modules[type(reader).__module__], "serial_torch_ops", None)  # the reader's own
    errors = []

    def feed() -> None:
        try:
            with serial() if serial else contextlib.nullcontext():
                prepare = getattr(reader, "_window_order", None) or reader._build_window  # new, or old
                for w, chunks in enumerate(reader._windows(0)):
                    prepare(0, w, chunks)
        except BaseException as err:  # noqa: BLE001 - raised in the calling thread
            errors.append(err)

    start = time.perf_counter()
    thread = threading.Thread(target=feed, name="bench-feed")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - start


def bench_store(store: ActivationStore, readers: dict, repeats: int) -> dict:
    act_bytes = store.n_rows * store.d_in * torch.empty(0, dtype=store.dtype).element_size()
    file_bytes = sum(s.path.stat().st_size for s in store.shards)
    plain_read(store)  # warm the page cache
    feeders = {name: _open(cls, store) for name, cls in readers.items()}  # open for the whole run
    for name, cls in readers.items():
        reader_pass(cls, store)  # checksums checked once, code paths warm
        feed_pass(feeders[name])  # a steady state: host buffers allocated (and reused, where they are)
    runs = {"plain": (functools.partial(plain_read, store), store.n_rows)}
    for name, cls in readers.items():
        runs[f"{name}_feed"] = (functools.partial(feed_pass, feeders[name]), store.n_rows)
        batch_rows = (store.n_rows // BATCH) * BATCH
        runs[f"{name}_batches"] = (functools.partial(reader_pass, cls, store), batch_rows)
    times = {key: [] for key in runs}
    for _ in range(repeats):
        for key, (fn, _) in runs.items():
            times[key].append(fn())
    for reader in feeders.values():
        reader.close()
    out = {
        "rows": store.n_rows,
        "d_in": store.d_in,
        "dtype": store.manifest["dtype"],
        "file_bytes": file_bytes,
    }
    for key, (_, rows) in runs.items():
        s = statistics.median(times[key])
        out[key] = {"rows_per_s": rows / s, "gb_per_s": rows * act_bytes / store.n_rows / s / 1e9}
    plain = out["plain"]["rows_per_s"]
    for key in runs:
        out[key]["share_of_plain"] = out[key]["rows_per_s"] / plain
    out["seconds"] = times
    out["load_average"] = os.getloadavg()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=131_072, help="rows per store (a multiple of 16384)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--d-in", type=int, nargs="+", default=[576, 2304])
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--before", help="also time the reader of this git revision (e.g. main)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    keep_freed_memory()  # as sae-train does on the CPU: a freed window's memory is reused, not faulted in again
    readers = {"reader": ShuffledReader}
    if args.before:
        readers["before"] = old_reader_class(args.before)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_reader_") as tmp:
        for d_in in args.d_in:
            for dtype in args.dtype:
                folder = Path(tmp) / f"d{d_in}-{dtype}"
                store = make_store(folder, args.rows, d_in, getattr(torch, dtype))
                r = bench_store(store, readers, args.repeats)
                results.append(r)
                print(
                    f"d_in {d_in} {dtype}, {args.rows:,} rows, medians of {args.repeats}: {load()}",
                    flush=True,
                )
                for key in [k for k in r if isinstance(r[k], dict) and "rows_per_s" in r[k]]:
                    q = r[key]
                    print(
                        f"  {key:<16} {q['rows_per_s']:>11,.0f} rows/s {q['gb_per_s']:>6.2f} GB/s "
                        f"{q['share_of_plain']:>5.0%} of plain  {load()}",
                        flush=True,
                    )
                for shard in store.shards:  # free the disk before the next store
                    shard.path.unlink()
    if args.json:
        args.json.write_text(json.dumps({"repeats": args.repeats, "results": results}, indent=1))


if __name__ == "__main__":
    main()
