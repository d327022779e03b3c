"""Training speed side by side with EleutherAI's sparsify: same rows, same process, same hour (issue 21).

sparsify is never a dependency of the project; it lives in a venv of its own beside `.venv`
(`.venv-sparsify/` is git-ignored). Install it in this order, so that pip never replaces the CPU torch:

    python3 -m venv .venv-sparsify
    .venv-sparsify/bin/pip install torch==2.13.0          # first: the CPU wheel
    .venv-sparsify/bin/pip install eai-sparsify==1.3.3     # keeps torch 2.13.0 (`--dry-run` shows pip's plan)
    .venv-sparsify/bin/pip install --no-deps -e .          # the project, without its own dependency list
    .venv-sparsify/bin/pip install hydra-core==1.3.8 "omegaconf>=2.3,<2.4"   # what `sae-train` needs beyond those

Run (d_in 576, 8x, k 32, batch 4096, 1 thread, float32 by default):

    PYTHONPATH=$PWD .venv-sparsify/bin/python scripts/compare_sparsify.py              # the demo store if present
    PYTHONPATH=$PWD .venv-sparsify/bin/python scripts/compare_sparsify.py --synthetic --repeats 5
    PYTHONPATH=$PWD .venv-sparsify/bin/python scripts/compare_sparsify.py --store PATH --json out.json

Each round times, one after the other, on the same store (the given one, or a synthetic Gaussian store that
bench_loop.py writes when --synthetic is given or the store is missing):

(a) sparsify: its SparseCoder (SaeConfig expansion_factor 8, k 32) and optimizer as its `Trainer.__init__`
    builds them (TrainConfig's default, signum: ScheduleFreeWrapper(SignSGD) at 5e-3 / sqrt(F / 2**14); or
    --sparsify-optimizer adam), and per batch the body of `Trainer.fit` with the model's forward replaced by
    the stored rows: the hook's work (b_dec set to the batch mean on step 0, decoder rows renormalised,
    total variance, forward with fvu loss, AuxK when --sparsify-auxk > 0, fired latents, the logged fvu read
    back to the host, backward), then `remove_gradient_parallel_to_decoder_directions`, optimizer and
    scheduler steps, dead-latent counters. Its rows are the store's first ones, read into memory and shuffled
    beforehand (sparsify gets them from its DataLoader; it reads no store): this favours sparsify, whose
    timed side has no reader.
(b) the project: the real `sae-train` loop on the same store, read by its own shuffling reader (bench_loop.py's
    `loop_rate`: `train.run` with logger=none, validation off, one final checkpoint, lr 1e-4, the project's
    other TopK defaults, AuxK included).
(c) the encoder's bare GEMM at the shape, x[B, D] @ W[D, F] (bench_sae.py's `best_time`), as tokens/s.

(a) and (b) are the same statistic: the best log window (`--log-every` steps) after the first of each run,
as bench_loop.py reports the loop; each is then the median over the rounds, and so is (c). The ratio is
project / sparsify. Print the load average with the numbers: on a shared machine compare ratios from one run.

--fvu-steps N (default 0: off) then checks that speed is not bought with quality: each side trains N steps of
one pass at its own defaults (the project: `sae-train` with its default lr, holding out --fvu-rows validation
rows at the end of the store; sparsify: the store's first N batches, shuffled), and both are scored on those
held-out rows with sparsify's FVU, sum((x - x_hat)^2) / sum((x - mean(x))^2).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_loop import loop_rate, make_store  # noqa: E402
from bench_sae import best_time  # noqa: E402
from safetensors import safe_open  # noqa: E402

from sae_pipeline.data.store import ActivationStore  # noqa: E402
from sae_pipeline.runtime import keep_freed_memory  # noqa: E402

DEMO_STORE = Path("/work/main/runs/stores/smollm2-135m/shakespeare/blocks.9.hook_resid_post")


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def read_rows(store: Path, n: int, skip: int = 0) -> torch.Tensor:
    """Rows skip .. skip+n of the store, in store order, as float32."""
    out, seen = [], 0
    for shard in ActivationStore(store).shards:
        lo, hi = max(skip - seen, 0), min(skip + n - seen, shard.n_rows)
        if hi > lo:
            with safe_open(str(shard.path), framework="pt") as f:
                out.append(f.get_slice("activations")[lo:hi].float())
        seen += shard.n_rows
        if seen >= skip + n:
            break
    rows = torch.cat(out)
    if len(rows) < n:
        raise SystemExit(f"the store {store} has {seen} rows; this comparison needs {skip + n}")
    return rows


class SparsifyLoop:
    """sparsify's `Trainer` (trainer.py of eai-sparsify 1.3.3) for one SAE, fed rows instead of a model."""

    def __init__(self, d_in: int, expansion: int, k: int, optimizer: str, auxk_alpha: float, n_batches: int):
        from sparsify import SaeConfig, SparseCoder
        from sparsify.config import TrainConfig
        from sparsify.sign_sgd import SignSGD

        self.cfg = cfg = TrainConfig(
            SaeConfig(expansion_factor=expansion, k=k), optimizer=optimizer, auxk_alpha=auxk_alpha, log_to_wandb=False
        )  # fmt: skip
        torch.manual_seed(cfg.init_seeds[0])
        self.sae = sae = SparseCoder(d_in, cfg.sae, "cpu", dtype=torch.float32)
        self.schedulers = []
        if optimizer == "signum":  # as Trainer.__init__
            from schedulefree import ScheduleFreeWrapper

            lr = cfg.lr or 5e-3 / (sae.num_latents / (2**14)) ** 0.5
            opt = ScheduleFreeWrapper(SignSGD([dict(params=sae.parameters(), lr=lr)]), momentum=0.95)
            opt.train()
        elif optimizer == "adam":  # bitsandbytes is not installed: Trainer falls back to torch's Adam
            from transformers import get_linear_schedule_with_warmup

            lr = cfg.lr or 2e-4 / (sae.num_latents / (2**14)) ** 0.5
            opt = torch.optim.Adam([dict(params=sae.parameters(), lr=lr)])
            self.schedulers = [get_linear_schedule_with_warmup(opt, cfg.lr_warmup_steps, n_batches)]
        else:
            raise SystemExit(f"--sparsify-optimizer {optimizer}: this script knows signum and adam")
        self.optimizers = [opt]
        self.num_tokens_since_fired = torch.zeros(sae.num_latents, dtype=torch.long)
        self.did_fire = torch.zeros(sae.num_latents, dtype=torch.bool)
        self.global_step = 0
        self.avg_fvu = 0.0

    def step(self, x_BD: torch.Tensor) -> None:
        cfg, sae = self.cfg, self.sae
        tokens_mask = torch.ones(len(x_BD), dtype=torch.bool)  # no exclude_tokens
        n_tokens = tokens_mask.sum().item()
        # the forward hook's work
        outputs = x_BD
        _ = outputs.detach().clone()  # all_outputs (used only by the ce/kl losses)
        outputs = outputs[tokens_mask]
        inputs = outputs
        if self.global_step == 0:
            sae.b_dec.data = outputs.mean(0).to(sae.dtype)
        sae.set_decoder_norm_to_unit_norm()
        dead_mask = self.num_tokens_since_fired > cfg.dead_feature_threshold if cfg.auxk_alpha > 0 else None
        total_variance = (outputs - outputs.mean(0)).pow(2).sum()
        out = sae(x=inputs, y=outputs, dead_mask=dead_mask, total_variance=total_variance)
        self.did_fire[out.latent_indices.flatten()] = True
        self.avg_fvu = float(out.fvu.detach())
        if cfg.auxk_alpha > 0:
            float(out.auxk_loss.detach())
        loss = out.fvu + cfg.auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
        loss.div(cfg.grad_acc_steps * cfg.micro_acc_steps).backward()
        # the training step after the forward
        sae.remove_gradient_parallel_to_decoder_directions()
        for opt in self.optimizers:
            opt.step()
            opt.zero_grad()
        for sched in self.schedulers:
            sched.step()
        with torch.no_grad():
            self.num_tokens_since_fired += n_tokens
            self.num_tokens_since_fired[self.did_fire] = 0
            self.did_fire.zero_()
        self.global_step += 1


