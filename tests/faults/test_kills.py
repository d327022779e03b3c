"""SIGKILL at named and random points of harvest and training, then the same command again: the result
is bit-identical to an uninterrupted run. Named points (sae_pipeline.faults) land inside a shard write,
the very first manifest write, a later manifest write, a checkpoint write and the final save."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from sae_pipeline import harvest, layout
from sae_pipeline.data import store as store_mod
from sae_pipeline.files import sha256_file
from sae_pipeline.train import run
from tests.faults import harness
from tests.faults.tally import record
from tests.helpers import (
    assert_same,
    cfg_for,
    compose_config,
    make_store,
    save_tiny_model,
    tiny_overrides,
    weights,
    write_corpus,
)


def _write_threads(path: Path) -> None:
    import torch

    path.write_text(str(torch.get_num_threads()))


def test_the_child_computes_with_the_parent_thread_count(tmp_path):
    """Bit-identity holds at one thread count: a child at another count than the reference and the resume
    (this process) would fail the exact comparisons below on a CPU whose kernels split work by threads."""
    import torch

    out = tmp_path / "threads"
    assert not harness.kill_after(600, _write_threads, out)  # it finished (600 s: a hang guard only)
    assert int(out.read_text()) == torch.get_num_threads()


# ---- training ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("store") / "s", n_contexts=64, d_in=16, tag_rows=False)


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory) -> tuple[dict, float]:
    """The uninterrupted run's weights, and how long it took (random kills land within that time)."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    start = time.perf_counter()
    run(cfg_for(store, run_dir))
    return weights(run_dir), time.perf_counter() - start


# train=tiny: 64 steps, a checkpoint every 16 (4 in all, the last one at the end), then the final save
TRAIN_POINTS = [
    ("write:config.json:1", False),  # the run's record, before the first step
    ("checkpoint:2", False),  # inside the checkpoint of step 32 (files written, folder not yet renamed)
    ("checkpoint:4", False),  # inside the last checkpoint
    ("write:sae.safetensors:1", True),  # inside the final SAE's weights file, half written
    ("final:1", False),  # the final folder written, not yet renamed
]


@pytest.mark.parametrize(("point", "torn"), TRAIN_POINTS)
def test_training_killed_at_a_named_point_resumes_identical(store, reference, tmp_path, point, torn):
    run_dir = tmp_path / "run"
    assert harness.kill_at(point, run, cfg_for(store, run_dir), tmp=tmp_path, torn=torn), (
        f"never reached {point}"
    )
    record("kill_trials")
    assert (
        not (run_dir / layout.FINAL_SAE / layout.SAE_WEIGHTS).exists() or point == "write:sae.safetensors:1"
    )
    run(cfg_for(store, run_dir, "train.resume=true"))
    assert_same(weights(run_dir), reference[0])
    record("resumed_identical")


@pytest.mark.parametrize("seed", range(3))
def test_training_killed_at_a_random_time_resumes_identical(store, reference, tmp_path, seed):
    run_dir = tmp_path / "run"
    delay = random.Random(seed).uniform(0.05, 0.6) * reference[1]
    killed = harness.kill_after(delay, run, cfg_for(store, run_dir))
    record("random_kills_attempted")
    record("kill_trials", int(killed))  # a run that finished before its kill is no kill trial
    run(cfg_for(store, run_dir, "train.resume=true"))
    assert_same(weights(run_dir), reference[0])
    record("resumed_identical", int(killed))


# ---- harvest -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return {"model": save_tiny_model(root / "llama"), "corpus": write_corpus(root / "corpus.jsonl")}


def harvest_cfg(root: Path, assets):
    return compose_config("harvest", tiny_overrides(root, assets["model"], assets["corpus"]))


@pytest.fixture(scope="module")
def clean_harvest(assets, tmp_path_factory) -> tuple[list[str], float]:
    """The uninterrupted harvest's shard checksums, and how long a second one takes (no first-time costs)."""
    harvest.run(harvest_cfg(tmp_path_factory.mktemp("warm-up"), assets))
    start = time.perf_counter()
    (folder,) = harvest.run(harvest_cfg(tmp_path_factory.mktemp("clean"), assets))
    return [s["sha256"] for s in store_mod.read_manifest(folder)["shards"]], time.perf_counter() - start


def _assert_same_store(folder: Path, clean: tuple[list[str], float]) -> None:
    clean = clean[0]
    manifest = store_mod.read_manifest(folder)
    assert manifest["complete"] and [s["sha256"] for s in manifest["shards"]] == clean
    assert [sha256_file(folder / s["file"]) for s in manifest["shards"]] == clean
    assert not list(folder.glob("*.tmp"))


HARVEST_POINTS = [
    ("write:manifest.json:1", False),  # the very first manifest: the folder holds only manifest.json.tmp
    ("write:shard-00001.safetensors:1", True),  # inside a shard write, the file half written
    ("write:manifest.json:3", False),  # the manifest listing shard 1
    ("write:manifest.json:6", False),  # the final manifest (complete=true)
]


@pytest.mark.parametrize(("point", "torn"), HARVEST_POINTS)
def test_harvest_killed_at_a_named_point_resumes_identical(assets, clean_harvest, tmp_path, point, torn):
    cfg = harvest_cfg(tmp_path, assets)
    assert harness.kill_at(point, harvest.run, cfg, tmp=tmp_path, torn=torn), f"never reached {point}"
    record("kill_trials")
    (folder,) = harvest.run(harvest_cfg(tmp_path, assets))
    _assert_same_store(folder, clean_harvest)
    record("resumed_identical")


@pytest.mark.parametrize("seed", range(2))
def test_harvest_killed_at_a_random_time_resumes_identical(assets, clean_harvest, tmp_path, seed):
    delay = random.Random(seed).uniform(0.05, 0.6) * clean_harvest[1]
    killed = harness.kill_after(delay, harvest.run, harvest_cfg(tmp_path, assets))
    record("random_kills_attempted")
    record("kill_trials", int(killed))  # a run that finished before its kill is no kill trial
    (folder,) = harvest.run(harvest_cfg(tmp_path, assets))
    _assert_same_store(folder, clean_harvest)
    record("resumed_identical", int(killed))
