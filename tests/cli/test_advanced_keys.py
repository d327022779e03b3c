"""Keys under a group's `advanced` node (sae_pipeline/schema/advanced.py).

The old spelling (`train.stop_after_steps=20`, or `buffer_rows:` in a preset file) is refused by the real
command in one line naming the new key, and writes nothing. A run folder whose config.json was written
before the move (the moved keys directly under `train`) resumes to the SAE an uninterrupted run trains,
and a moved key it recorded with another value is refused under its new name.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sae_pipeline import layout
from sae_pipeline.errors import UserError
from sae_pipeline.schema.advanced import advanced_keys
from sae_pipeline.train import StopRequested, run
from tests.helpers import assert_same, cfg_for, make_store, run_cli, weights


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("store") / "s", n_contexts=64, d_in=16, tag_rows=False)


def _one_error_line(res) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


def test_old_spelling_is_refused_by_the_real_command_naming_the_new_key(store, tmp_path):
    run_dir = tmp_path / "r"
    common = [
        f"store={store}",
        "train=tiny",
        "logger=none",
        f"paths.root={tmp_path}/runs",
        f"train.run_dir={run_dir}",
    ]
    for old in ("train.stop_after_steps=20", "+train.stop_after_steps=20"):
        line = _one_error_line(run_cli("train", [*common, old], tmp_path))
        assert "train.stop_after_steps moved to train.advanced.stop_after_steps" in line
        assert line.endswith("pass train.advanced.stop_after_steps=20"), line
    assert not run_dir.exists() and not (tmp_path / "runs").exists()


def test_old_spelling_in_a_preset_file_names_the_file(store, tmp_path):
    (tmp_path / "conf" / "train").mkdir(parents=True)
    (tmp_path / "conf" / "train" / "mine.yaml").write_text(
        "defaults:\n  - tiny\n  - _self_\n\nchunk_rows: 32\n"
    )
    args = [f"store={store}", f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "train=mine", "logger=none"]
    line = _one_error_line(run_cli("train", [*args, f"train.run_dir={tmp_path / 'r'}"], tmp_path))
    assert "train.chunk_rows moved to train.advanced.chunk_rows" in line
    assert "train/mine.yaml as `advanced: {chunk_rows: ...}`" in line, line
    assert not (tmp_path / "r").exists()


def _as_written_before_the_move(run_dir: Path) -> dict:
    """Rewrite the run's config.json the way the code before the move wrote it: no `advanced` node, its
    keys directly under `train`. Returns the moved keys' recorded values."""
    path = run_dir / layout.CONFIG
    record = json.loads(path.read_text())
    train = record["config"]["train"]
    moved = train.pop("advanced")
    assert sorted(moved) == sorted(advanced_keys("train"))
    train.update(moved)
    path.write_text(json.dumps(record, indent=1))
    return moved


def test_a_run_folder_recorded_before_the_move_resumes_to_the_uninterrupted_sae(store, tmp_path):
    run(cfg_for(store, tmp_path / "whole"))
    with pytest.raises(StopRequested):
        run(cfg_for(store, tmp_path / "old", "train.advanced.stop_after_steps=20"))
    assert _as_written_before_the_move(tmp_path / "old")["stop_after_steps"] == 20
    run(cfg_for(store, tmp_path / "old", "train.resume=true"))
    assert_same(weights(tmp_path / "whole"), weights(tmp_path / "old"))
    record = json.loads((tmp_path / "old" / layout.CONFIG).read_text())
    assert not record.get("changes")  # nothing that shapes the SAE was read as changed


def test_a_moved_key_recorded_with_another_value_is_refused_by_its_new_name(store, tmp_path):
    """tiny.yaml reads 64 rows per chunk; the run was started with 32 and recorded as before the move."""
    run_dir = tmp_path / "r"
    with pytest.raises(StopRequested):
        run(cfg_for(store, run_dir, "train.advanced.stop_after_steps=20", "train.advanced.chunk_rows=32"))
    _as_written_before_the_move(run_dir)
    with pytest.raises(UserError, match=r"\(train\.advanced\.chunk_rows 32 -> 64\);") as err:
        run(cfg_for(store, run_dir, "train.resume=true"))
    assert "train.chunk_rows" not in str(err.value)
    run(
        cfg_for(store, run_dir, "train.resume=true", "train.advanced.chunk_rows=32")
    )  # the same values resume
    assert (run_dir / layout.FINAL_SAE).is_dir()
