"""Damaged stores: every byte flip or truncation of a shard or manifest is detected and named (in
training, by sae-verify, by harvest's rerun), and a rerun of harvest rewrites only the damaged shard."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sae_pipeline import harvest, layout
from sae_pipeline.data import store as store_mod
from sae_pipeline.data.reader import ShuffledReader
from sae_pipeline.data.store import ActivationStore
from sae_pipeline.errors import UserError
from sae_pipeline.files import sha256_file
from sae_pipeline.integrity.tree import verify_tree
from tests.faults import harness
from tests.faults.tally import record
from tests.helpers import compose_config, make_store, save_tiny_model, tiny_overrides, write_corpus

N_SHARDS = 4


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    return make_store(
        tmp_path_factory.mktemp("store") / "s", n_contexts=64, d_in=16, contexts_per_shard=16, tag_rows=False
    )


def _copy(clean: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(clean, tmp / "s"))


def _read_everything(folder: Path) -> None:
    """What a training run reads: validation rows, then one whole pass (through the reader thread)."""
    with ShuffledReader(ActivationStore(folder), 64, val_tokens=64, buffer_rows=256, chunk_rows=64) as reader:
        reader.validation_rows()
        for _ in range(-(-reader.epoch_rows // 64)):
            reader.next_batch()


@pytest.mark.parametrize("seed", range(8))
def test_damaged_shard_is_named_by_training_and_verify(clean, tmp_path, seed):
    rng = random.Random(seed)
    folder = _copy(clean, tmp_path)
    shard = folder / layout.shard_name(rng.randrange(N_SHARDS))
    if seed % 4 == 3:
        harness.truncate(shard, rng)
    else:  # seed 0 and 4 flip inside the safetensors header, the others in the data
        header = 8 + int.from_bytes(shard.read_bytes()[:8], "little")
        lo, hi = (0, header) if seed % 4 == 0 else (header, None)
        harness.flip_bytes(shard, rng, lo=lo, hi=hi)
    record("damage_trials")
    with pytest.raises(UserError, match=shard.name) as caught:
        _read_everything(folder)
    _, problems = verify_tree(folder)
    assert len(problems) == 1 and shard.name in problems[0], problems
    assert "\n" not in str(caught.value)
    record("damage_detected")


def test_damaged_shard_stops_sae_train_with_what_to_do(clean, tmp_path):
    from sae_pipeline.train import run
    from tests.helpers import cfg_for

    folder = _copy(clean, tmp_path)
    shard = folder / layout.shard_name(1)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 8] = b"\x7f" * 8  # the case: eight bytes in the middle
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"shard-00001.* is damaged.*rerun the sae-harvest command"):
        run(cfg_for(folder, tmp_path / "run"))
    assert not (tmp_path / "run" / layout.FINAL_SAE).exists()


def _manifest(folder: Path) -> dict:
    return json.loads((folder / layout.MANIFEST).read_text())


def test_zeroed_shard_checksum_in_the_manifest_is_caught(clean, tmp_path):
    folder = _copy(clean, tmp_path)
    manifest = _manifest(folder)
    manifest["shards"][2]["sha256"] = "0" * 64
    (folder / layout.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="manifest.json is damaged"):  # the manifest's own seal
        ActivationStore(folder)
    del manifest["manifest_sha256"]  # a manifest without a seal: the shard's checksum is checked
    (folder / layout.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="shard-00002"):
        _read_everything(folder)


def test_manifest_without_shards_is_one_sentence(clean, tmp_path):
    folder = _copy(clean, tmp_path)
    manifest = _manifest(folder)
    del manifest["shards"], manifest["manifest_sha256"]
    (folder / layout.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="manifest.json has no 'shards' list"):
        ActivationStore(folder)


@pytest.mark.parametrize("seed", range(8))
def test_damaged_manifest_is_named(clean, tmp_path, seed):
    rng = random.Random(100 + seed)
    folder = _copy(clean, tmp_path)
    path = folder / layout.MANIFEST
    original = _manifest(folder)
    text = path.read_bytes()
    if seed % 4 == 3:
        harness.truncate(path, rng)
    else:  # one byte, never whitespace (a flip there may leave the same JSON)
        at = rng.choice([i for i, c in enumerate(text) if not chr(c).isspace()])
        path.write_bytes(text[:at] + bytes([text[at] ^ rng.randrange(1, 256)]) + text[at + 1 :])
    record("damage_trials")
    try:
        loaded = ActivationStore(folder).manifest
    except UserError as err:
        assert "manifest.json" in str(err)
        record("damage_detected")
    else:  # only a change that leaves the same JSON object may pass (e.g. 1e-05 -> 1E-05)
        assert loaded == original


# ---- harvest: the rerun finds the damage and rewrites only the damaged shard ---------------------
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return {"model": save_tiny_model(root / "llama"), "corpus": write_corpus(root / "corpus.jsonl")}


def harvest_cfg(tmp: Path, assets) -> OmegaConf:
    return compose_config("harvest", tiny_overrides(tmp, assets["model"], assets["corpus"]))


def test_harvest_rerun_rewrites_only_the_damaged_shard(tmp_path, assets, capsys):
    (folder,) = harvest.run(harvest_cfg(tmp_path, assets))
    before = store_mod.read_manifest(folder)
    assert len(before["shards"]) >= 3
    damaged = folder / before["shards"][1]["file"]
    harness.flip_bytes(damaged, random.Random(0))
    stamps = {s["file"]: (folder / s["file"]).stat().st_mtime_ns for s in before["shards"]}
    _, problems = verify_tree(folder)
    assert len(problems) == 1 and damaged.name in problems[0]
    capsys.readouterr()
    harvest.run(harvest_cfg(tmp_path, assets))
    err = capsys.readouterr().err
    assert f"{damaged.name} is damaged" in err and "nothing to do" not in err
    after = store_mod.read_manifest(folder)
    assert after["complete"] and [s["sha256"] for s in after["shards"]] == [
        s["sha256"] for s in before["shards"]
    ]
    assert sha256_file(damaged) == before["shards"][1]["sha256"]
    for s in before["shards"]:  # the other shards were not written again
        same = (folder / s["file"]).stat().st_mtime_ns == stamps[s["file"]]
        assert same == (s["file"] != damaged.name), s["file"]
    assert verify_tree(folder)[1] == []


def test_missing_shard_is_rewritten_too(tmp_path, assets):
    (folder,) = harvest.run(harvest_cfg(tmp_path, assets))
    before = store_mod.read_manifest(folder)
    last = folder / before["shards"][-1]["file"]
    last.unlink()
    (problem,) = verify_tree(folder)[1]
    assert f"{last.name} listed in the manifest is missing" in problem
    harvest.run(harvest_cfg(tmp_path, assets))
    assert sha256_file(last) == before["shards"][-1]["sha256"]
    assert [s["sha256"] for s in store_mod.read_manifest(folder)["shards"]] == [
        s["sha256"] for s in before["shards"]
    ]
