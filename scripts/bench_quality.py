"""Quality with the defaults: one pass of TopK 8x at k = 16, 32 and 64 on the embedded default, scored by
`sae-eval`'s code.

    .venv/bin/python scripts/bench_quality.py                      # the benchmark (make bench runs it)
    .venv/bin/python scripts/bench_quality.py --k 32               # one k only
    .venv/bin/python scripts/bench_quality.py --grid all --eval-tokens 8192   # the ablation grid
    .venv/bin/python scripts/bench_quality.py --grid lr_x2 b_dec_mean --eval-tokens 8192
    .venv/bin/python scripts/bench_quality.py --name mine --set train.lr=1e-3 sae.b_dec_init=mean

1. Harvest ~600k rows of SmolLM2-135M `blocks.9.hook_resid_post` on the embedded Shakespeare once, with
   `sae-harvest` under <root>/stores/ (a complete store is reused; a killed harvest resumes).
2. Train TopK at each --k (default 16, 32, 64), d_sae = 8 x 576, batch 4096, exactly one pass over the store (every row once, the
   remainder of the last batch dropped) with the defaults of `sae=topk` and the default `train` group, except
   what a benchmark must fix: no learning-rate warm-up, no validation rows, no loss recovered during
   training, logger off, one final checkpoint. `--set` adds overrides (the grid's points are named sets).
3. Score the final SAE with `sae-eval`'s own code (`evaluate.run`) on the store's held-out plays (never
   harvested): FVU, CE loss recovered, KL, L0, dead latents on >= 20k held-out tokens.

Prints one table line per run and writes everything to a JSON (default <root>/quality.json, or
<root>/quality-grid.json for --grid); a run is named <point>_k<k>. Target (issue 12): FVU <= 0.20 and loss
recovered >= 0.975; dead latents (silent on the held-out text) <= 1% at every k (issue 21).
Tokens/s is the whole training call (store open, init, every step, final save): compare it on one machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sae_pipeline import evaluate as sae_eval  # noqa: E402
from sae_pipeline import harvest, layout, train  # noqa: E402
from sae_pipeline.data.store import ActivationStore  # noqa: E402
from sae_pipeline.schema import compose  # noqa: E402

D_SAE = 8 * 576
N_TOKENS = 600_000
BATCH = 4096
TARGET_FVU, TARGET_LOSS_RECOVERED, TARGET_DEAD_PCT = 0.20, 0.975, 1.0
KS = (16, 32, 64)  # the sparsities the defaults must hold at

# The ablation grid: one override set per point, each a one-pass run on the same store (the defaults first).
# Learning rates are multiples of Gao et al.'s law 2e-4 / sqrt(d_sae / 2**14) (3.771e-4 at 4608 latents).
LR0 = 2e-4 / math.sqrt(D_SAE / 2**14)
GRID: dict[str, list[str]] = {
    "defaults": [],
    "lr_x0.5": [f"train.lr={LR0 * 0.5:.4g}"],
    "lr_x2": [f"train.lr={LR0 * 2:.4g}"],
    "lr_x4": [f"train.lr={LR0 * 4:.4g}"],
    "lr_x8": [f"train.lr={LR0 * 8:.4g}"],
    "lr_x16": [f"train.lr={LR0 * 16:.4g}"],
    "decay_0": ["train.lr_decay_fraction=0"],
    "decay_0.5": ["train.lr_decay_fraction=0.5"],
    "decay_1": ["train.lr_decay_fraction=1"],
    "aux_0": ["sae.aux_k_coefficient=0"],
    "dead_100k": ["train.dead_tokens=100000"],
    "b_dec_mean": ["sae.b_dec_init=mean"],
    "b_dec_zeros": ["sae.b_dec_init=zeros"],
    "no_input_norm": ["sae.normalize_input=false"],
    "beta2_0.99": ["train.advanced.adam_beta2=0.99"],
    "beta1_0.8": ["train.advanced.adam_beta1=0.8"],
}


def ensure_store(root: Path) -> Path:
    """The ~600k-row store under root (harvested by `sae-harvest` unless it is already complete)."""
    cfg = compose("harvest", [f"paths.root={root}", f"harvest.n_tokens={N_TOKENS}"])
    (folder,) = harvest.run(cfg)
    return Path(folder)


RECORD = (
    "bench_quality.json"  # what this script writes into each run folder (kept out of the package's layout)
)


def code_version() -> str | None:
    """The commit the code is at, or None when that does not say what runs (no git, or uncommitted changes)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain", "sae_pipeline"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return None if dirty else head.stdout.strip()


