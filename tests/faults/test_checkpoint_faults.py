"""Damaged checkpoints: named, never resumed from; the resume falls back to the newest intact one and
ends bit-identical to an uninterrupted run. A resume that changes training settings is refused or recorded."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae_pipeline import layout
from sae_pipeline.errors import UserError
from sae_pipeline.integrity.checkpoint import STATE_SEAL
from sae_pipeline.integrity.tree import verify_tree
from sae_pipeline.train import StopRequested, run
from sae_pipeline.training import checkpoint
from tests.faults import harness
from tests.faults.tally import record
from tests.helpers import assert_same, cfg_for, make_store, weights

STEPS = ("step-000000016", "step-000000032")  # train=tiny checkpoints every 16 steps, keeps 2


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("store") / "s", n_contexts=64, d_in=16, tag_rows=False)


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    run(cfg_for(store, run_dir))
    return weights(run_dir)


@pytest.fixture(scope="module")
def stopped(store, tmp_path_factory) -> Path:
    """A run stopped after step 41: checkpoints at steps 16 and 32."""
    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    with pytest.raises(StopRequested):
        run(cfg_for(store, run_dir, "train.advanced.stop_after_steps=41"))
    assert [p.name for p in checkpoint.list_checkpoints(run_dir)] == list(STEPS)
    return run_dir


def _copy(stopped: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(stopped, tmp / "run"))


def _damage(path: Path, how: str, seed: int) -> None:
    rng = random.Random(seed)
    if how == "truncate":
        harness.truncate(path, rng)
    elif path.suffix == ".json":  # one non-whitespace byte (a whitespace flip may leave the same JSON)
        text = path.read_bytes()
        at = rng.choice([i for i, c in enumerate(text) if not chr(c).isspace()])
        path.write_bytes(text[:at] + bytes([text[at] ^ 0x55]) + text[at + 1 :])
    else:  # the case: eight bytes, in the tensor data
        header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
        harness.flip_bytes(path, rng, lo=header)


CASES = [
    (f, h) for f in (layout.SAE_WEIGHTS, layout.TRAIN_STATE, layout.TRAIN_META) for h in ("flip", "truncate")
]


@pytest.mark.parametrize(("name", "how"), CASES)
def test_damaged_latest_checkpoint_is_named_and_skipped(
    store, reference, stopped, tmp_path, capfd, name, how
):
    run_dir = _copy(stopped, tmp_path)
    latest = run_dir / layout.CHECKPOINTS / STEPS[1]
    _damage(latest / name, how, seed=len(name) + len(how))
    record("damage_trials")
    _, problems = verify_tree(run_dir)
    assert len(problems) == 1 and STEPS[1] in problems[0] and name in problems[0], problems
    run(cfg_for(store, run_dir, "train.resume=true"))
    err = capfd.readouterr().err
    assert f"{STEPS[1]} is damaged" in err and name in err and "newest intact checkpoint" in err, err
    record("damage_detected")
    assert (run_dir / layout.CHECKPOINTS / f"{STEPS[1]}.damaged").is_dir()
    assert_same(weights(run_dir), reference)  # resumed from step 16, never from the damaged step 32
    record("fallback_resumed_identical")


def test_every_checkpoint_damaged_is_refused(store, stopped, tmp_path):
    run_dir = _copy(stopped, tmp_path)
    for i, step in enumerate(STEPS):
        _damage(run_dir / layout.CHECKPOINTS / step / layout.TRAIN_STATE, "flip", seed=i)
    with pytest.raises(UserError, match="no intact checkpoint is left .*train.overwrite=true"):
        run(cfg_for(store, run_dir, "train.resume=true"))


def test_nan_after_resume_names_the_resume_point(store, stopped, tmp_path):
    """A resume point damaged where no checksum can tell (written before checksums existed)."""
    run_dir = _copy(stopped, tmp_path)
    latest = run_dir / layout.CHECKPOINTS / STEPS[1]
    state = json.loads((latest / layout.TRAIN_META).read_text())
    del state["sha256"], state[STATE_SEAL]
    (latest / layout.TRAIN_META).write_text(json.dumps(state))
    sae = load_file(str(latest / layout.SAE_WEIGHTS))
    sae["W_enc_DF"] = torch.full_like(sae["W_enc_DF"], 1e30)
    save_file(sae, str(latest / layout.SAE_WEIGHTS))
    with pytest.raises(UserError, match=f"step 33.*{STEPS[1]}.*resumed from it, so it may be damaged"):
        run(cfg_for(store, run_dir, "train.resume=true"))


def test_resume_that_changes_training_is_refused_or_recorded(store, stopped, tmp_path):
    run_dir = _copy(stopped, tmp_path)
    before = (run_dir / layout.CONFIG).read_text()
    with pytest.raises(UserError, match=r"train.lr 0.01 -> 0.001.*train.allow_changes=true"):
        run(cfg_for(store, run_dir, "train.resume=true", "train.lr=0.001"))
    assert (run_dir / layout.CONFIG).read_text() == before  # the record is kept
    with pytest.raises(StopRequested):  # logging, evaluation and checkpoint keys may change
        run(
            cfg_for(
                store, run_dir, "train.resume=true", "train.log_every=3", "train.advanced.stop_after_steps=35"
            )
        )
    run(cfg_for(store, run_dir, "train.resume=true", "train.lr=0.001", "train.allow_changes=true"))
    saved = json.loads((run_dir / layout.CONFIG).read_text())
    assert saved["changes"] == [{"step": 32, "train.lr": [0.01, 0.001]}]
    assert saved["config"]["train"]["lr"] == 0.001


def test_damaged_final_sae_is_named(store, tmp_path):
    run_dir = tmp_path / "run"
    run(cfg_for(store, run_dir, "train.total_tokens=640"))
    final = run_dir / layout.FINAL_SAE / layout.SAE_WEIGHTS
    _damage(final, "flip", seed=3)
    _, problems = verify_tree(run_dir)
    assert len(problems) == 1 and "is damaged" in problems[0] and str(final) in problems[0], problems
