"""Latent-sharded sae-train (`train.latent_shards`): real gloo processes under torchrun on the CPU.

A sweep group of TopK, BatchTopK and ReLU SAEs (AuxK on dead latents, the batch top-k threshold, clipping
and dead counters all exercised) is trained by 2 processes holding 2 latent shards, and by 4 processes as
2 data-parallel replicas x 2 shards; each must end with the SAE one process trains. The tolerance is
measured, not chosen: it is twice the floor of float-order differences that already count as "the same
SAE" -- the one-process run at another thread count, and 2 data-parallel ranks (DESIGN.md: the same SAE
up to the order of float additions). Two such runs each sit one floor from exact arithmetic, so they may
differ by two. lr is 1e-3, where these runs are not chaotic. `pytest -m distributed` selects these.
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
from sae_pipeline.sae import read_sae
from sae_pipeline.train import run
from tests.helpers import make_store

pytestmark = pytest.mark.distributed

ARCHS = ("topk", "batchtopk", "relu")
# d_sae 128 (8 x 16); k=4 and dead_tokens=128 (2 batches): latents die at lr 1e-3 and AuxK trains on them
GROUP = "train.group=[{arch:topk,name:topk,k:4},{arch:batchtopk,name:batchtopk,k:4},{arch:relu,name:relu}]"
COMMON = ["train=tiny", "logger=none", "sae=topk", "train.dead_tokens=128", "train.lr=1e-3", GROUP]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def torchrun(store: Path, run_dir: Path, *overrides: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=N -m sae_pipeline.train ...` (the real command line)."""
    args = [f"store={store}", f"train.run_dir={run_dir}", f"hydra.run.dir={run_dir.parent / 'hydra'}"]
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         "-m", "sae_pipeline.train", *args, *COMMON, *overrides],
        cwd=run_dir.parent, env={**ENV, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def cfg_for(store: Path, run_dir: Path, *overrides: str):
    with initialize_config_module("sae_pipeline.conf", version_base="1.3"):
        return compose(
            config_name="train", overrides=[f"store={store}", f"train.run_dir={run_dir}", *COMMON, *overrides]
        )


def weights(run_dir: Path, arch: str) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / arch / layout.FINAL_SAE / layout.SAE_WEIGHTS))


def difference(a: Path, b: Path, arch: str) -> float:
    """max over tensors of ||a - b|| / ||b|| between two runs' final SAEs."""
    wa, wb = weights(a, arch), weights(b, arch)
    assert wa.keys() == wb.keys()
    return max(
        float((wa[k].double() - wb[k].double()).norm() / wb[k].double().norm().clamp_min(1e-30)) for k in wa
    )


def log(run_dir: Path, arch: str) -> list[dict]:
    """The training log lines (window statistics; validation and event lines left out)."""
    lines = [json.loads(ln) for ln in (run_dir / arch / layout.TRAIN_LOG).read_text().splitlines()]
    return [r for r in lines if "dead_latents" in r]


def launched(store: Path, run_dir: Path, *overrides: str, nproc: int = 2) -> Path:
    res = torchrun(store, run_dir, *overrides, nproc=nproc)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("store") / "s", n_contexts=64, d_in=16, tag_rows=False)


@pytest.fixture(scope="module")
def one(store, tmp_path_factory) -> dict[int, Path]:
    """The group trained by this process at 1 and at 2 threads."""
    out, threads = {}, torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out[n] = run(cfg_for(store, tmp_path_factory.mktemp(f"threads{n}") / "run"))
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def sharded(store, tmp_path_factory) -> Path:
    """2 processes, 2 latent shards, uninterrupted."""
    return launched(store, tmp_path_factory.mktemp("ls2") / "run", "train.latent_shards=2")


def test_latent_shards_train_the_same_saes_as_one_process(store, one, sharded, tmp_path):
    ddp = launched(store, tmp_path / "ddp")  # 2 data-parallel ranks: part of the floor
    grid = launched(store, tmp_path / "grid", "train.latent_shards=2", nproc=4)  # 2 replicas x 2 shards
    for arch in ARCHS:
        floor = max(difference(one[2], one[1], arch), difference(ddp, one[1], arch))
        got = {"2 shards": difference(sharded, one[1], arch), "2x2": difference(grid, one[1], arch)}
        print(f"{arch}: floor {floor:.2e}, " + ", ".join(f"{k} {v:.2e}" for k, v in got.items()))
        for what, diff in got.items():
            assert diff <= 2 * floor, (arch, what, diff, floor)
    # the logged statistics are the whole SAE's: L0 and dead latents summed over shards, AuxK at work
    for run_dir in (sharded, grid):
        for arch in ARCHS:
            a, b = log(run_dir, arch), log(one[1], arch)
            assert [r["dead_latents"] for r in a] == [r["dead_latents"] for r in b], arch
            for ra, rb in zip(a, b, strict=True):
                # float32 sums of the same counts: a few units in the last place
                assert abs(ra["l0"] - rb["l0"]) <= 1e-6 * rb["l0"], (arch, ra["l0"], rb["l0"])
    topk_log = log(sharded, "topk")
    assert any(r.get("loss/aux_k", 0) > 0 for r in topk_log) and any(r["dead_latents"] > 0 for r in topk_log)
    record = json.loads((grid / "topk" / layout.CONFIG).read_text())
    assert (record["latent_shards"], record["processes"], record["d_sae"]) == (2, 4, 128)
    # the final SAE is one ordinary SAE that the other stages load unchanged
    sae = read_sae(grid / "topk")
    assert sae.d_sae == 128 and sae.W_enc_DF.shape == (16, 128)
    assert sae(torch.randn(3, 16)).shape == (3, 16)


