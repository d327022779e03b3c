"""A full disk (a small tmpfs) in harvest and in training: one sentence and exit code 2, nothing written
before is lost, and once space is freed the same command finishes with the uninterrupted result.
Also without a tmpfs: safetensors' own SafetensorError("No space left on device") is reported the same way."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from sae_pipeline import layout
from sae_pipeline.data import store as store_mod
from sae_pipeline.errors import UserError
from sae_pipeline.train import run
from tests.faults import harness
from tests.faults.tally import record
from tests.helpers import (
    assert_same,
    cfg_for,
    make_store,
    save_tiny_model,
    tiny_overrides,
    weights,
    write_corpus,
)


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a given size (root only; skipped where mounting is not allowed), resizable."""
    mount = tmp_path / "disk"
    mount.mkdir()

    def resize(size: str) -> Path:
        opts = f"size={size}" if not resize.mounted else f"remount,size={size}"
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mount)], capture_output=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({res.stderr.decode().strip() or res.returncode})")
        resize.mounted = True
        return mount

    resize.mounted = False
    yield resize
    if resize.mounted and subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(mount)], check=False)  # a file still open: detach it anyway


def _one_line(err: str) -> str:
    lines = [ln for ln in err.split("\n") if ln.strip() and "\r" not in ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_harvest_on_a_full_disk_then_resumed(tmp_path, small_disk):
    model, corpus = save_tiny_model(tmp_path / "model"), write_corpus(tmp_path / "corpus.jsonl")
    clean = tmp_path / "clean"
    assert harness.invoke("harvest", tiny_overrides(clean, model, corpus))[0] == 0
    (ref,) = clean.rglob(layout.MANIFEST)
    ref_shas = [s["sha256"] for s in store_mod.read_manifest(ref.parent)["shards"]]
    disk = small_disk("200k")  # room for about one shard
    args = tiny_overrides(disk, model, corpus)
    code, err = harness.invoke("harvest", args)
    record("disk_full_trials")
    line = _one_line(err)
    assert code == 2 and "no space left on the device" in line and str(disk) in line, line
    (manifest,) = disk.rglob(layout.MANIFEST)
    kept = store_mod.read_manifest(manifest.parent)
    assert not kept["complete"] and len(kept["shards"]) < len(ref_shas)
    assert [s["sha256"] for s in kept["shards"]] == ref_shas[: len(kept["shards"])]
    small_disk("4m")
    assert harness.invoke("harvest", args)[0] == 0
    assert [s["sha256"] for s in store_mod.read_manifest(manifest.parent)["shards"]] == ref_shas
    record("disk_full_resumed")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("store") / "s", n_contexts=64, d_in=16, tag_rows=False)


def test_training_checkpoints_on_a_full_disk_then_resumed(store, tmp_path, small_disk):
    run(cfg_for(store, tmp_path / "ref"))
    disk = small_disk("100k")  # a checkpoint of this SAE is ~40 kB; two are kept
    args = [
        f"store={store}",
        "train=tiny",
        "logger=none",
        f"paths.root={tmp_path}",
        f"train.run_dir={disk / 'run'}",
    ]
    code, err = harness.invoke("train", args)
    record("disk_full_trials")
    line = _one_line(err)
    assert (
        code == 2 and "no space left on the device" in line and "nothing written before it was lost" in line
    )
    assert str(disk) in line, line
    small_disk("4m")
    assert harness.invoke("train", [*args, "train.resume=true"]) == (0, "")
    assert_same(weights(disk / "run"), weights(tmp_path / "ref"))
    record("disk_full_resumed")


def test_safetensors_no_space_error_is_one_sentence(store, tmp_path, monkeypatch):
    """SafetensorError is not an OSError: without the conversion it escaped as a traceback."""
    from safetensors import SafetensorError

    from sae_pipeline import files

    real = files.save_file
    calls = {"n": 0}

    def full(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise SafetensorError(
                'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
            )
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(files, "save_file", full)
    args = [
        f"store={store}",
        "train=tiny",
        "logger=none",
        f"paths.root={tmp_path}",
        f"train.run_dir={tmp_path / 'run'}",
    ]
    code, err = harness.invoke("train", args)
    line = _one_line(err)
    assert (
        code == 2 and line.startswith("error: no space left on the device at ") and "checkpoints" in line
    ), line
    monkeypatch.setattr(files, "save_file", real)
    with pytest.raises(UserError, match="already holds a run"):
        run(cfg_for(store, tmp_path / "run"))
    run(cfg_for(store, tmp_path / "run", "train.resume=true"))
    assert (tmp_path / "run" / layout.FINAL_SAE / layout.SAE_WEIGHTS).exists()


def test_full_disk_at_a_manifest_write_names_the_manifest(tmp_path, small_disk):
    """The manifest is written with plain file writes, whose ENOSPC names no file: the sentence must name it.
    The store goes to a tmpfs filled to the last byte, so the very first manifest write is the one that fails."""
    model, corpus = save_tiny_model(tmp_path / "model"), write_corpus(tmp_path / "corpus.jsonl")
    disk = small_disk("256k")
    with open(disk / "filler", "wb", buffering=0) as f, pytest.raises(OSError):
        while True:
            f.write(b"\0" * 4096)
    args = [*tiny_overrides(tmp_path, model, corpus), f"harvest.out_dir={disk / 'stores'}"]
    code, err = harness.invoke("harvest", args)
    record("disk_full_trials")
    line = _one_line(err)
    manifest = layout.store_dir(disk / "stores", "blocks.1.hook_resid_post") / layout.MANIFEST
    assert code == 2 and "no space left on the device" in line and f"at {manifest};" in line, line
    (disk / "filler").unlink()
    assert harness.invoke("harvest", args)[0] == 0
    assert store_mod.read_manifest(manifest.parent)["complete"]
    record("disk_full_resumed")
