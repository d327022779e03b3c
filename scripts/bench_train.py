"""Benchmark sae-train's data path: reader throughput vs training consumption, and reader memory.

    .venv/bin/python scripts/bench_train.py                      # d_in 576, 8x, batch 4096, CPU
    .venv/bin/python scripts/bench_train.py --arch topk --steps 5 --small-shards 2 --large-shards 8

1. Reader rows/s: one pass of the shuffled reader (background thread, default 65,536-row buffer)
   over a synthetic float32 store, consumed as fast as possible.
2. Training rows/s: the trainer's own step (forward, backward, clip, Adam, statistics) on batches
   of 4096 rows for an SAE of d_in 576 and 8x expansion. Target: reader >= 5x training.
3. Peak RSS of a subprocess reading a full pass of a small and a large store (the same shard
   size, 4x more shards). Target: independent of the store size (bounded by the buffer).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sae_pipeline.data.reader import ShuffledReader  # noqa: E402
from sae_pipeline.data.store import ActivationStore  # noqa: E402
from tests.support.synthetic import write_store  # noqa: E402


def make_store(folder: Path, n_shards: int, shard_rows: int, d_in: int, context_size: int = 128) -> Path:
    gen = torch.Generator().manual_seed(0)
    shards = (torch.randn(shard_rows, d_in, generator=gen) for _ in range(n_shards))
    return write_store(folder, shards, context_size)


def read_pass(store: Path, batch_size: int) -> dict:
    st = ActivationStore(store)
    reader = ShuffledReader(st, batch_size, seed=0, val_tokens=8192)
    n_batches = reader.epoch_rows // batch_size
    reader.next_batch()  # thread start-up and first buffer
    t0 = time.perf_counter()
    for _ in range(n_batches - 1):
        reader.next_batch()
    dt = time.perf_counter() - t0
    reader.close()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "rows": (n_batches - 1) * batch_size,
        "rows_per_s": (n_batches - 1) * batch_size / dt,
        "peak_rss_mb": rss_mb,
    }


def train_rate(arch: str, d_in: int, expansion: int, batch_size: int, steps: int) -> float:
    from omegaconf import OmegaConf

    from sae_pipeline.sae import CONFIG_CLASSES
    from sae_pipeline.schema.train import TrainConfig
    from sae_pipeline.training.member import Member

    tcfg = OmegaConf.structured(TrainConfig(batch_size=batch_size))
    member = Member(
        "", Path("."), CONFIG_CLASSES[arch](expansion_factor=expansion), d_in, tcfg, torch.device("cpu"), 1.0
    )
    x = torch.randn(batch_size, d_in)
    member.train_step(x, 0, 1e-4, 1.0, tcfg, _no_autocast)  # warm-up
    t0 = time.perf_counter()
    for step in range(steps):
        member.train_step(x, step + 1, 1e-4, 1.0, tcfg, _no_autocast)
    return steps * batch_size / (time.perf_counter() - t0)


def _no_autocast():
    import contextlib

    return contextlib.nullcontext()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-in", type=int, default=576)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--arch", default="relu")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--shard-rows", type=int, default=65_536)
    ap.add_argument("--small-shards", type=int, default=2)
    ap.add_argument("--large-shards", type=int, default=8)
    ap.add_argument("--read-pass", help=argparse.SUPPRESS)  # internal: one pass in a fresh process
    args = ap.parse_args()
    if args.read_pass:
        print(json.dumps(read_pass(Path(args.read_pass), args.batch_size)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for label, n in (("small", args.small_shards), ("large", args.large_shards)):
            folder = make_store(Path(tmp) / label, n, args.shard_rows, args.d_in)
            gb = n * args.shard_rows * args.d_in * 4 / 1e9
            out = subprocess.run(
                [sys.executable, __file__, "--read-pass", str(folder), "--batch-size", str(args.batch_size)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            results[label] = {**json.loads(out.stdout.strip().splitlines()[-1]), "store_gb": gb}
            print(f"reader {label:5s} store {gb:5.2f} GB: {results[label]['rows_per_s']:>10,.0f} rows/s, "
                  f"peak RSS {results[label]['peak_rss_mb']:,.0f} MB", flush=True)  # fmt: skip
    rate = train_rate(args.arch, args.d_in, args.expansion, args.batch_size, args.steps)
    reader_rate = min(r["rows_per_s"] for r in results.values())
    print(f"training ({args.arch}, d_in {args.d_in}, {args.expansion}x, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads): {rate:,.0f} rows/s")  # fmt: skip
    print(f"reader / training = {reader_rate / rate:.1f}x (target >= 5x)")
    ratio = results["large"]["peak_rss_mb"] / results["small"]["peak_rss_mb"]
    print(f"peak RSS large / small store = {ratio:.2f} (target ~1.0, store size ratio "
          f"{args.large_shards / args.small_shards:.0f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