def train_one(store: Path, run_dir: Path, extra: list[str], reuse: bool) -> dict:
    """One pass of TopK 8x with the defaults (plus `extra`, which names sae.k); returns its settings and timing. With
    `reuse`, a finished run of the same overrides in run_dir is kept (a killed grid continues)."""
    record = run_dir / RECORD
    if reuse and record.exists() and (run_dir / layout.FINAL_SAE).is_dir():
        old = json.loads(record.read_text())
        # the same overrides at the same commit: the defaults are part of the code, so a change there reruns
        if (
            old.get("overrides") == extra
            and old.get("code") is not None
            and old.get("code") == code_version()
        ):
            print(f"kept the finished run {run_dir}", flush=True)
            return old
    rows = ActivationStore(store).manifest["n_tokens"]
    steps = rows // BATCH
    overrides = [
        f"store={store}", f"train.run_dir={run_dir}", "train.overwrite=true", "sae=topk",
        f"sae.d_sae={D_SAE}", f"train.batch_size={BATCH}", f"train.total_tokens={steps * BATCH}",
        "train.lr_warmup_steps=0", "train.val_tokens=0", "train.val_every=0", "train.eval_every=0",
        "train.checkpoint_every_tokens=0", "train.keep_checkpoints=1", "logger=none", *extra,
    ]  # fmt: skip
    start = time.perf_counter()
    train.run(compose("train", overrides))
    wall = time.perf_counter() - start
    log = [json.loads(ln) for ln in (run_dir / layout.TRAIN_LOG).read_text().splitlines()]
    loop = [r["tokens_per_s"] for r in log if "tokens_per_s" in r]
    out = {
        "overrides": extra, "code": code_version(), "steps": steps, "tokens": steps * BATCH, "train_wall_s": round(wall, 1),
        "train_tokens_per_s": round(steps * BATCH / wall), "loop_tokens_per_s_median": sorted(loop)[len(loop) // 2],
        "load_average": round(os.getloadavg()[0], 2),
    }  # fmt: skip
    record.write_text(json.dumps(out, indent=1))
    return out


def score(root: Path, folder: Path, n_tokens: int) -> dict[str, dict]:
    """`sae-eval` on every run at or below folder (one model load, shared clean/ablated baselines); a run
    whose metrics.json was made from the same weights and settings is kept, not scored again."""
    overrides = [f"paths.root={root}", f"sae_path={folder}", f"eval.n_tokens={n_tokens}", "logger=none"]
    cfg = compose("eval", [*overrides, "eval.skip_existing=true", "eval.sweep=false"])
    return sae_eval.run(cfg)["metrics"]


def line(name: str, r: dict) -> str:
    ok = (r["fvu"] <= TARGET_FVU and r["loss_recovered"] >= TARGET_LOSS_RECOVERED
          and r["dead_pct"] <= TARGET_DEAD_PCT)  # fmt: skip
    return (
        f"{name:<18} FVU {r['fvu']:.4f} | loss recovered {r['loss_recovered']:.4f} | KL {r['kl']:.4f} | "
        f"L0 {r['l0']:.1f} | dead {r['dead_pct']:.1f}% | {r['train_tokens_per_s']:,} tok/s "
        f"({r['steps']} steps) | {r['eval_tokens']} eval tokens | target {'met' if ok else 'missed'}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=ROOT / "runs" / "bench" / "quality")
    ap.add_argument("--eval-tokens", type=int, default=20_480)
    ap.add_argument(
        "--k", type=int, nargs="+", default=list(KS), help="TopK k of every run (default 16 32 64)"
    )
    ap.add_argument("--grid", nargs="+", default=None, help=f"points of the grid, or all: {', '.join(GRID)}")
    ap.add_argument("--name", default="defaults", help="run name without --grid")
    ap.add_argument("--set", nargs="*", default=[], help="extra overrides without --grid")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--reuse", action="store_true", help="keep a finished run of the same overrides (--grid does)"
    )
    args = ap.parse_args()
    root = args.root.resolve()
    if args.grid:
        names = list(GRID) if args.grid == ["all"] else args.grid
        unknown = [n for n in names if n not in GRID]
        if unknown:
            ap.error(f"unknown grid points {unknown}; choose from {', '.join(GRID)}")
        points, folder = {n: GRID[n] for n in names}, root / "grid"
    else:
        points, folder = {args.name: list(args.set)}, root / "runs"
    # every point at every k (the run's k first, so `--set sae.k=...` would still win)
    points = {f"{n}_k{k}": [f"sae.k={k}", *extra] for n, extra in points.items() for k in args.k}
    store = ensure_store(root)
    results: dict[str, dict] = {}
    for name, extra in points.items():
        print(f"--- {name}: {' '.join(extra) or '(defaults)'}", flush=True)
        results[name] = train_one(store, folder / name, extra, reuse=bool(args.grid) or args.reuse)
    metrics = score(root, folder if len(points) > 1 else folder / next(iter(points)), args.eval_tokens)
    print(f"\nquality {time.strftime('%Y-%m-%d')}: TopK k={'/'.join(map(str, args.k))} d_sae={D_SAE}, batch {BATCH}, one pass, "
          f"threads {os.environ.get('OMP_NUM_THREADS', 'all')}, load {os.getloadavg()[0]:.2f}")  # fmt: skip
    for name, r in results.items():
        m = metrics.get(name) or next(iter(metrics.values()))
        r.update(
            fvu=m["fvu"], loss_recovered=m["loss_recovered"], kl=m["kl"], l0=m["l0"],
            dead_pct=100 * m["latents"]["dead_frac"], eval_tokens=m["n_tokens"],
        )  # fmt: skip
        print(line(name, r), flush=True)
    out = args.json or root / ("quality-grid.json" if args.grid else "quality.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(out.read_text())["runs"] if out.exists() else {}  # grid points run earlier stay
    record = {"date": time.strftime("%Y-%m-%d"), "store": str(store), "d_sae": D_SAE, "batch": BATCH}
    out.write_text(json.dumps({**record, "runs": {**old, **results}}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
