"""Benchmark: a sweep group (one process, several SAEs per batch read) vs the same SAEs trained separately.

    .venv/bin/python scripts/bench_sweep_group.py [--members 4] [--tokens 65536] [--json out.json]

Both sides run `sae_pipeline.train.run` in this process on the same synthetic store (d_in 576, 8x ReLU,
batch 4096, no W&B, no evaluation), so the ratio measures what grouping saves: reading, shuffling and
converting each batch once instead of once per SAE, plus per-run set-up. Separate runs launched as
processes would also pay interpreter and import start-up each (several seconds here), which this
benchmark leaves out, so the real-world speed-up is larger.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sae_pipeline import train  # noqa: E402
from sae_pipeline.schema import compose  # noqa: E402
from scripts.bench_train import make_store  # noqa: E402


def _run(root: Path, store: Path, name: str, tokens: int, extra: list[str]) -> float:
    overrides = [
        f"paths.root={root}",
        f"store={store}",
        "sae=relu",
        "logger=none",
        f"train.run_dir={root / name}",
        f"train.total_tokens={tokens}",
        "train.val_every=0",
        "train.eval_every=0",
        "train.log_every=1000",
        "train.checkpoint_every_tokens=0",
        "train.device=cpu",
        *extra,
    ]
    start = time.perf_counter()
    train.run(compose("train", overrides))
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=65_536)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    coefficients = [round(1.0 * 2**i, 3) for i in range(args.members)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = make_store(root / "store", n_shards=2, shard_rows=40_960, d_in=576)
        separate = sum(
            _run(root, store, f"separate-{c}", args.tokens, [f"sae.l1_coefficient={c}"]) for c in coefficients
        )
        group_spec = "[" + ",".join(f"{{l1_coefficient:{c}}}" for c in coefficients) + "]"
        grouped = _run(root, store, "group", args.tokens, [f"train.group={group_spec}"])
    result = {
        "members": args.members,
        "tokens_per_member": args.tokens,
        "separate_s": round(separate, 2),
        "group_s": round(grouped, 2),
        "speedup": round(separate / grouped, 3),
    }
    print(
        f"{args.members} ReLU SAEs x {args.tokens} tokens: separate {separate:.1f}s, "
        f"group {grouped:.1f}s, speed-up {result['speedup']:.2f}x"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
