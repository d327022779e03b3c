"""The GPU check (`make gpu-check`): what the first GPU this project is lent should answer, in one JSON + log.

    make gpu-bundle                      # here, with network: wheels for the node into gpu_bundle/
    make gpu-check                       # on the node: installs them into .gpu-site/, runs this script
    python3 scripts/gpu_check.py --out runs/gpu_check   # the same, once .gpu-site/ is on PYTHONPATH

Needs only torch, transformers, safetensors, numpy, fsspec, pyarrow and the bundle; no network, no model
weights (synthetic stores, random SAEs). Measured, in this order (about 3-4 minutes on one H100-class GPU):
  gemm:      the bf16 (and fp32/TF32) matmul rate of the SAE's three dense products on the device itself;
  step:      TopK training-step tokens/s under bf16 autocast and in fp32, their share of that bf16 roofline
             (bench_sae.py's convention: 10 * d_in * d_sae FLOP per token) and of the encoder GEMM alone
             (2 * d_in * d_sae), peak memory;
  reader:    ShuffledReader over a bf16 store into device memory (rows/s, GB/s), and its first batches
             compared bit for bit with the same reader on the CPU;
  train:     a short sae-train run on the device through the real run() (the trainer's tokens/s);
  latent_shards: train.latent_shards=2 as two torchrun processes (one per shard) against one process.
Without CUDA it runs the same steps at small shapes on the CPU (a rehearsal: only CUDA itself is untested).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from sae_pipeline.data.reader import ShuffledReader  # noqa: E402
from sae_pipeline.data.store import ActivationStore  # noqa: E402
from scripts.bench_sae import bench_arch, matmul_flops  # noqa: E402
from tests.support.synthetic import write_store  # noqa: E402

# shapes: a Gemma-2-2B-wide TopK SAE on a GPU; a small one for the CPU rehearsal
GPU = {
    "d_in": 2304,
    "expansion": 16,
    "batch": 8192,
    "k": 32,
    "steps": 20,
    "reader_rows": 262_144,
    "train_tokens": 8192 * 200,
}
CPU = {
    "d_in": 64,
    "expansion": 8,
    "batch": 512,
    "k": 16,
    "steps": 3,
    "reader_rows": 32_768,
    "train_tokens": 512 * 40,
}


def log(msg: str) -> None:
    print(msg, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm(device: torch.device, s: dict) -> dict:
    d_sae = s["d_in"] * s["expansion"]
    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        if device.type == "cpu" and dtype == torch.bfloat16:
            continue  # ~100x slower than fp32 on these CPUs: not a roofline anyone trains at
        out[f"{name}_tflops"] = matmul_flops(s["batch"], s["d_in"], d_sae, 5, device, dtype) / 1e12
    return out


def step(device: torch.device, s: dict, roofline_tflops: float) -> dict:
    d_sae = s["d_in"] * s["expansion"]
    out = {}
    for name, bf16 in (("bf16", True), ("fp32", False)):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        times = bench_arch("topk", s["d_in"], d_sae, s["batch"], s["k"], s["steps"], 0.1, device, bf16)
        tps = s["batch"] / min(times)
        out[name] = {
            "tokens_per_s": tps,
            "share_of_roofline": tps * 10 * s["d_in"] * d_sae / (roofline_tflops * 1e12),
            "share_of_encoder_gemm": tps * 2 * s["d_in"] * d_sae / (roofline_tflops * 1e12),
            "peak_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        }
    out["bf16_over_fp32"] = out["bf16"]["tokens_per_s"] / out["fp32"]["tokens_per_s"]
    out["roofline"] = "bf16 matmul" if device.type == "cuda" else "fp32 matmul (bf16 is no CPU's roofline)"
    return out


def make_store(folder: Path, rows: int, d_in: int) -> ActivationStore:
    shard_rows = min(16_384, rows)
    gen = torch.Generator().manual_seed(0)
    shards = [
        torch.randn(shard_rows, d_in, generator=gen).to(torch.bfloat16) for _ in range(rows // shard_rows)
    ]
    return ActivationStore(write_store(folder, shards, context_size=128))


def reader(device: torch.device, store: ActivationStore) -> dict:
    batch = 4096
    kw = dict(batch_size=batch, seed=0, val_tokens=4096)
    with ShuffledReader(store, device="cpu", **kw) as ref, ShuffledReader(store, device=device, **kw) as dev:
        same = all(torch.equal(ref.next_batch(), dev.next_batch().cpu()) for _ in range(20))
    r = ShuffledReader(store, device=device, **kw)
    n = r.epoch_rows // batch
    r.next_batch()  # the first window (start-up) is not the steady rate
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n - 1):
        r.next_batch()
    sync(device)
    seconds = time.perf_counter() - t0
    r.close()
    rows = (n - 1) * batch
    return {
        "rows_per_s": rows / seconds,
        "gb_per_s_store_bytes": rows * store.d_in * 2 / seconds / 1e9,
        "first_20_batches_equal_cpu_reader": same,
    }


def train_overrides(store: Path, run_dir: Path, device: torch.device, s: dict) -> list[str]:
    return [
        f"store={store}", f"train.run_dir={run_dir}", "logger=none", "sae=topk", f"sae.k={s['k']}",
        f"sae.d_sae={s['d_in'] * s['expansion']}", f"train.batch_size={s['batch']}",
        f"train.total_tokens={s['train_tokens']}", "train.eval_every=0", "train.val_tokens=4096",
        f"train.device={device.type}", "train.autocast=auto",
        "train.checkpoint_every_tokens=0", "train.overwrite=true",
    ]  # fmt: skip


def tokens_per_s(run_dir: Path) -> float | None:
    rows = [json.loads(ln) for ln in (run_dir / "train_log.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    return rates[-1] if rates else None


def train(device: torch.device, store: Path, work: Path, s: dict) -> dict:
    from hydra import compose, initialize_config_module

    from sae_pipeline.train import run

    with initialize_config_module("sae_pipeline.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=train_overrides(store, work / "train", device, s))
    t0 = time.perf_counter()
    run(cfg)
    return {"wall_s": time.perf_counter() - t0, "tokens_per_s_last_window": tokens_per_s(work / "train")}


def latent_shards(device: torch.device, store: Path, work: Path, s: dict) -> dict:
    """2 latent shards as 2 torchrun processes; on one GPU they cannot share it (see `where`)."""
    n_gpu = torch.cuda.device_count() if device.type == "cuda" else 0
    on = device if n_gpu >= 2 else torch.device("cpu")
    small = {**s, "train_tokens": s["batch"] * 20} if on.type == "cuda" else {**CPU, "train_tokens": 512 * 20}
    out = {
        "where": str(on),
        "why": "2 GPUs: one shard each over NCCL"
        if on.type == "cuda"
        else "one process per device under NCCL (cuda:LOCAL_RANK) and this node has "
        f"{n_gpu} GPUs, so the 2 shards run as 2 gloo processes on the CPU, at the CPU rehearsal's shape",
    }
    runs = {}
    for name, nproc, extra in (("one_process", 1, []), ("two_shards", 2, ["train.latent_shards=2"])):
        run_dir = work / f"shards-{name}"
        args = [*train_overrides(store, run_dir, on, small), *extra, f"hydra.run.dir={work / 'hydra'}"]
        t0 = time.perf_counter()
        res = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
             "-m", "sae_pipeline.train", *args],
            cwd=work, capture_output=True, text=True, timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)},
        )  # fmt: skip
        if res.returncode != 0:
            raise RuntimeError(f"{name} failed: {res.stderr[-2000:]}")
        runs[name] = {"wall_s": time.perf_counter() - t0, "tokens_per_s_last_window": tokens_per_s(run_dir)}
    from safetensors.torch import load_file

    a, b = (
        load_file(str(work / f"shards-{n}" / "sae" / "sae.safetensors"))
        for n in ("one_process", "two_shards")
    )
    out["max_relative_weight_difference"] = max(
        float((a[k].double() - b[k].double()).norm() / b[k].double().norm().clamp_min(1e-30)) for k in a
    )
    return {**out, **runs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_check")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    s = GPU if device.type == "cuda" else CPU
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as sae-train runs fp32 on CUDA
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})",
        "degraded": None if device.type == "cuda" else "no CUDA device: a CPU rehearsal at small shapes (fp32 roofline)",
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "shape": s,
    }  # fmt: skip
    t_start, failed = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        store = None

        def part(name, fn):
            log(f"== {name}")
            t0 = time.perf_counter()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                report[name] = fn()
            except Exception as err:  # noqa: BLE001 - every part is tried and its failure recorded
                report[name] = {"error": f"{type(err).__name__}: {err}"}
                failed.append(name)
                traceback.print_exc()
            report[name]["seconds"] = time.perf_counter() - t0
            if device.type == "cuda":  # this part's peak (the step's dtypes also have their own)
                report[name]["part_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
            log(json.dumps(report[name], indent=1))

        part("gemm", lambda: gemm(device, s))
        roof = report["gemm"].get("bf16_tflops") or report["gemm"].get("fp32_tflops") or float("nan")
        part("step", lambda: step(device, s, roof))
        store = make_store(work / "store", s["reader_rows"], s["d_in"])
        part("reader", lambda: reader(device, store))
        part("train", lambda: train(device, store.folder, work, s))
        part("latent_shards", lambda: latent_shards(device, store.folder, work, s))
    if device.type == "cuda":
        report["peak_mib_whole_check"] = max(
            r.get("part_peak_mib", 0) for r in report.values() if isinstance(r, dict)
        )
    report["wall_s"] = time.perf_counter() - t_start
    report["failed"] = failed
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    log(
        f"gpu-check: {'failed: ' + ', '.join(failed) if failed else 'all parts ran'}; {args.out / 'gpu_check.json'}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
