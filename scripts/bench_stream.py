"""Benchmark the scaling store: streamed vs finished-store training, S3 vs local reads, bounded disk.

    .venv/bin/python scripts/bench_stream.py                 # all three, ~5 min on 2 CPU cores
    .venv/bin/python scripts/bench_stream.py --only reads    # reads | train | disk

1. reads: rows/s of one pass of the streaming reader (train.stream=true's) over the same finished
   store on the local disk and on a moto S3 server on this machine (needs `.[s3]`), and of the
   shuffled reader over the local store. Ratios, measured in the same run.
2. train: the same rows (a synthetic store of sparse planted features, d_in 64) trained for one pass
   streamed (windows of 4 shards) and shuffled over the whole finished store: tokens/s of each run
   and FVU of each final SAE on the same fresh rows.
3. disk: a tiny Llama harvested with harvest.keep_shards=6 while a streamed run consumes it (two
   processes): store bytes sampled every 20 ms, peak vs the whole store's bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sae_pipeline.data.reader import ShuffledReader  # noqa: E402
from sae_pipeline.data.source import open_source  # noqa: E402
from sae_pipeline.data.store import ActivationStore, read_manifest  # noqa: E402
from sae_pipeline.data.stream import StreamReader  # noqa: E402
from tests.support.synthetic import SyntheticFeatures, write_store  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}


def _pass(reader) -> float:
    start, rows = time.perf_counter(), 0
    while (x := reader.next_batch()) is not None:
        rows += x.shape[0]
        if getattr(reader, "epoch", 0) > 0:
            break
        if isinstance(reader, ShuffledReader) and rows >= reader.epoch_rows - reader.batch_size:
            break
    reader.close()
    return rows / (time.perf_counter() - start)


def bench_reads(tmp: Path) -> dict:
    gen = torch.Generator().manual_seed(0)
    shards = [torch.randn(16384, 576, generator=gen) for _ in range(8)]  # 8 x 37.7 MB float32
    local = write_store(tmp / "local", shards, 128)
    out = {
        "store": "8 shards x 16384 rows x 576 float32 (302 MB)",
        "stream_local_rows_per_s": _pass(StreamReader(open_source(local), 4096, window_shards=2)),
        "shuffled_local_rows_per_s": _pass(ShuffledReader(ActivationStore(local), 4096)),
    }
    try:
        import s3fs
        from moto.server import ThreadedMotoServer
    except ImportError:
        return {**out, "s3": "skipped: pip install '.[s3]'"}
    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    os.environ.update(AWS_ACCESS_KEY_ID="b", AWS_SECRET_ACCESS_KEY="b", AWS_DEFAULT_REGION="us-east-1")
    os.environ["AWS_ENDPOINT_URL"] = f"http://{host}:{port}"
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("bench")
    fs.put(str(local), "bench/store", recursive=True)
    out["stream_s3_rows_per_s"] = _pass(StreamReader(open_source("s3://bench/store"), 4096, window_shards=2))
    out["s3_over_local"] = out["stream_s3_rows_per_s"] / out["stream_local_rows_per_s"]
    srv.stop()
    return out


def bench_train(tmp: Path) -> dict:
    from sae_pipeline.sae import read_sae
    from sae_pipeline.schema import compose
    from sae_pipeline.train import run

    feats = SyntheticFeatures(n_features=256, d=64, mean_active=4.0, seed=0)
    torch.manual_seed(0)
    store = write_store(tmp / "planted", [feats.sample(8192) for _ in range(16)], 128)  # 131,072 rows
    test_x = feats.sample(16384)
    common = ["train=tiny", "logger=none", "sae=topk", "sae.k=8", "sae.d_sae=512", "train.batch_size=1024",
              "train.total_tokens=120000", "train.lr=3e-3", "train.val_every=0", "train.val_tokens=0",
              "train.checkpoint_every_tokens=0", "train.log_every=20", "train.advanced.buffer_rows=65536",
              "train.advanced.chunk_rows=4096"]  # fmt: skip
    out = {"store": "16 shards x 8192 rows, d_in 64, 256 planted features; TopK k=8, d_sae=512, one pass"}
    runs = [("finished", []), ("streamed", ["train.stream=true", "train.advanced.stream_window_shards=4"])]
    best: dict[str, dict] = {}
    for rep, (name, extra) in enumerate([runs[0], *runs, *runs]):  # a warm-up run, then alternating pairs
        run_dir = tmp / f"{name}-{rep}"
        start = time.perf_counter()
        run(compose("train", [f"store={store}", f"train.run_dir={run_dir}", *common, *extra]))
        wall = time.perf_counter() - start
        log = [json.loads(ln) for ln in (run_dir / "train_log.jsonl").read_text().splitlines()]
        tps = sorted(r["tokens_per_s"] for r in log if "tokens_per_s" in r)
        sae = read_sae(run_dir / "sae")
        with torch.no_grad():
            recon = sae(test_x)
        fvu = float((recon - test_x).square().sum() / (test_x - test_x.mean(0)).square().sum())
        res = {
            "tokens_per_s_median_log": tps[len(tps) // 2],
            "wall_s": round(wall, 2),
            "fvu_fresh_rows": round(fvu, 5),
        }
        if rep and res["tokens_per_s_median_log"] > best.get(name, {}).get("tokens_per_s_median_log", 0):
            best[name] = res  # the less disturbed of two runs on a shared machine
    out.update(best)
    out["streamed_over_finished_tokens_per_s"] = (
        best["streamed"]["tokens_per_s_median_log"] / best["finished"]["tokens_per_s_median_log"]
    )
    return out


def _du(folder: Path) -> tuple[int, int]:
    """(bytes of shard files, complete or being written; shard files) in the store folder."""
    try:
        files = [p for p in folder.iterdir() if p.name.startswith("shard-")]
        return sum(p.stat().st_size for p in files if p.exists()), len(files)
    except (FileNotFoundError, OSError):
        return 0, 0


def bench_disk(tmp: Path) -> dict:
    from tests.helpers import save_tiny_model, tiny_overrides, write_corpus

    model, corpus = save_tiny_model(tmp / "llama", "llama"), write_corpus(tmp / "c.jsonl", n_docs=40)
    args = [*tiny_overrides(tmp, model, corpus), "harvest.n_tokens=12000", "harvest.shard_size=100",
            "harvest.keep_shards=6", "harvest.advanced.shard_delay_s=0.1"]  # fmt: skip
    store = tmp / "runs" / "stores" / "tiny" / "corpus" / "blocks.1.hook_resid_post"
    py = [sys.executable, "-m"]
    h = subprocess.Popen(
        [*py, "sae_pipeline.harvest", *args], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    t = subprocess.Popen(
        [*py, "sae_pipeline.train", f"store={store}", "train=tiny", "logger=none", "train.stream=true",
         "train.advanced.stream_window_shards=2", "train.total_tokens=1000000", f"train.run_dir={tmp}/run"],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    peak, peak_files = 0, 0
    while h.poll() is None or t.poll() is None:
        size, files = _du(store)
        peak, peak_files = max(peak, size), max(peak_files, files)
        time.sleep(0.02)
    manifest = read_manifest(store)
    kept = [p.stat().st_size for p in store.glob("shard-*.safetensors")]
    shard_bytes = max(kept)  # every shard holds the same rows here
    total = shard_bytes * len(manifest["shards"])
    return {
        "harvest_rc": h.returncode, "train_rc": t.returncode, "shards": len(manifest["shards"]), "keep_shards": 6,
        "peak_shard_bytes": peak, "peak_shard_files": peak_files, "whole_store_shard_bytes": total,
        "peak_over_whole": peak / total, "peak_in_shards": peak / shard_bytes,
        "deleted": sum(bool(s.get("consumed")) for s in manifest["shards"]),
        "manifest_bytes": (store / "manifest.json").stat().st_size,
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["reads", "train", "disk"])
    a = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in (("reads", bench_reads), ("train", bench_train), ("disk", bench_disk)):
            if a.only in (None, name):
                (Path(tmp) / name).mkdir()
                results[name] = fn(Path(tmp) / name)
                print(json.dumps({name: results[name]}, indent=2), flush=True)


if __name__ == "__main__":
    main()
