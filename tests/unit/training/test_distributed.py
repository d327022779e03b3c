"""Data-parallel sae-train: 2 real processes under torchrun (gloo, CPU) train what 1 process trains.

One 2-rank launch trains a sweep group of TopK, BatchTopK and ReLU SAEs (every batch-wide reduction is
exercised: AuxK on dead latents, the batch top-k threshold, clipping, dead counters); the reference is the
same group trained in this process. These run in CI (`pytest -m distributed` selects them); they need
no GPU.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from safetensors.torch import load_file

from sae_pipeline import layout
from sae_pipeline.errors import UserError
from sae_pipeline.train import StopRequested, run
from sae_pipeline.training import checkpoint
from tests.helpers import make_store

pytestmark = pytest.mark.distributed

ARCHS = ("topk", "batchtopk", "relu")
GROUP = "train.group=[" + ",".join(f"{{arch:{a},name:{a}}}" for a in ARCHS) + "]"
# dead_tokens below the run's 4096 tokens, so latents die and AuxK trains on the global dead mask
COMMON = ["train=tiny", "logger=none", "sae=topk", "train.dead_tokens=128", GROUP]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def torchrun(store: Path, run_dir: Path, *overrides: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=2 -m sae_pipeline.train ...` (the real command line)."""
    args = [f"store={store}", f"train.run_dir={run_dir}", f"hydra.run.dir={run_dir.parent / 'hydra'}"]
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         "-m", "sae_pipeline.train", *args, *COMMON, *overrides],
        cwd=run_dir.parent, env={**ENV, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def cfg_for(store: Path, run_dir: Path, *overrides: str):
    with initialize_config_module("sae_pipeline.conf", version_base="1.3"):
        return compose(
            config_name="train", overrides=[f"store={store}", f"train.run_dir={run_dir}", *COMMON, *overrides]
        )


def weights(run_dir: Path, arch: str) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / arch / layout.FINAL_SAE / layout.SAE_WEIGHTS))


def max_relative_difference(a: dict, b: dict) -> float:
    """max over tensors of ||a - b|| / ||b||."""
    assert a.keys() == b.keys()
    return max(
        float((a[k].double() - b[k].double()).norm() / b[k].double().norm().clamp_min(1e-30)) for k in a
    )


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Each rank computes on one thread (OMP_NUM_THREADS=1 above), so the one-process reference does too:
    2 ranks and 1 process then differ only in how the batch's sums are split, not in thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("store") / "s", n_contexts=64, d_in=16, tag_rows=False)


@pytest.fixture(scope="module")
def two_ranks(store, tmp_path_factory) -> Path:
    """An uninterrupted 2-rank run of the group."""
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    res = torchrun(store, run_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    return run_dir


def test_two_ranks_train_the_same_saes_as_one_process(store, two_ranks, tmp_path):
    run(cfg_for(store, tmp_path / "one"))
    assert json.loads((two_ranks / layout.CONFIG).read_text())["world_size"] == 2
    for arch in ARCHS:
        assert json.loads((two_ranks / arch / layout.CONFIG).read_text())["world_size"] == 2
        diff = max_relative_difference(weights(two_ranks, arch), weights(tmp_path / "one", arch))
        print(f"{arch}: max relative difference of the final weights {diff:.2e}")
        assert diff < 1e-5, arch
    logged = [json.loads(ln) for ln in (two_ranks / "topk" / layout.TRAIN_LOG).read_text().splitlines()]
    assert any(rec.get("loss/aux_k", 0) > 0 for rec in logged)  # AuxK did train on dead latents
    assert any(rec.get("dead_latents", 0) > 0 for rec in logged)


def test_two_ranks_stopped_and_resumed_equal_an_uninterrupted_run(store, two_ranks, tmp_path):
    run_dir = tmp_path / "run"
    res = torchrun(store, run_dir, "train.advanced.stop_after_steps=41")  # checkpoints every 16 steps: 16, 32
    assert res.returncode == 0, res.stderr[-3000:]
    assert "stopped after step 41" in res.stdout
    assert not (run_dir / "topk" / layout.FINAL_SAE).exists()
    assert (
        json.loads((checkpoint.latest(run_dir / "topk") / layout.TRAIN_META).read_text())["world_size"] == 2
    )
    with pytest.raises(UserError, match="written by 2 processes and this resume has 1"):
        run(cfg_for(store, run_dir, "train.resume=true"))
    res = torchrun(store, run_dir, "train.resume=true")
    assert res.returncode == 0, res.stderr[-3000:]
    for arch in ARCHS:
        a, b = weights(run_dir, arch), weights(two_ranks, arch)
        for k in a:
            assert torch.equal(a[k], b[k]), (arch, k)


def test_one_process_run_is_not_resumed_by_two(store, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(StopRequested):
        run(cfg_for(store, run_dir, "train.advanced.stop_after_steps=20", "train.total_tokens=1536"))
    res = torchrun(store, run_dir, "train.resume=true", "train.total_tokens=1536")
    assert res.returncode != 0  # torchrun exits 1 when a rank exits 2
    assert "written by 1 processes and this resume has 2" in res.stdout + res.stderr


# ---- the collectives against the one-process value on the whole batch (2 processes joined from SLURM variables) ----
def test_collectives_give_the_whole_batch_values_under_srun_variables():
    from tests.support.dist_workers import collectives_worker  # a light module: spawned processes import it

    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(collectives_worker, args=(2, port), nprocs=2, join=True)


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_two_ranks_step_with_the_gradient_of_the_whole_batch(arch):
    """The value of the all-reduced gradient in a real training step (2 gloo ranks, tests/support/dist_workers.py)."""
    from tests.support.dist_workers import member_grads_worker

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(member_grads_worker, args=(2, port, arch), nprocs=2, join=True)
