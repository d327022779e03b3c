"""Training-step throughput of every SAE architecture vs the dense matmul roofline (CPU float32 by default).

    .venv/bin/python scripts/bench_sae.py                  # d_in 576, 8x, batch 4096, all archs
    .venv/bin/python scripts/bench_sae.py --steps 5 --json bench.json --archs relu topk
    .venv/bin/python scripts/bench_sae.py --device cuda --dtype bf16   # GPU, bf16 autocast as sae-train runs it

--dtype bf16 runs the training forward under torch.autocast(bfloat16) with float32 weights and Adam state,
as `sae-train` does on CUDA; fp32 on CUDA allows TF32 matmuls, as sae-train does. The roofline reference
multiplies matrices of --ref-dtype (default: bf16 on CUDA, float32 on the CPU, where bf16 is ~100x slower),
so on a GPU both dtypes report their fraction of the same bf16 roofline. Peak memory is CUDA's
max_memory_allocated per architecture (not measured on the CPU).

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

CPU = torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_times(fn, repeats: int, device: torch.device = CPU) -> list[float]:
    fn()  # warm-up
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def best_time(fn, repeats: int, device: torch.device = CPU) -> float:
    return min(step_times(fn, repeats, device))


def matmul_flops(batch: int, d_in: int, d_sae: int, repeats: int, device=CPU, dtype=torch.float32) -> float:
    """FLOP/s of the three dense products of an SAE step (x@W_enc, a@W_dec, x^T@g), best of repeats."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    x_BD, a_BF = rand(batch, d_in), rand(batch, d_sae)
    W_DF, W_FD = rand(d_in, d_sae), rand(d_sae, d_in)
    total = 0.0
    for fn in (lambda: x_BD @ W_DF, lambda: a_BF @ W_FD, lambda: x_BD.t() @ a_BF):
        total += best_time(fn, repeats, device)
    return 3 * 2.0 * batch * d_in * d_sae / total


def make_optimizer(params):
    try:
        return torch.optim.Adam(params, lr=1e-4, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=1e-4, foreach=True)


def bench_arch(
    arch: str,
    d_in: int,
    d_sae: int,
    batch: int,
    k: int,
    steps: int,
    dead_frac: float,
    device=CPU,
    bf16: bool = False,
) -> list[float]:
    overrides = {"k": k} if arch in ("topk", "batchtopk") else {}
    sae = build_sae(CONFIG_CLASSES[arch](d_sae=d_sae, **overrides), d_in, seed=0).to(device)
    g = torch.Generator().manual_seed(1)
    x_BD = torch.randn(batch, d_in, generator=g).to(device)  # mean norm ~ sqrt(d_in), like normalised inputs
    sae.init_from_data(x_BD[:1024])
    opt = make_optimizer(sae.parameters())
    dead_mask_F = (torch.rand(d_sae, generator=g) < dead_frac).to(device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = sae.training_forward(x_BD, dead_mask_F=dead_mask_F)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step()

    return step_times(step, steps, device)


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
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast forward")
    parser.add_argument("--ref-dtype", default=None, choices=["fp32", "bf16"], help="roofline matmul dtype")
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
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:  # as sae-train: TF32 for float32 matmuls
        torch.backends.cuda.matmul.allow_tf32 = True
    ref_dtype = args.ref_dtype or ("bf16" if cuda else "fp32")
    ref_torch = torch.bfloat16 if ref_dtype == "bf16" else torch.float32
    tuned = keep_freed_memory() if args.malloc_tune and not cuda else False
    d_sae = round(args.expansion * args.d_in)

    def ref() -> float:
        return matmul_flops(args.batch, args.d_in, d_sae, args.ref_repeats, device, ref_torch)

    flops_seen = [ref()]
    where = torch.cuda.get_device_name(device) if cuda else f"CPU, threads={torch.get_num_threads()}"
    print(
        f"{args.dtype} on {where}, roofline {ref_dtype} matmul, d_in={args.d_in}, d_sae={d_sae}, "
        f"batch={args.batch}, malloc_tune={tuned}"
    )
    raw, peak = {}, {}
    for arch in args.archs:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        raw[arch] = bench_arch(
            arch,
            args.d_in,
            d_sae,
            args.batch,
            args.k,
            args.steps,
            args.dead_frac,
            device,
            args.dtype == "bf16",
        )
        peak[arch] = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
        flops_seen.append(ref())
    flops = max(flops_seen)
    roofline_tps = flops / (10.0 * args.d_in * d_sae)
    seen = ", ".join(f"{f / 1e9:.0f}" for f in flops_seen)
    print(
        f"matmul: best {flops / 1e9:.1f} GFLOP/s (measurements: {seen}) -> dense roofline {roofline_tps:,.0f} tokens/s"
    )
    print(f"{'arch':<10} {'tokens/s':>12} {'ms/step':>9} {'median ms':>10} {'fraction':>9} {'peak MiB':>9}")
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
            "peak_mib": peak[arch],
        }
        mem = "-" if peak[arch] is None else f"{peak[arch]:.0f}"
        print(f"{arch:<10} {tps:>12,.0f} {1e3 * best:>9.1f} {1e3 * med:>10.1f} {frac:>9.1%} {mem:>9}")
    if args.json:
        payload = {
            "config": vars(args),
            "malloc_tuned": tuned,
            "matmul_gflops": flops / 1e9,
            "matmul_gflops_measurements": [f / 1e9 for f in flops_seen],
            "roofline_tokens_per_s": roofline_tps,
            "roofline_dtype": ref_dtype,
            "device": where,
        }
        with open(args.json, "w") as f:
            json.dump({**payload, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
