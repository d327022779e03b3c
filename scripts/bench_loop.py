"""The training loop against the bare step: `sae-train`'s own tokens/s as a share of bench_sae.py's step rate.

    .venv/bin/python scripts/bench_loop.py                       # d_in 576, 8x, batch 4096, every arch
    .venv/bin/python scripts/bench_loop.py --batch 1024 --windows 2 --archs topk relu --widths 8 16
    .venv/bin/python scripts/bench_loop.py --archs topk --widths 8 32 --width-archs topk --windows 4 --log-every 3

1. Loop / step, per architecture: the real `sae-train` (`train.run` on a synthetic float32 store in a
   temporary folder, logger=none, validation and loss-recovered off, one final checkpoint) reports
   tokens/s per log window (`log_every` steps: reader, step, statistics, finiteness check, log line);
   bench_sae.py's `bench_arch` times the bare step (forward, backward, Adam, decoder renorm) on the same
   shapes in the same process. Both are the best of their repetitions (the machine may be shared;
   --rounds N alternates the two N times so that a burst of load from elsewhere hits both).
   Target: loop / step >= 90% for every architecture. Beside them, the encoder's dense GEMM alone
   (x_BD @ W_enc_DF at the same shape, timed in the same rounds) as tokens/s, and loop / GEMM: the K-sparse
   architectures do nothing else dense, so this is how close their loop is to its limit (issue 21: >= 70%).
2. Width scaling: the loop's tokens/s for each --width-archs architecture (default TopK and ReLU) at each
   --widths expansion, with the fraction of the relevant roofline: ReLU is dense (10 * d_in * d_sae FLOP per
   token); the K-sparse architectures' only dense product is the encoder (2 * d_in * d_sae FLOP per token;
   top-k, decode and backward touch K latents per row), others count as dense. The roofline FLOP/s is
   bench_sae.py's matmul reference on the same shapes (best of before/after); loop / GEMM as in table 1.

The load average is printed with the results: on a shared machine, compare ratios from one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_sae import bench_arch, best_time, matmul_flops  # noqa: E402

from sae_pipeline.runtime import keep_freed_memory  # noqa: E402
from sae_pipeline.sae import CONFIG_CLASSES  # noqa: E402
from sae_pipeline.schema import compose  # noqa: E402
from tests.support.synthetic import write_store  # noqa: E402


def make_store(folder: Path, rows: int, d_in: int, context_size: int = 128) -> Path:
    gen = torch.Generator().manual_seed(0)
    n_ctx = -(-rows // context_size)
    shard_ctx = max(1, 65_536 // context_size)
    shards = []
    for start in range(0, n_ctx, shard_ctx):
        n = min(shard_ctx, n_ctx - start) * context_size
        shards.append(torch.randn(n, d_in, generator=gen))
    return write_store(folder, iter(shards), context_size)


SPARSE_ARCHS = ("topk", "batchtopk", "matryoshka")  # one dense product per step: the encoder's


def gemm_rate(batch: int, d_in: int, d_sae: int, repeats: int = 3) -> float:
    """Tokens/s of the encoder's dense GEMM alone, x_BD @ W_enc_DF at this shape (best of repeats)."""
    g = torch.Generator().manual_seed(0)
    x_BD, W_DF = torch.randn(batch, d_in, generator=g), torch.randn(d_in, d_sae, generator=g)
    out_BF = torch.empty(batch, d_sae)
    return batch / best_time(lambda: torch.mm(x_BD, W_DF, out=out_BF), repeats)