def test_sharded_run_stopped_and_resumed_equals_an_uninterrupted_run(store, sharded, tmp_path):
    run_dir = tmp_path / "run"
    res = torchrun(
        store, run_dir, "train.latent_shards=2", "train.advanced.stop_after_steps=41"
    )  # ckpts at 16, 32
    assert res.returncode == 0, res.stderr[-3000:]
    assert "stopped after step 41" in res.stdout
    for s in range(2):  # each shard's own checkpoints, holding its half of the latents
        ckpt = layout.checkpoint_dir(layout.latent_shard_dir(run_dir / "topk", s, 2), 32)
        assert load_file(str(ckpt / layout.SAE_WEIGHTS))["W_enc_DF"].shape == (16, 64)
        assert load_file(str(ckpt / layout.TRAIN_STATE))["x.since_fired_F"].shape == (64,)
    with pytest.raises(UserError, match=r"trained by 2 processes with train.latent_shards=2 .* has 1 with"):
        run(cfg_for(store, run_dir, "train.resume=true"))
    # shard 1's newest checkpoint is damaged: both shards resume from step 16 (and still end exactly right)
    damaged = layout.checkpoint_dir(layout.latent_shard_dir(run_dir / "relu", 1, 2), 32) / layout.SAE_WEIGHTS
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    res = torchrun(store, run_dir, "train.resume=true", "train.latent_shards=2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming at step 16/64" in res.stdout and "is damaged" in res.stderr
    for arch in ARCHS:
        a, b = weights(run_dir, arch), weights(sharded, arch)
        for k in a:
            assert torch.equal(a[k], b[k]), (arch, k)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.latent_shards=2", "train.group=[]", "sae.d_sae=127"], "d_sae=127 does not split into"),
        (["train.latent_shards=2", "train.group=[]", "sae=gated"], "supports sae.arch topk, batchtopk, relu, not gated"),
        (["train.latent_shards=2"], "does not divide the 1 processes"),
    ],
)  # fmt: skip
def test_impossible_layouts_are_refused_before_anything_is_written(store, tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        run(cfg_for(store, tmp_path / "run", *overrides))
    assert not (tmp_path / "run").exists()


def test_a_refusal_is_one_sentence_and_exit_2(store, tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "sae_pipeline.train", f"store={store}", f"train.run_dir={tmp_path / 'run'}",
         f"hydra.run.dir={tmp_path / 'hydra'}", *COMMON, "train.latent_shards=3"],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and "a multiple of 3" in res.stderr
    assert not (tmp_path / "run").exists()


def test_each_rank_holds_half_the_weights_and_optimizer_state(tmp_path):
    """Bytes of parameters + Adam state per rank: the latent tensors halve, b_dec (replicated) does not."""
    import contextlib

    from omegaconf import OmegaConf

    from sae_pipeline.sae import TopKConfig
    from sae_pipeline.schema.train import TrainConfig
    from sae_pipeline.training.member import Member
    from tests.support.dist_workers import latent_memory_worker, state_bytes

    tcfg = OmegaConf.structured(TrainConfig(lr=1e-3, device="cpu"))
    whole = Member("", tmp_path, TopKConfig(k=4, d_sae=64), 16, tcfg, torch.device("cpu"), 1.0)
    x_BD = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    whole.train_step(x_BD, 0, 1e-3, 1.0, tcfg, contextlib.nullcontext)
    full = state_bytes(whole)
    step = next(iter(whole.opt.state.values()))["step"]  # Adam's step counter: one per parameter, not split
    step_bytes = step.numel() * step.element_size()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(latent_memory_worker, args=(2, port, 2, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        for name, n in full.items():
            want = n if name == "b_dec_D" else (n - step_bytes) // 2 + step_bytes
            assert got["bytes"][name] == want, (rank, name, got["bytes"][name], want)
        assert got["counters"] == 32  # dead-latent counters: this shard's latents only
        print(f"rank {rank}: {sum(got['bytes'].values())} of {sum(full.values())} bytes")
