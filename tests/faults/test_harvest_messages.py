"""Small failures a fault campaign found, each through the real command line (`harness.invoke`): an empty
text file is named (not blamed on data.eval_documents), a manifest that is not JSON is refused with what to
do, and a rerun that repairs a damaged shard says which shard it rewrites and that the later ones are kept."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from sae_pipeline import layout
from sae_pipeline.data import store as store_mod
from tests.faults import harness
from tests.helpers import save_tiny_model, tiny_overrides, write_corpus

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return save_tiny_model(root / "llama"), write_corpus(root / "corpus.jsonl")


def _store(root: Path) -> Path:
    return layout.store_dir(root / "runs" / "stores" / "tiny" / "corpus", HOOK)


def _error_line(err: str) -> str:
    lines = [ln for ln in err.split("\n") if ln.strip() and "\r" not in ln]  # no progress bars
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("content", ["", "\n  \n\n"], ids=["empty", "blank"])
def test_an_empty_text_file_is_named(assets, tmp_path, content):
    text = tmp_path / "notes.txt"
    text.write_text(content)
    code, err = harness.invoke("harvest", tiny_overrides(tmp_path, assets[0], text))
    line = _error_line(err)
    assert code == 2 and f"the data file {text} " in line and "holds no text" in line, line
    assert "eval_documents" not in line


def test_a_manifest_that_is_not_json_is_refused_with_advice(assets, tmp_path):
    args = tiny_overrides(tmp_path, assets[0], assets[1])
    assert harness.invoke("harvest", args)[0] == 0
    folder = _store(tmp_path)
    shards = sorted(p.read_bytes() for p in folder.glob("shard-*"))
    manifest = folder / layout.MANIFEST
    manifest.write_text(manifest.read_text()[:-40])  # cut short: no longer JSON
    for stage, stage_args in (("train", [f"store={folder}", "logger=none", f"paths.root={tmp_path}"]),
                              ("harvest", args)):  # fmt: skip
        code, err = harness.invoke(stage, stage_args)
        line = _error_line(err)
        assert code == 2 and f"the store manifest {manifest} is damaged: it is not valid JSON" in line, line
        assert "rerun the sae-harvest command that wrote the store with harvest.overwrite=true" in line, line
    assert sorted(p.read_bytes() for p in folder.glob("shard-*")) == shards  # nothing written is lost
    assert harness.invoke("harvest", [*args, "harvest.overwrite=true"])[0] == 0
    assert store_mod.read_manifest(folder)["complete"]


def test_repairing_a_damaged_shard_says_the_later_shards_are_kept(assets, tmp_path):
    args = tiny_overrides(tmp_path, assets[0], assets[1])
    assert harness.invoke("harvest", args)[0] == 0
    folder = _store(tmp_path)
    clean = [s["sha256"] for s in store_mod.read_manifest(folder)["shards"]]
    assert len(clean) == 4
    harness.flip_bytes(folder / layout.shard_name(1), random.Random(0), lo=200)
    code, err = harness.invoke("harvest", args)
    assert code == 0, err
    assert f"rewriting the damaged {layout.shard_name(1)}; the 3 intact shards are kept" in err, err
    assert "resuming after" not in err
    assert [s["sha256"] for s in store_mod.read_manifest(folder)["shards"]] == clean
