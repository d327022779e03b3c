"""A whole sweep through the real CLIs on a tiny model: Hydra multirun and a sweep group, then sae-eval's
table and Pareto plots over both."""

from __future__ import annotations

import csv

import matplotlib.image

from sae_pipeline import layout
from tests.helpers import run_cli, save_tiny_model, tiny_overrides, write_corpus

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# the tiny harvest's last shard holds one context (31 rows): validation cannot take more
TRAIN = ["sae=relu", "train=tiny", "logger=none", "train.total_tokens=2048", "train.val_tokens=31"]


def test_multirun_and_sweep_group_then_pareto(tmp_path):
    model, corpus = save_tiny_model(tmp_path / "model"), write_corpus(tmp_path / "corpus.jsonl")
    root = tmp_path / "runs"
    harvest = run_cli("harvest", tiny_overrides(tmp_path, model, corpus), cwd=tmp_path)
    assert harvest.returncode == 0, harvest.stderr[-2000:]
    store = root / "stores" / "tiny" / "corpus" / "blocks.1.hook_resid_post"

    sweep = root / "sweeps" / "l1"
    multi = run_cli(
        "train",
        [
            "-m",
            f"paths.root={root}",
            f"store={store}",
            *TRAIN,
            "sae.l1_coefficient=0.3,3",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    assert multi.returncode == 0, multi.stderr[-2000:]
    group_run = sweep / "group"
    group = run_cli(
        "train",
        [f"paths.root={root}", f"store={store}", *TRAIN, f"train.run_dir={group_run}",
         "train.group=[{l1_coefficient:1},{l1_coefficient:10}]"],
        cwd=tmp_path,
    )  # fmt: skip
    assert group.returncode == 0, group.stderr[-2000:]

    evaluated = run_cli("eval", [f"paths.root={root}", f"sae_path={sweep}", "eval.n_tokens=200", "logger=none"],
                        cwd=tmp_path)  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    with open(sweep / layout.SWEEP_TABLE_CSV) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4  # two multirun jobs + two group members
    assert {r["sparsity_key"] for r in rows} == {"l1_coefficient"}
    assert sorted(float(r["sparsity_value"]) for r in rows) == [0.3, 1.0, 3.0, 10.0]
    for name in (layout.PARETO_LOSS_PLOT, layout.PARETO_FVU_PLOT):
        png = sweep / name
        assert png.read_bytes()[:8] == PNG_SIGNATURE
        assert matplotlib.image.imread(png).ndim == 3
    assert (sweep / layout.SWEEP_TABLE_MD).read_text().count("\n") >= 5
