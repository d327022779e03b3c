"""What checking every shard's sha256 on first read costs the trainer (it runs on the reader thread).

    .venv/bin/python scripts/bench_integrity.py                  # 4 shards x 32768 rows x d_in 576 (300 MB)
    .venv/bin/python scripts/bench_integrity.py --steps 40 --shards 8

For the same store, with the check on and off (ShardChecker.check replaced by a no-op):
1. sha256 throughput of the shard files;
2. the wait for the first batch, and one pass of the reader consumed as fast as possible (the worst case:
   nothing to hide the hashing behind);
3. `--steps` training steps of a ReLU SAE (d_in 576, 8x, batch 4096): wall time and the time the training
   loop waited on the reader. The claim to check: the same with and without the check.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sae_pipeline.data.reader import ShuffledReader  # noqa: E402
from sae_pipeline.data.store import ActivationStore  # noqa: E402
from sae_pipeline.files import sha256_file  # noqa: E402
from sae_pipeline.integrity import shard as integrity  # noqa: E402
from scripts.bench_train import _no_autocast, make_store  # noqa: E402


def measure(folder: Path, batch_size: int, steps: int, member) -> dict:
    st = ActivationStore(folder)
    t0 = time.perf_counter()
    reader = ShuffledReader(st, batch_size, seed=0, val_tokens=4096)
    reader.next_batch()
    first = time.perf_counter() - t0
    n = reader.epoch_rows // batch_size - 1
    t0 = time.perf_counter()
    for _ in range(n):
        reader.next_batch()
    pass_s = time.perf_counter() - t0
    reader.close()
    reader, waited = ShuffledReader(st, batch_size, seed=1, val_tokens=4096), 0.0
    t0 = time.perf_counter()
    for step in range(steps):
        tick = time.perf_counter()
        x = reader.next_batch()
        waited += time.perf_counter() - tick
        member.train_step(x, step, 1e-4, 1.0, member.tcfg, _no_autocast)
    train_s = time.perf_counter() - t0
    reader.close()
    return {"first_batch_s": first, "pass_s": pass_s, "train_s": train_s, "waited_s": waited}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--shard-rows", type=int, default=32_768)
    ap.add_argument("--d-in", type=int, default=576)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    from omegaconf import OmegaConf

    from sae_pipeline.sae import CONFIG_CLASSES
    from sae_pipeline.schema.train import TrainConfig
    from sae_pipeline.training.member import Member

    tcfg = OmegaConf.structured(TrainConfig(batch_size=args.batch_size))
    member = Member("", Path("."), CONFIG_CLASSES["relu"](expansion_factor=8), args.d_in, tcfg, "cpu", 1.0)
    member.tcfg = tcfg
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_store(Path(tmp) / "s", args.shards, args.shard_rows, args.d_in)
        files = sorted(folder.glob("shard-*"))
        mb = sum(f.stat().st_size for f in files) / 1e6
        t0 = time.perf_counter()
        for f in files:
            sha256_file(f)
        print(f"store {mb:.0f} MB in {len(files)} shards; sha256 {mb / (time.perf_counter() - t0):,.0f} MB/s")
        real = integrity.ShardChecker.check
        rows = {}
        for label in ("checked", "unchecked", "checked again"):
            integrity.ShardChecker.check = real if label.startswith("checked") else (lambda self, i: None)
            rows[label] = measure(folder, args.batch_size, args.steps, member)
            r = rows[label]
            print(f"{label:13s}: first batch {r['first_batch_s']:.2f} s, reader pass {r['pass_s']:.2f} s, "
                  f"{args.steps} training steps {r['train_s']:.2f} s of which waiting on the reader "
                  f"{r['waited_s']:.2f} s", flush=True)  # fmt: skip
        integrity.ShardChecker.check = real


if __name__ == "__main__":
    main()