def loop_rate(
    store: Path, run_dir: Path, arch: str, d_sae: int, batch: int, k: int, windows: int, every: int
):
    """Best tokens/s over the log windows of one real `sae-train` run (the first window is warm-up)."""
    from sae_pipeline.train import run

    steps = every * (windows + 1)
    overrides = [
        f"store={store}", f"train.run_dir={run_dir}", f"sae={arch}", f"sae.d_sae={d_sae}", "logger=none",
        f"train.batch_size={batch}", f"train.total_tokens={steps * batch}", f"train.log_every={every}",
        "train.val_every=0", "train.val_tokens=0", "train.eval_every=0", "train.checkpoint_every_tokens=0",
        "train.device=cpu", f"train.advanced.init_tokens={min(16_384, batch)}", f"train.advanced.buffer_rows={max(65_536, batch)}",
        "train.lr=1e-4",
    ]  # fmt: skip
    if arch in ("topk", "batchtopk"):  # as bench_sae.py: the other archs keep their default k
        overrides.append(f"sae.k={k}")
    run(compose("train", overrides))
    lines = [json.loads(ln) for ln in (run_dir / "train_log.jsonl").read_text().splitlines()]
    rates = [ln["tokens_per_s"] for ln in lines if "tokens_per_s" in ln]
    return max(rates[1:] or rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-in", type=int, default=576)
    ap.add_argument("--expansion", type=float, default=8.0)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3, help="timed bare steps per arch (best is kept)")
    ap.add_argument("--windows", type=int, default=3, help="timed log windows of the loop (best is kept)")
    ap.add_argument("--log-every", type=int, default=2, help="steps per log window")
    ap.add_argument("--rounds", type=int, default=1, help="alternations of bare step and loop (best kept)")
    ap.add_argument("--archs", nargs="+", default=list(CONFIG_CLASSES))
    ap.add_argument("--widths", nargs="*", type=float, default=[8, 16, 32], help="expansions for table 2")
    ap.add_argument("--width-archs", nargs="+", default=["topk", "relu"], help="architectures for table 2")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    keep_freed_memory()
    d_sae = round(args.expansion * args.d_in)
    rows = args.batch * (args.log_every * (args.windows + 1) + 1)
    results = {"load_average_before": os.getloadavg(), "threads": torch.get_num_threads(), "loop_vs_step": {}}
    print(f"CPU float32, {torch.get_num_threads()} threads, d_in={args.d_in}, batch={args.batch}, k={args.k}, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(Path(tmp) / "store", rows, args.d_in)
        print(f"\n1. loop / step at d_sae={d_sae} ({args.expansion:g}x)", flush=True)
        print(f"{'arch':<11} {'step tok/s':>11} {'loop tok/s':>11} {'loop/step':>10} {'GEMM tok/s':>11} "
              f"{'loop/GEMM':>10}", flush=True)  # fmt: skip
        for i, arch in enumerate(args.archs):
            step_tps = loop_tps = gemm_tps = 0.0
            for r in range(args.rounds):  # bare step and loop alternate, so a burst of load hits both
                step_s = min(bench_arch(arch, args.d_in, d_sae, args.batch, args.k, args.steps, 0.0))
                step_tps = max(step_tps, args.batch / step_s)
                gemm_tps = max(gemm_tps, gemm_rate(args.batch, args.d_in, d_sae))
                rate = loop_rate(
                    store,
                    Path(tmp) / f"r{i}-{r}",
                    arch,
                    d_sae,
                    args.batch,
                    args.k,
                    args.windows,
                    args.log_every,
                )
                loop_tps = max(loop_tps, rate)
                gemm_tps = max(gemm_tps, gemm_rate(args.batch, args.d_in, d_sae))
            results["loop_vs_step"][arch] = {"step": step_tps, "loop": loop_tps, "ratio": loop_tps / step_tps,
                                             "gemm": gemm_tps, "loop_vs_gemm": loop_tps / gemm_tps}  # fmt: skip
            print(f"{arch:<11} {step_tps:>11,.0f} {loop_tps:>11,.0f} {loop_tps / step_tps:>10.1%} "
                  f"{gemm_tps:>11,.0f} {loop_tps / gemm_tps:>10.1%}", flush=True)  # fmt: skip
        if args.widths:
            print(
                "\n2. loop tokens/s by width (fraction of the roofline: dense 10*D*F, K-sparse encoder 2*D*F)"
            )
            print(f"{'arch':<10} {'width':>6} {'d_sae':>7} {'tok/s':>9} {'GFLOP/s ref':>12} {'fraction':>9} "
                  f"{'GEMM tok/s':>11} {'loop/GEMM':>10}", flush=True)  # fmt: skip
            results["widths"] = []
            for w in args.widths:
                f = round(w * args.d_in)
                ref = [matmul_flops(args.batch, args.d_in, f, 2)]
                for arch in args.width_archs:
                    flop = 2.0 if arch in SPARSE_ARCHS else 10.0
                    gemm_tps = gemm_rate(args.batch, args.d_in, f)
                    tps = loop_rate(
                        store,
                        Path(tmp) / f"w{w}{arch}",
                        arch,
                        f,
                        args.batch,
                        args.k,
                        args.windows,
                        args.log_every,
                    )
                    ref.append(matmul_flops(args.batch, args.d_in, f, 2))
                    gemm_tps = max(gemm_tps, gemm_rate(args.batch, args.d_in, f))
                    frac = tps * flop * args.d_in * f / max(ref)
                    results["widths"].append({"arch": arch, "width": w, "d_sae": f, "tokens_per_s": tps,
                                              "matmul_gflops": max(ref) / 1e9, "roofline_fraction": frac,
                                              "gemm_tokens_per_s": gemm_tps, "loop_vs_gemm": tps / gemm_tps})  # fmt: skip
                    print(f"{arch:<10} {w:>5g}x {f:>7} {tps:>9,.0f} {max(ref) / 1e9:>12.1f} {frac:>9.1%} "
                          f"{gemm_tps:>11,.0f} {tps / gemm_tps:>10.1%}", flush=True)  # fmt: skip
    results["load_average_after"] = os.getloadavg()
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), **results}, indent=2))


if __name__ == "__main__":
    main()
