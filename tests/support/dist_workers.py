"""Code run inside processes that tests spawn (kept light: a spawned process imports this module)."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def leave(tdist) -> None:
    """Both ranks pass a barrier before either tears its group down: a rank that destroyed its gloo pairs while
    the other still finished its last collective aborted the other (SIGABRT, seen once on a loaded CI machine)."""
    if tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()


def collectives_worker(rank: int, world: int, port: int) -> None:
    """Joins the job as srun would start it (SLURM variables, no torchrun), then checks each collective."""
    import torch.distributed as tdist

    from sae_pipeline.sae.batch_reduce import centered_sq_sum, kth_largest
    from sae_pipeline.training.distributed import from_env
    from sae_pipeline.training.stats import LatentStats

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        os.environ.pop(name, None)
    os.environ.update(SLURM_PROCID=str(rank), SLURM_NTASKS=str(world), SLURM_LOCALID=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist = from_env("cpu")
    assert (dist.rank, dist.world_size, dist.active, dist.is_main) == (rank, world, True, rank == 0)
    try:
        gen = torch.Generator().manual_seed(0)
        grads_N3 = torch.randn(world, 3, generator=gen)  # rank r's gradient is row r
        x_BD = torch.randn(8 * world, 5, generator=gen) + 2.0  # the global batch
        acts_BF = torch.relu(torch.randn(8 * world, 6, generator=gen) - 1.0)
        mine = dist.rows(x_BD.shape[0])
        p = torch.nn.Parameter(torch.zeros(3))
        p.grad = grads_N3[rank].clone()
        loss = dist.average_grads([p], torch.tensor(float(rank)))
        torch.testing.assert_close(p.grad, grads_N3.mean(0))
        torch.testing.assert_close(loss, torch.tensor((world - 1) / 2))
        full_t = x_BD.reshape(-1).topk(3 * x_BD.shape[0]).values.min()
        assert kth_largest(dist, x_BD[mine], 3 * (x_BD.shape[0] // world)) == full_t
        full_var = (x_BD - x_BD.mean(0)).pow(2).sum()
        torch.testing.assert_close(centered_sq_sum(dist, x_BD[mine]) * world, full_var)
        one, many = LatentStats(6, 20, torch.device("cpu")), LatentStats(6, 20, torch.device("cpu"), dist)
        x_hat_BD = x_BD * 0.9
        for _ in range(2):
            one.update(x_BD, x_hat_BD, acts_BF, torch.tensor(1.0), {}, 2.0)
            many.update(x_BD[mine], x_hat_BD[mine], acts_BF[mine], torch.tensor(1.0), {}, 2.0)
        assert torch.equal(one.since_fired_F, many.since_fired_F)
        a, b = one.summary(), many.summary()
        for k in ("mse", "fvu", "l0", "loss", "dead_latents", "dense_latents"):
            assert abs(a[k] - b[k]) <= 1e-5 * abs(a[k]) + 1e-7, (k, a[k], b[k])
    except BaseException:
        tdist.destroy_process_group()  # no barrier: the other rank may never reach it
        raise
    leave(tdist)


def member_grads_worker(rank: int, world: int, port: int, arch: str) -> None:
    """One training step of a Member on this rank's rows of a global batch: after the all-reduce its gradient
    is the one-process gradient of the whole batch (the mean over ranks, not their sum). Clipping is off here:
    it would rescale a wrong sum back to the clipping norm, and Adam's update hardly sees a factor 2 either."""
    from contextlib import nullcontext

    import torch.distributed as tdist
    from omegaconf import OmegaConf

    from sae_pipeline.sae import CONFIG_CLASSES
    from sae_pipeline.schema.train import TrainConfig
    from sae_pipeline.training.distributed import from_env
    from sae_pipeline.training.member import Member

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist = from_env("cpu")
    try:
        tcfg = OmegaConf.structured(TrainConfig(batch_size=16 * world, lr=1e-3, max_grad_norm=1e6))
        sae_cfg = CONFIG_CLASSES[arch](d_sae=24, **({"k": 4} if arch == "topk" else {}))
        x_BD = 3.0 * torch.randn(16 * world, 8, generator=torch.Generator().manual_seed(0)) + 1.0
        cpu = torch.device("cpu")

        def stepped(member, rows):
            member.train_step(rows, 0, 1e-3, 1.0, tcfg, nullcontext)
            return {name: p.grad.clone() for name, p in member.sae.named_parameters()}

        one = Member("", None, sae_cfg, 8, tcfg, cpu, 1.0, dist=None)
        many = Member("", None, sae_cfg, 8, tcfg, cpu, 1.0, dist=dist)
        g_one, g_many = stepped(one, x_BD), stepped(many, x_BD[dist.rows(x_BD.shape[0])])
        for name, g in g_one.items():
            err = float((g_many[name] - g).norm() / g.norm().clamp_min(1e-30))
            assert err <= 1e-5, (name, err)  # float reduction order only; a sum over ranks is off by 1
    except BaseException:
        tdist.destroy_process_group()  # no barrier: the other rank may never reach it
        raise
    leave(tdist)


def state_bytes(member) -> dict[str, int]:
    """Bytes of each parameter plus its Adam state (exp_avg, exp_avg_sq, step) held by this process."""
    out = {}
    for name, p in member.sae.named_parameters():
        state = member.opt.state.get(p, {})
        extra = sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
        out[name] = p.numel() * p.element_size() + extra
    return out


def latent_memory_worker(rank: int, world: int, port: int, shards: int, out_dir: str) -> None:
    """One rank of a `world`-process job with `shards` latent shards: builds a TopK member, takes one step,
    and writes the parameter + optimizer bytes it holds (and its dead-latent counters) to out_dir/rank.json."""
    import contextlib
    import json

    import torch.distributed as tdist
    from omegaconf import OmegaConf

    from sae_pipeline.sae import TopKConfig
    from sae_pipeline.schema.train import TrainConfig
    from sae_pipeline.training.distributed import from_env
    from sae_pipeline.training.latent_shards import ShardedMember, split

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    job = split(from_env("cpu"), shards)
    try:
        # a resume takes the oldest of the shards' newest intact checkpoints (each shard checks its own files)
        assert job.fewest(world - rank) == 1
        tcfg = OmegaConf.structured(TrainConfig(lr=1e-3, device="cpu", latent_shards=shards))
        cfg = TopKConfig(k=4, d_sae=64)
        member = ShardedMember("", Path(out_dir), cfg, 16, tcfg, torch.device("cpu"), 1.0, job)
        x_BD = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
        member.train_step(x_BD[job.rows(8)], 0, 1e-3, 1.0, tcfg, contextlib.nullcontext)
        record = {"bytes": state_bytes(member), "counters": member.stats.since_fired_F.numel()}
        (Path(out_dir) / f"{rank}.json").write_text(json.dumps(record))
    except BaseException:
        tdist.destroy_process_group()  # no barrier: the other rank may never reach it
        raise
    leave(tdist)