def sparsify_rate(rows: torch.Tensor, args, n_steps: int) -> float:
    """Best tokens/s over sparsify's log windows of one run (the first window is warm-up), as loop_rate."""
    loop = SparsifyLoop(
        args.d_in, int(args.expansion), args.k, args.sparsify_optimizer, args.sparsify_auxk, n_steps
    )
    rates = []
    for w in range(n_steps // args.log_every):
        t0 = time.perf_counter()
        for s in range(w * args.log_every, (w + 1) * args.log_every):
            loop.step(rows[s * args.batch : (s + 1) * args.batch])
        rates.append(args.log_every * args.batch / (time.perf_counter() - t0))
    return max(rates[1:] or rates)


def gemm_rate(d_in: int, d_sae: int, batch: int) -> float:
    """Tokens/s of the encoder's dense product alone, x[B, D] @ W[D, F], best of 3."""
    g = torch.Generator().manual_seed(0)
    x_BD, W_DF = torch.randn(batch, d_in, generator=g), torch.randn(d_in, d_sae, generator=g)
    return batch / best_time(lambda: x_BD @ W_DF, 3)


def fvu(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> float:
    return float((x_BD - x_hat_BD).pow(2).sum() / (x_BD - x_BD.mean(0)).pow(2).sum())


def one_pass_fvu(store: Path, args, d_sae: int, tmp: Path) -> dict:
    """Held-out FVU of each side after --fvu-steps steps of one pass at its defaults (see the docstring)."""
    from sae_pipeline.data.reader import ShuffledReader
    from sae_pipeline.sae import load_sae_folder
    from sae_pipeline.schema import compose
    from sae_pipeline.train import run

    n_train = args.fvu_steps * args.batch
    run(compose("train", [
        f"store={store}", f"train.run_dir={tmp / 'fvu-run'}", "sae=topk", f"sae.d_sae={d_sae}", f"sae.k={args.k}",
        "logger=none", f"train.batch_size={args.batch}", f"train.total_tokens={n_train}", "train.val_every=0",
        f"train.val_tokens={args.fvu_rows}", "train.eval_every=0", "train.checkpoint_every_tokens=0", "train.device=cpu",
    ]))  # fmt: skip
    heldout = ShuffledReader(ActivationStore(store), args.batch, val_tokens=args.fvu_rows).validation_rows()
    shards = ActivationStore(
        store
    ).shards  # held-out contexts lie in the last shard: sparsify's rows stop before
    if n_train > sum(sh.n_rows for sh in shards[:-1]):
        raise SystemExit(
            f"--fvu-steps {args.fvu_steps}: the store's shards before its last hold too few rows"
        )
    rows = read_rows(store, n_train)
    rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))]
    loop = SparsifyLoop(
        args.d_in, args.expansion, args.k, args.sparsify_optimizer, args.sparsify_auxk, args.fvu_steps
    )
    for s in range(args.fvu_steps):
        loop.step(rows[s * args.batch : (s + 1) * args.batch])
    for opt in loop.optimizers:  # schedule-free: evaluate at the averaged weights, as its Trainer saves them
        getattr(opt, "eval", lambda: None)()
    with torch.no_grad():
        sp = fvu(heldout, loop.sae(heldout).sae_out)
        pr = fvu(heldout, load_sae_folder(tmp / "fvu-run" / "sae")(heldout))
    print(f"held-out FVU after {args.fvu_steps} steps ({n_train:,} rows) on {len(heldout):,} rows: "
          f"sparsify {sp:.3f}, project {pr:.3f}", flush=True)  # fmt: skip
    return {"steps": args.fvu_steps, "heldout_rows": len(heldout), "sparsify": sp, "project": pr}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--store", type=Path, default=DEMO_STORE, help="activation store (default: the demo store)"
    )
    ap.add_argument("--synthetic", action="store_true", help="Gaussian rows of --d-in in a temporary store")
    ap.add_argument("--d-in", type=int, default=576, help="only for --synthetic (a store has its own)")
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="rounds of (sparsify, project, GEMM); medians")
    ap.add_argument("--windows", type=int, default=3, help="timed log windows per run (the best is kept)")
    ap.add_argument("--log-every", type=int, default=2, help="steps per log window")
    ap.add_argument("--sparsify-optimizer", default="signum", help="signum (its default) | adam")
    ap.add_argument("--sparsify-auxk", type=float, default=0.0, help="sparsify's auxk_alpha (its default 0)")
    ap.add_argument("--fvu-steps", type=int, default=0, help="one-pass held-out FVU after N steps (0: off)")
    ap.add_argument("--fvu-rows", type=int, default=16_384, help="held-out rows for --fvu-steps")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as sae-train on the CPU; it holds for the whole process, so for sparsify too
    n_steps = args.log_every * (args.windows + 1)
    with tempfile.TemporaryDirectory() as tmp:
        store = args.store
        if args.synthetic or not (store / "manifest.json").exists():
            shard = 65_536  # make_store's shard size; --fvu-steps holds out rows of a last shard of their own
            rows_needed = -(-args.batch * (max(n_steps, args.fvu_steps) + 1) // shard) * shard
            store = make_store(Path(tmp) / "store", rows_needed + (shard if args.fvu_steps else 0), args.d_in)
        args.d_in = ActivationStore(store).d_in
        d_sae = args.expansion * args.d_in
        rows = read_rows(store, n_steps * args.batch)
        rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))]
        versions = {"eai-sparsify": version("eai-sparsify"), "torch": torch.__version__}
        print(
            f"store {store} ({'synthetic' if store != args.store else 'given'}), d_in={args.d_in}, d_sae={d_sae} "
            f"({args.expansion}x), k={args.k}, batch={args.batch}, {torch.get_num_threads()} thread(s), float32, "
            f"{', '.join(f'{k} {v}' for k, v in versions.items())}, sparsify optimizer {args.sparsify_optimizer}",
            flush=True,
        )
        print(f"load average before: {load_avg()}", flush=True)
        print(
            f"{'round':>5} {'sparsify tok/s':>15} {'project tok/s':>14} {'GEMM tok/s':>11} {'ratio':>6}  load"
        )
        per_round = []
        for r in range(args.repeats):  # interleaved, so that a burst of load from elsewhere hits all three
            sp = sparsify_rate(rows, args, n_steps)
            pr = loop_rate(
                store, Path(tmp) / f"run{r}", "topk", d_sae, args.batch, args.k, args.windows, args.log_every
            )
            gm = gemm_rate(args.d_in, d_sae, args.batch)
            per_round.append({"sparsify": sp, "project": pr, "gemm": gm, "load": os.getloadavg()})
            print(f"{r:>5} {sp:>15,.0f} {pr:>14,.0f} {gm:>11,.0f} {pr / sp:>6.2f}  {load_avg()}", flush=True)
        med = {key: statistics.median(x[key] for x in per_round) for key in ("sparsify", "project", "gemm")}
        ratio = med["project"] / med["sparsify"]
        gflops = med["gemm"] * 2 * args.d_in * d_sae / 1e9
        print(
            f"\nmedians over {args.repeats} rounds: sparsify {med['sparsify']:,.0f} tok/s, project (sae-train loop) "
            f"{med['project']:,.0f} tok/s, encoder GEMM {med['gemm']:,.0f} tok/s ({gflops:.0f} GFLOP/s)\n"
            f"project / sparsify = {ratio:.2f}x (median of per-round ratios "
            f"{statistics.median(x['project'] / x['sparsify'] for x in per_round):.2f}x); loop / GEMM: project "
            f"{med['project'] / med['gemm']:.0%}, sparsify {med['sparsify'] / med['gemm']:.0%}",
            flush=True,
        )
        results = {"config": {**vars(args), "store": str(store)}, "versions": versions, "rounds": per_round,
                   "median": med, "ratio": ratio, "load_average_before": per_round[0]["load"]}  # fmt: skip
        if args.fvu_steps:
            results["fvu"] = one_pass_fvu(store, args, d_sae, Path(tmp))
        print(f"load average after: {load_avg()}")
    results["load_average_after"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
