"""W&B as its users expect, read back from the offline run's record log (tests/support/wandb_records.py):
the training run's config and name, loss recovered during training, the SAE artifact, and sae-eval's
results in the same run (or a linked eval run when training did not log to W&B)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sae_pipeline import layout
from tests.helpers import compose_config, run_cli, save_tiny_model, tiny_overrides, write_corpus
from tests.support.wandb_records import summary


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, Path]:
    from sae_pipeline import harvest

    tmp = tmp_path_factory.mktemp("wb")
    model_dir = save_tiny_model(tmp / "model")
    corpus = write_corpus(tmp / "corpus.jsonl", n_docs=8, words_per_doc=200)
    (folder,) = harvest.run(compose_config("harvest", tiny_overrides(tmp, model_dir, corpus)))
    return tmp, folder


def wandb_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("wandb/offline-run-*/run-*.wandb"))


def train(tmp: Path, store: Path, run_dir: Path, *extra: str):
    res = run_cli(
        "train",
        [f"store={store}", "train=tiny", "sae=topk", "sae.k=4", "train.lr=0.005", "train.eval_every=32",
         "train.eval_tokens=64", "train.val_tokens=16", f"train.run_dir={run_dir}", f"paths.root={tmp / 'runs'}", *extra],
        tmp, env={"WANDB_DATA_DIR": str(tmp / "wandb-data"), "WANDB_CACHE_DIR": str(tmp / "wandb-cache")},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def evaluate(tmp: Path, run_dir: Path, *extra: str):
    res = run_cli(
        "eval", [f"sae_path={run_dir}", "eval.n_tokens=64", f"paths.root={tmp / 'runs'}", *extra], tmp
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_training_run_config_name_loss_recovered_artifact_and_eval_in_the_same_run(store):
    tmp, folder = store
    run_dir = tmp / "run-wb"
    train(tmp, folder, run_dir)
    (trained,) = wandb_files(run_dir)
    s = summary(trained)
    record = json.loads((run_dir / layout.CONFIG).read_text())
    assert s["id"] == record["wandb_id"]
    # config names what was trained, at the top level
    assert s["config"]["hook"] == "blocks.1.hook_resid_post"
    assert s["config"]["model"]["id"] == "tiny" and s["config"]["arch"] == "topk"
    assert s["config"]["store"] == str(folder.resolve()) and s["config"]["d_in"] == 32
    # <arch>-<hook>-<key overrides>; the run folder and W&B plumbing are not "key overrides"
    assert s["name"].startswith("topk-blocks.1.hook_resid_post-")
    assert "sae.k=4" in s["name"] and "train.run_dir" not in s["name"] and "sae=topk" not in s["name"]
    # loss recovered during training: tiny's 4096 tokens / 64 = 64 steps, every 32 -> steps 32 and 64
    steps = [row["_step"] for row in s["history"] if "eval/loss_recovered" in row]
    assert steps == [32, 64]
    # the final SAE as an artifact whose files are the saved sae/ folder
    (art,) = s["artifacts"]
    assert art.type == "model" and art.name == f"sae-{record['wandb_id']}"
    assert {c.path for c in art.manifest.contents} == {p.name for p in (run_dir / layout.FINAL_SAE).iterdir()}

    res = evaluate(tmp, run_dir)
    assert "loss recovered" in res.stdout
    metrics = json.loads((run_dir / layout.EVAL / layout.METRICS).read_text())
    resumed = [f for f in wandb_files(run_dir) if f != trained]
    assert len(resumed) == 1 and not (run_dir / layout.EVAL / "wandb").exists()
    e = summary(resumed[0])
    assert e["id"] == record["wandb_id"] and e["name"] == s["name"]  # the same W&B run
    (row,) = [r for r in e["history"] if "eval/fvu" in r]
    assert row["_step"] == 65  # after the 64 training steps, so W&B keeps it
    assert row["eval/fvu"] == pytest.approx(metrics["fvu"]) and e["summary"]["eval/l0"] == pytest.approx(
        metrics["l0"]
    )


def test_no_artifact_when_asked_and_eval_linked_by_group_without_training_wandb(store):
    tmp, folder = store
    run_dir = tmp / "run-noart"
    train(tmp, folder, run_dir, "logger.log_artifact=false", "train.eval_every=0")
    (trained,) = wandb_files(run_dir)
    assert summary(trained)["artifacts"] == []

    plain = tmp / "run-plain"
    train(tmp, folder, plain, "logger=none", "train.eval_every=0")
    assert not wandb_files(plain)
    evaluate(tmp, plain, "logger=wandb")
    (linked,) = wandb_files(plain / layout.EVAL)
    e = summary(linked)
    assert e["group"] == plain.name and e["id"] != json.loads((plain / layout.CONFIG).read_text())["wandb_id"]
    assert any("eval/loss_recovered" in r for r in e["history"])


def test_demo_config_logs_loss_recovered_during_training():
    cfg = compose_config("train", ["store=x", "experiment=demo"])
    steps = cfg.train.total_tokens // cfg.train.batch_size
    assert 0 < cfg.train.eval_every < steps and cfg.logger.log_artifact
