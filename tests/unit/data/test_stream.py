"""Training while the harvest runs (train.stream=true): real processes, the same SAE whatever the timing.

The reference is `sae-train train.stream=true` on the finished store; a streamed run must equal it bit for
bit when the harvest is slower than training, when it is faster, and when either side is killed and rerun.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from sae_pipeline import harvest, layout
from sae_pipeline.data.follow import StoreFollower
from sae_pipeline.data.source import open_source
from sae_pipeline.data.store import StoreWriter, read_manifest
from sae_pipeline.data.stream import StreamReader
from sae_pipeline.errors import UserError
from sae_pipeline.schema.help import stage_module
from sae_pipeline.train import run
from sae_pipeline.training import checkpoint
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

# A harvest and a training process run side by side: at the default thread count each would spin OpenMP threads
# on the same cores (a 2-core machine then ran some steps 100x slower and CI hung), so every process here, this
# one included (the reference), computes on one thread; results are bit-identical only at one thread count.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
       "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # fmt: skip
DEADLINE_S = 600  # a process pair that has not finished by then is stuck: kill it and fail with its logs
STORE = ("tiny", "corpus", "blocks.1.hook_resid_post")
# 97 contexts of 31 rows, 4 contexts (124 rows) per shard: 25 shards
HARVEST = ["harvest.n_tokens=3000", "harvest.shard_size=100"]
TRAIN = ["train=tiny", "logger=none", "train.stream=true", "train.advanced.stream_window_shards=3",
         "train.total_tokens=100000", "train.checkpoint_every_tokens=256", "train.advanced.stream_wait_s=300"]  # fmt: skip


def _popen(module: str, args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", stage_module(module), *args],
        cwd=cwd, env=ENV, stdout=open(log, "w"), stderr=subprocess.STDOUT,
    )  # fmt: skip


def _wait(proc: subprocess.Popen, log: Path, ok=(0,)) -> None:
    try:
        rc = proc.wait(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"still running after {DEADLINE_S} s: " + log.read_text()[-3000:]) from None
    assert rc in ok, log.read_text()[-3000:]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream-assets")
    return save_tiny_model(root / "llama", "llama"), write_corpus(root / "corpus.jsonl")


def _harvest_args(root: Path, assets, *extra: str) -> list[str]:
    return [*tiny_overrides(root, assets[0], assets[1]), *HARVEST, *extra]


def _store(root: Path) -> Path:
    return root / "runs" / "stores" / STORE[0] / STORE[1] / STORE[2]


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """The finished store (harvested in this process) and the SAE of a streamed run on it."""
    root = tmp_path_factory.mktemp("stream-ref")
    harvest.run(compose_config("harvest", _harvest_args(root, assets)))
    run(cfg_for(_store(root), root / "ref", *TRAIN[1:]))
    assert len(read_manifest(_store(root))["shards"]) == 25
    return _store(root), weights(root / "ref")


@pytest.mark.slow  # 6 processes: ~1-2 min on 2 cores
def test_streamed_runs_equal_the_finished_store_whatever_the_timing(assets, reference, tmp_path):
    _, ref = reference
    # 1. the harvest is slower than training (a pause after every shard): training waits for each window
    slow = tmp_path / "slow"
    harvest_p = _popen(
        "harvest",
        _harvest_args(slow, assets, "harvest.advanced.shard_delay_s=0.3"),
        tmp_path,
        slow.with_suffix(".h"),
    )
    train = _popen(
        "train",
        [f"store={_store(slow)}", *TRAIN, f"train.run_dir={slow}/run"],
        tmp_path,
        slow.with_suffix(".t"),
    )
    _wait(harvest_p, slow.with_suffix(".h"))
    _wait(train, slow.with_suffix(".t"))
    assert read_manifest(_store(slow))["complete"]
    assert_same(weights(slow / "run"), ref)

    # 2. the harvest is killed after 6 shards and training is SIGKILLed while it waits for more; both reruns
    #    (the harvest at full speed, ahead of training) give the same SAE
    fast = tmp_path / "fast"
    hlog, tlog = fast.with_suffix(".h"), fast.with_suffix(".t")
    harvest_p = _popen(
        "harvest", _harvest_args(fast, assets, "harvest.advanced.stop_after_shards=6"), tmp_path, hlog
    )
    train_args = [f"store={_store(fast)}", *TRAIN, f"train.run_dir={fast}/run"]
    train = _popen("train", train_args, tmp_path, tlog)
    _wait(harvest_p, hlog, ok=(-signal.SIGKILL,))
    assert not read_manifest(_store(fast))["complete"]
    deadline = time.time() + 120  # 6 shards hold 10 batches: checkpoints at steps 4 and 8, then it waits
    while (
        len(checkpoint.list_checkpoints(fast / "run")) < 2 and time.time() < deadline and train.poll() is None
    ):
        time.sleep(0.05)
    train.send_signal(signal.SIGKILL)
    train.wait()
    assert not (fast / "run" / layout.FINAL_SAE).exists()
    assert checkpoint.list_checkpoints(fast / "run"), tlog.read_text()[-2000:]
    harvest_p = _popen("harvest", _harvest_args(fast, assets), tmp_path, hlog)
    train = _popen("train", [*train_args, "train.resume=true"], tmp_path, tlog)
    _wait(harvest_p, hlog)
    _wait(train, tlog)
    assert_same(weights(fast / "run"), ref)


def test_stream_reader_waits_for_listed_shards_and_says_which(tmp_path, capfd, monkeypatch):
    """A store written shard by shard on a thread, each shard only once the reader is seen waiting for it:
    the reader returns the batches of the same reader over the finished store, and says what it waits for."""
    full = make_store(tmp_path / "full", n_contexts=40, d_in=8, contexts_per_shard=8)  # 5 shards of 128 rows
    shards = [open_source(full).local_path(e) for e in open_source(full).entries(read_manifest(full))]
    from safetensors.torch import load_file

    header = {
        k: v
        for k, v in read_manifest(full).items()
        if k in ("d_in", "dtype", "context_size", "hook", "model")
    }
    writer = StoreWriter(tmp_path / "growing", header, fingerprint="g", overwrite=False)
    waiting = threading.Event()

    def nap(self):
        waiting.set()
        time.sleep(0.01)

    monkeypatch.setattr(StoreFollower, "_nap", nap)

    def harvest():
        for i, path in enumerate(shards):
            waiting.wait(timeout=60)  # the reader is ahead and waits before every shard, whatever the machine
            waiting.clear()
            writer.write_shard(i, load_file(str(path)), first_context=8 * i, n_contexts=8)
        waiting.wait(timeout=60)
        writer.finish({})

    def read_all(folder):
        reader = StreamReader(open_source(folder), 48, seed=3, val_tokens=20, window_shards=2)
        out = []
        while (x := reader.next_batch()) is not None:
            out.append(x[:, 0])
        reader.close()
        return torch.cat(out), reader

    thread = threading.Thread(target=harvest)
    thread.start()
    got, reader = read_all(tmp_path / "growing")
    thread.join()
    want, _ = read_all(full)
    assert torch.equal(got, want)
    held = set(reader.validation_rows()[:, 0].tolist())
    assert len(held) == 32 and not held & set(got.tolist())  # 2 whole contexts of shard 0 held out
    assert len(set(got.tolist())) == len(got) == (640 - 32) // 48 * 48  # every row at most once
    err = capfd.readouterr().err
    assert "waiting for shard 00000 of" in err and "(the harvest has listed 0 so far)" in err
    assert "arrived after" in err


def test_streaming_refusals_are_one_sentence(tmp_path):
    store = make_store(tmp_path / "s", n_contexts=16, d_in=8, contexts_per_shard=8)
    with pytest.raises(UserError, match="first shard"):
        StreamReader(open_source(store), 16, val_tokens=10_000)
    cfg = cfg_for(
        tmp_path / "nowhere", tmp_path / "r", "train.stream=true", "train.advanced.stream_wait_s=0.3"
    )
    with pytest.raises(UserError, match="no activation store appeared at .*nowhere"):
        run(cfg)


def test_bounded_harvest_keeps_at_most_n_shards_and_trains_the_same_sae(assets, reference, tmp_path):
    """harvest.keep_shards=7 streamed into one training run: never more than 7 shards (+ the one being written)
    on disk, every shard recorded in the manifest after its file is gone, and the SAE of the unbounded run."""
    ref_store, ref = reference
    hlog, tlog = tmp_path / "h.log", tmp_path / "t.log"
    store = _store(tmp_path)
    harvest_p = _popen("harvest", _harvest_args(tmp_path, assets, "harvest.keep_shards=7"), tmp_path, hlog)
    train = _popen("train", [f"store={store}", *TRAIN, f"train.run_dir={tmp_path}/run"], tmp_path, tlog)
    peak, deadline = 0, time.monotonic() + DEADLINE_S
    while (harvest_p.poll() is None or train.poll() is None) and time.monotonic() < deadline:
        if train.poll():  # training failed: the bounded harvest would wait for it forever
            break
        if store.exists():  # a safety bound: it holds at every moment, so sampling can only under-count
            peak = max(peak, len([p for p in store.iterdir() if p.name.startswith("shard-")]))
        time.sleep(0.02)
    if harvest_p.poll() is None or train.poll() is None or train.poll():
        harvest_p.kill(), train.kill()
        pytest.fail(
            f"stuck after {DEADLINE_S} s, or training failed:\n{hlog.read_text()[-2000:]}\n{tlog.read_text()[-2000:]}"
        )
    _wait(harvest_p, hlog)
    _wait(train, tlog)
    assert 0 < peak <= 8, peak
    assert_same(weights(tmp_path / "run"), ref)
    manifest, want = read_manifest(store), read_manifest(ref_store)
    assert [(s["n_rows"], s["sha256"]) for s in manifest["shards"]] == [
        (s["n_rows"], s["sha256"]) for s in want["shards"]
    ]
    gone = [s for s in manifest["shards"] if s.get("consumed")]
    assert gone and all(not (store / s["file"]).exists() for s in gone)
    (consumer,) = {s["consumed_by"] for s in gone}
    assert consumer.endswith("-rank0") and (store / "consumers" / f"{consumer}.json").exists()

    # a consumer that registers late, and a plain run, are refused in one sentence naming the shard and consumer
    for extra in (
        [*TRAIN, f"train.run_dir={tmp_path}/late"],
        ["train=tiny", "logger=none", f"train.run_dir={tmp_path}/plain"],
    ):
        res = subprocess.run([sys.executable, "-m", "sae_pipeline.train", f"store={store}", *extra],
                             cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert res.returncode == 2, res.stderr
        first = gone[0]["file"]
        assert f"the shard {first} of the store" in res.stderr and consumer in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1


def test_stream_reader_resumes_exactly_from_its_state(tmp_path):
    """Batches after a state() taken anywhere (mid-window, at a window's end) equal the uninterrupted stream's."""
    store = make_store(tmp_path / "s", n_contexts=64, d_in=8, contexts_per_shard=8)  # 8 shards of 128 rows
    reader = StreamReader(open_source(store), 32, seed=1, val_tokens=20, window_shards=3)
    stream, states = [], []
    while (x := reader.next_batch()) is not None:
        states.append(reader.state())
        stream.append(x[:, 0])
    reader.close()
    assert len(stream) == (1024 - 32) // 32
    for i in (0, 5, 10, 23, len(stream) - 2):  # 10: the end of window 0 (3 shards, less 32 held-out rows)
        again = StreamReader(open_source(store), 32, seed=1, val_tokens=20, window_shards=3, state=states[i])
        assert torch.equal(again.next_batch()[:, 0], stream[i + 1]), i
        again.close()
    assert states[10]["window"] == 1 and states[10]["position"] == 352
