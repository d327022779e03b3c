"""Feature absorption of Matryoshka vs plain BatchTopK at the same k, over several seeds (CPU, ~10 s a seed).

    .venv/bin/python scripts/bench_absorption.py                 # seeds 0-5, 500 steps
    .venv/bin/python scripts/bench_absorption.py --seeds 0 1 --steps 1000 --json absorption.json

Data and metric are those of tests/unit/sae/test_matryoshka.py: 2 frequent parents (p=0.4) with 4 children each
(one child fires with its parent 80% of the time, never without it) plus 6 background features, orthonormal
in 16 dims; both SAEs have 16 latents and k=2 (the true mean L0 is ~2.04); Matryoshka's groups are [4, 12].
absorption = how often a parent's latent (decoder closest to the parent's direction) is silent while the
parent fires with one of its children, averaged over parents; misses_alone = the same when it fires alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sae_pipeline.sae import BatchTopKConfig, MatryoshkaConfig  # noqa: E402
from tests.support.synthetic import HierarchicalFeatures  # noqa: E402
from tests.unit.sae.test_matryoshka import absorption, train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(6)))
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    configs = {
        "batchtopk": BatchTopKConfig(d_sae=16, k=2),
        "matryoshka": MatryoshkaConfig(d_sae=16, k=2, group_sizes=[4, 12]),
    }
    rows = []
    for seed in args.seeds:
        start = time.perf_counter()
        row = {"seed": seed}
        for name, cfg in configs.items():
            gen = HierarchicalFeatures(n_parents=2, children_per_parent=4, n_background=6, d=16, seed=seed)
            sae, scale = train(cfg, gen, steps=args.steps, seed=seed)
            row[name] = {k: round(v, 3) for k, v in absorption(sae, scale, gen).items()}
        rows.append(row)
        print(
            f"seed {seed}: "
            + "  ".join(f"{n} absorption {row[n]['absorption']:.3f} L0 {row[n]['l0']:.2f}" for n in configs)
            + f"  ({time.perf_counter() - start:.1f} s)",
            flush=True,
        )
    means = {n: statistics.mean(r[n]["absorption"] for r in rows) for n in configs}
    print("mean absorption: " + "  ".join(f"{n} {v:.3f}" for n, v in means.items()))
    if args.json:
        args.json.write_text(json.dumps({"steps": args.steps, "rows": rows, "mean": means}, indent=1))


if __name__ == "__main__":
    main()
