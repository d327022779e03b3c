"""Training-step throughput of every SAE architecture vs the dense matmul roofline (CPU float32).

    .venv/bin/python scripts/bench_sae.py                  # d_in 576, 8x, batch 4096, all archs
    .venv/bin/python scripts/bench_sae.py --steps 5 --json bench.json --archs relu topk

A step is: training_forward, backward, before_optimizer_step, Adam step, after_optimizer_step.
Roofline: a dense SAE step needs 10 * d_in * d_sae FLOP per token (encoder forward 2, decoder forward 2,
decoder weight + input gradients 4, encoder weight gradient 2); we divide by the FLOP/s torch.matmul reaches
on the same three shapes in this run. "fraction" = achieved tokens/s * 10 * d_in * d_sae / matmul FLOP/s.

The machine may be shared, so the matmul reference is re-measured before and after every architecture and
the best FLOP/s seen anywhere in the run is the roofline; step times are the minimum of --steps (the median
is printed too). Like sae-train on the CPU, it keeps freed memory in glibc's heap instead of returning every
large (>32 MB) block to the OS (each fresh B x F buffer, 75 MB here, otherwise costs ~18k page faults);
--no-malloc-tune measures the allocator's default behaviour.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from sae_pipeline.runtime import keep_freed_memory
from sae_pipeline.sae import CONFIG_CLASSES, build_sae


def step_times(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def best_time(fn, repeats: int) -> float:
    return min(step_times(fn, repeats))


def matmul_flops(batch: int, d_in: int, d_sae: int, repeats: int) -> float:
    """FLOP/s of the three dense products of an SAE step (x@W_enc, a@W_dec, x^T@g), best of repeats."""
    g = torch.Generator().manual_seed(0)
    x_BD, a_BF = torch.randn(batch, d_in, generator=g), torch.randn(batch, d_sae, generator=g)
    W_DF, W_FD = torch.randn(d_in, d_sae, generator=g), torch.randn(d_sae, d_in, generator=g)
    total = 0.0
    for fn in (lambda: x_BD @ W_DF, lambda: a_BF @ W_FD, lambda: x_BD.t() @ a_BF):
        total += best_time(fn, repeats)
    return 3 * 2.0 * batch * d_in * d_sae / total


def make_optimizer(params):
    try:
        return torch.optim.Adam(params, lr=1e-4, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=1e-4, foreach=True)


def bench_arch(
    arch: str, d_in: int, d_sae: int, batch: int, k: int, steps: int, dead_frac: float
) -> list[float]:
    overrides = {"k": k} if arch in ("topk", "batchtopk") else {}
    sae = build_sae(CONFIG_CLASSES[arch](d_sae=d_sae, **overrides), d_in, seed=0)
    g = torch.Generator().manual_seed(1)
    x_BD = torch.randn(batch, d_in, generator=g)  # mean norm ~ sqrt(d_in), like normalised inputs
    sae.init_from_data(x_BD[:1024])
    opt = make_optimizer(sae.parameters())
    dead_mask_F = torch.rand(d_sae, generator=g) < dead_frac

    def step():
        out = sae.training_forward(x_BD, dead_mask_F=dead_mask_F)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step()

    return step_times(step, steps)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--expansion", type=float, default=8.0)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per arch (best is reported)")
    parser.add_argument("--dead-frac", type=float, default=0.0, help="fraction of latents marked dead (AuxK)")
    parser.add_argument("--archs", nargs="+", default=list(CONFIG_CLASSES))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--json", type=str, default=None, help="write the results here")
    parser.add_argument("--ref-repeats", type=int, default=2, help="matmul reference repeats per measurement")
    parser.add_argument(
        "--no-malloc-tune",
        dest="malloc_tune",
        action="store_false",
        help="glibc's default: return freed memory",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tuned = keep_freed_memory() if args.malloc_tune else False
    d_sae = round(args.expansion * args.d_in)
    flops_seen = [matmul_flops(args.batch, args.d_in, d_sae, args.ref_repeats)]
    print(
        f"float32 CPU, threads={torch.get_num_threads()}, d_in={args.d_in}, d_sae={d_sae}, "
        f"batch={args.batch}, malloc_tune={tuned}"
    )
    raw = {}
    for arch in args.archs:
        raw[arch] = bench_arch(arch, args.d_in, d_sae, args.batch, args.k, args.steps, args.dead_frac)
        flops_seen.append(matmul_flops(args.batch, args.d_in, d_sae, args.ref_repeats))
    flops = max(flops_seen)
    roofline_tps = flops / (10.0 * args.d_in * d_sae)
    seen = ", ".join(f"{f / 1e9:.0f}" for f in flops_seen)
    print(
        f"matmul: best {flops / 1e9:.1f} GFLOP/s (measurements: {seen}) -> dense roofline {roofline_tps:,.0f} tokens/s"
    )
    print(f"{'arch':<10} {'tokens/s':>12} {'ms/step':>9} {'median ms':>10} {'fraction':>9}")
    results = {}
    for arch, times in raw.items():
        best, med = min(times), statistics.median(times)
        tps = args.batch / best
        frac = tps / roofline_tps
        results[arch] = {
            "tokens_per_s": tps,
            "ms_per_step": 1e3 * best,
            "ms_per_step_median": 1e3 * med,
            "roofline_fraction": frac,
        }
        print(f"{arch:<10} {tps:>12,.0f} {1e3 * best:>9.1f} {1e3 * med:>10.1f} {frac:>9.1%}")
    if args.json:
        payload = {
            "config": vars(args),
            "malloc_tuned": tuned,
            "matmul_gflops": flops / 1e9,
            "matmul_gflops_measurements": [f / 1e9 for f in flops_seen],
            "roofline_tokens_per_s": roofline_tps,
        }
        with open(args.json, "w") as f:
            json.dump({**payload, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
