"""Benchmark: harvesting the embedded default at layer 9 with early exit vs a full forward.

    .venv/bin/python scripts/bench_harvest.py [--batches 4] [--batch-size 32] [--json out.json]

Reports tokens/s of (a) capture with early exit, (b) a full forward (all 30 layers + LM head) of the
same batches, their ratio (target >= 2.5x), and (c) the real `sae-harvest` run's fraction of wall time
spent inside the model's forward (target >= 90%: the background writer keeps the disk off the path).
Ratios are what to compare; absolute numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from sae_pipeline import harvest
from sae_pipeline.data import store, text
from sae_pipeline.model import activations, hook_points
from sae_pipeline.model.loading import load_model
from sae_pipeline.schema import compose


def _time(fn, batches) -> float:
    fn(batches[0][:2])  # warm-up
    start = time.perf_counter()
    for ids in batches:
        fn(ids)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--layer", type=int, default=9)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    model, tokenizer = load_model({"name": "embedded:smollm2"}, "cpu")
    data_cfg = {"name": "embedded:shakespeare", "text_column": "text", "eval_documents": 3}
    n = args.batches * args.batch_size
    ids, _ = text.contexts_for_data(
        data_cfg, tokenizer, "train", args.context, True, n * (args.context - 1), 0
    )
    batches = list(ids.split(args.batch_size))
    hp = hook_points.resolve_hook(model, hook_points.hook_name("resid_post", args.layer))
    tokens = ids.numel()

    early_s = _time(lambda b: activations.capture(model, b, None, [hp], early_exit=True), batches)
    with torch.inference_mode():
        full_s = _time(lambda b: model(b), batches)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose(
            "harvest",
            [
                f"paths.root={tmp}",
                f"hook.layer={args.layer}",
                f"harvest.batch_size={args.batch_size}",
                f"harvest.context_size={args.context}",
                f"harvest.n_tokens={tokens - n}",
                f"harvest.shard_size={(tokens - n) // 2}",
            ],
        )
        (folder,) = harvest.run(cfg)
        throughput = store.read_manifest(folder)["throughput"]

    result = {
        "tokens": tokens,
        "early_exit_tokens_per_s": round(tokens / early_s, 1),
        "full_forward_tokens_per_s": round(tokens / full_s, 1),
        "early_exit_speedup": round(full_s / early_s, 2),
        "harvest_tokens_per_s": throughput["tokens_per_s"],
        "harvest_forward_fraction": throughput["forward_fraction"],
        "threads": torch.get_num_threads(),
    }
    print(
        f"layer {args.layer}, {tokens} tokens in batches of {args.batch_size}x{args.context}, "
        f"{result['threads']} threads"
    )
    print(f"  early exit capture : {result['early_exit_tokens_per_s']:>9.1f} tok/s")
    print(f"  full forward       : {result['full_forward_tokens_per_s']:>9.1f} tok/s")
    print(f"  speed-up           : {result['early_exit_speedup']:>9.2f}x   (target >= 2.5x)")
    print(
        f"  sae-harvest        : {result['harvest_tokens_per_s']:>9.1f} tok/s, "
        f"{100 * result['harvest_forward_fraction']:.1f}% of wall time in the forward (target >= 90%)"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
