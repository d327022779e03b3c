"""A harvest split into parts (processes, torchrun ranks, SLURM array tasks) writes the rows of one process.

The reference is a one-process `sae-harvest` of the same config (itself checked against transformers'
hidden states in tests/cli/test_harvest.py). Every command runs as a real subprocess with one CPU thread.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_pipeline import harvest, layout
from sae_pipeline.data import parts, store
from sae_pipeline.errors import UserError
from sae_pipeline.integrity.tree import verify_store
from tests.helpers import REPO, compose_config, run_cli, save_tiny_model, tiny_overrides, write_corpus

N_TOKENS = 2000  # 65 contexts of 31 rows, 16 contexts per shard: 5 shards, the last one of 1 context
HOOK = "blocks.1.hook_resid_post"
ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama, a corpus, and the store a one-process harvest of them writes."""
    root = tmp_path_factory.mktemp("parts")
    model, corpus = save_tiny_model(root / "model", "llama"), write_corpus(root / "corpus.jsonl")
    args = tiny_overrides(root / "one", model, corpus, N_TOKENS)
    started = time.perf_counter()
    res = run_cli("harvest", args, cwd=root, env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    print(f"one-process harvest: {time.perf_counter() - started:.1f} s")
    return {"root": root, "model": model, "corpus": corpus, "reference": _store(root / "one")}


def _store(root: Path) -> Path:
    return layout.store_dir(root / "runs" / "stores" / "tiny" / "corpus", HOOK)


def _args(setup, name: str, *extra: str) -> list[str]:
    return tiny_overrides(setup["root"] / name, setup["model"], setup["corpus"], N_TOKENS) + list(extra)


def _harvest(setup, name: str, *extra: str) -> subprocess.CompletedProcess:
    return run_cli("harvest", _args(setup, name, *extra), cwd=setup["root"], env=ENV)


def _rows_by_position(folder: Path) -> dict[str, torch.Tensor]:
    """Every row of a store, read through its manifest, sorted by (context id, position)."""
    manifest = store.read_manifest(folder)
    files = [load_file(str(folder / s["file"])) for s in manifest["shards"]]
    rows = {k: torch.cat([f[k] for f in files]) for k in store.SHARD_KEYS}
    key = rows["context_ids"].long() * 10_000 + rows["positions"].long()
    order = torch.argsort(key)
    return {k: v[order] for k, v in rows.items()}


def assert_same_store(merged: Path, reference: Path) -> int:
    """The merged store holds the reference's rows bit for bit; returns how many rows were compared."""
    a, b = store.read_manifest(merged), store.read_manifest(reference)
    assert a["complete"] and a["parts"] == 2 and "parts" not in b
    assert a["fingerprint"] == b["fingerprint"] and a["n_tokens"] == b["n_tokens"]
    assert a["dataset"]["heldout"] == b["dataset"]["heldout"]
    assert len(a["shards"]) == len(b["shards"]) == 5
    for shard in a["shards"]:  # every checksum in the merged manifest is the file's own
        assert hashlib.sha256((merged / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]
    # each shard file is the reference's, byte for byte (same contexts, same shuffle)
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    ra, rb = _rows_by_position(merged), _rows_by_position(reference)
    n = rb["token_ids"].shape[0]
    ids = rb["context_ids"].long() * 10_000 + rb["positions"].long()
    assert ids.unique().numel() == n, "the reference holds each (context, position) once"
    for k in ("context_ids", "positions", "token_ids"):
        assert torch.equal(ra[k], rb[k]), k
    assert torch.equal(ra["activations"].view(torch.int32), rb["activations"].view(torch.int32))
    assert a["norm_stats"] == pytest.approx(b["norm_stats"], rel=1e-9)
    return n


def test_shard_plan_partitions_the_contexts():
    for n_contexts, cps, n_parts in [(65, 16, 2), (64, 16, 3), (5, 16, 4), (100, 7, 5)]:
        spans = [s for p in range(n_parts) for s in parts.shard_plan(n_contexts, cps, p, n_parts)]
        spans.sort(key=lambda s: s.index)
        assert [s.index for s in spans] == list(range(-(-n_contexts // cps)))
        covered = [c for s in spans for c in range(s.first_context, s.first_context + s.n_contexts)]
        assert covered == list(range(n_contexts))
        assert all(s.n_contexts == cps for s in spans[:-1])


def test_two_parts_as_separate_processes_equal_one_process(setup, capsys):
    started = time.perf_counter()
    first = _harvest(setup, "two", "harvest.parts=2", "harvest.part=0")
    assert first.returncode == 0, first.stderr[-3000:]
    folder = _store(setup["root"] / "two")
    assert not (folder / layout.MANIFEST).exists() and "waiting for other parts" in first.stderr
    second = _harvest(setup, "two", "harvest.parts=2", "harvest.part=1")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "all 2 parts are complete" in second.stderr  # the last part merged
    n = assert_same_store(folder, setup["reference"])
    with capsys.disabled():
        print(
            f"\n2 parts (sequential processes) == 1 process: {n} rows, {time.perf_counter() - started:.1f} s"
        )
    # the merged store is an ordinary store: readers verify it, a rerun has nothing to do
    merged = store.ActivationStore(folder)
    assert verify_store(folder)[1] == []
    assert merged.n_rows == n
    again = _harvest(setup, "two")
    assert again.returncode == 0 and "nothing to do" in again.stderr


def test_killed_part_resumes_alone_and_merge_names_missing_parts(setup, capsys):
    folder = _store(setup["root"] / "killed")
    killed = _harvest(
        setup, "killed", "harvest.parts=2", "harvest.part=0", "harvest.advanced.stop_after_shards=1"
    )
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL: no clean-up ran
    part0 = layout.part_dir(folder, 0, 2)
    m0 = store.read_manifest(part0)
    assert len(m0["shards"]) == 1 and not m0["complete"]

    res = _harvest(setup, "killed", "harvest.parts=2", "harvest.merge=true")
    assert res.returncode == 2
    (line,) = res.stderr.strip().splitlines()
    assert "part 0 of 2 is incomplete (1 shards in" in line and "(harvest.part=0 harvest.parts=2)" in line

    other = _harvest(setup, "killed", "harvest.parts=2", "harvest.part=1")
    assert other.returncode == 0 and "waiting for other parts" in other.stderr
    assert not (folder / layout.MANIFEST).exists()

    started = time.perf_counter()
    resumed = _harvest(setup, "killed", "harvest.parts=2", "harvest.part=0")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after 1 complete shards" in resumed.stderr
    n = assert_same_store(folder, setup["reference"])
    with capsys.disabled():
        print(f"\nkilled part 0 resumed == 1 process: {n} rows, resume {time.perf_counter() - started:.1f} s")

    # an explicit merge of complete parts rewrites the same manifest
    before = (folder / layout.MANIFEST).read_text()
    assert _harvest(setup, "killed", "harvest.parts=2", "harvest.merge=true").returncode == 0
    assert (folder / layout.MANIFEST).read_text() == before

    # merging when a part never ran (in this process): one sentence naming it
    harvest.run(compose_config("harvest", _args(setup, "missing", "harvest.parts=2", "harvest.part=1")))
    missing = layout.part_dir(_store(setup["root"] / "missing"), 0, 2) / layout.MANIFEST
    with pytest.raises(UserError, match=f"part 0 of 2 is missing \\({missing} does not exist\\)"):
        harvest.run(
            compose_config("harvest", _args(setup, "missing", "harvest.parts=2", "harvest.merge=true"))
        )


def test_torchrun_two_ranks_equal_one_process(setup, capsys):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **ENV}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "sae_pipeline.harvest", *_args(setup, "torchrun")]
    started = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    folder = _store(setup["root"] / "torchrun")
    assert "all 2 parts are complete" in res.stderr
    n = assert_same_store(folder, setup["reference"])
    with capsys.disabled():
        print(f"\ntorchrun 2 ranks == 1 process: {n} rows, {time.perf_counter() - started:.1f} s")


def test_parts_when_the_text_runs_out(tmp_path):
    """Fewer contexts than asked for: parts past the end write nothing, and the merge equals one process."""
    model = save_tiny_model(tmp_path / "model", "llama")
    corpus = write_corpus(tmp_path / "corpus.jsonl", n_docs=4, words_per_doc=120)

    def run(name, *extra):
        args = tiny_overrides(tmp_path / name, model, corpus, n_tokens=1800) + list(extra)
        return harvest.run(compose_config("harvest", args))[0]

    one = run("one")
    for part in range(4):
        split = run("split", "harvest.parts=4", f"harvest.part={part}")
    a, b = store.read_manifest(split), store.read_manifest(one)
    assert b["data_exhausted"] and a["data_exhausted"] and a["parts"] == 4
    assert b["n_tokens"] < 1800 and a["n_tokens"] == b["n_tokens"]
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert len(b["shards"]) == 3 and b["shards"][-1]["n_contexts"] < b["contexts_per_shard"]
    manifests = [store.read_manifest(layout.part_dir(split, j, 4)) for j in range(4)]
    # 4 shards were asked for; the text ends inside shard 2, and shard 3 lies past the end
    assert [len(m["shards"]) for m in manifests] == [1, 1, 1, 0]
    assert [m["data_exhausted"] for m in manifests] == [False, False, True, True]


def test_part_runs_respect_an_existing_store(setup, tmp_path):
    """A complete store with the same settings: nothing to do; other settings: refused unless overwrite."""
    shutil.copytree(setup["root"] / "one", tmp_path / "one")
    folder = _store(tmp_path / "one")
    before = (folder / layout.MANIFEST).read_text()

    def run(*extra):
        args = tiny_overrides(tmp_path / "one", setup["model"], setup["corpus"], N_TOKENS) + list(extra)
        return harvest.run(compose_config("harvest", ["harvest.parts=2", *args]))

    run("harvest.part=1")
    assert not layout.part_dir(folder, 1, 2).exists() and (folder / layout.MANIFEST).read_text() == before
    with pytest.raises(UserError, match="already exists with different settings.*harvest.overwrite=true"):
        run("harvest.part=0", "harvest.seed=1")
    run("harvest.part=0", "harvest.seed=1", "harvest.overwrite=true")
    assert not (folder / layout.MANIFEST).exists() and not list(
        folder.glob("shard-*")
    )  # the old store is gone
    assert store.read_manifest(layout.part_dir(folder, 0, 2))["complete"]


def test_part_keys_are_checked(monkeypatch, tmp_path):
    cfg = compose_config("harvest", ["harvest.parts=2", "harvest.part=2"])
    from sae_pipeline.schema.harvest import check_harvest_config

    with pytest.raises(UserError, match=r"harvest.part=2 must be between 0 and harvest.parts-1=1"):
        check_harvest_config(cfg.harvest)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert parts.resolve_part(compose_config("harvest", []).harvest) == (1, 2)
    with pytest.raises(UserError, match="disagree with torchrun's WORLD_SIZE=2"):
        parts.resolve_part(compose_config("harvest", ["harvest.parts=3"]).harvest)
    with pytest.raises(UserError, match="harvest.merge=true merges the parts of a split harvest"):
        check_harvest_config(compose_config("harvest", ["harvest.merge=true"]).harvest)
