"""Latent-sharded training: SAEs wider than one device (`train.latent_shards=S`).

    torchrun --standalone --nproc_per_node=4 $(which sae-train) store=... sae=topk train.latent_shards=2

The P processes form a grid of P/S data-parallel replicas x S latent shards: global rank r is shard
r % S of replica r // S, so the S shards of one replica are adjacent ranks (one node's fast links carry
the per-step latent traffic; the data-parallel gradient all-reduce crosses replicas once per step).
Each rank holds F/S latents of every SAE (its W_enc columns, b_enc entries, W_dec rows, their Adam
moments and dead-latent counters; b_dec is replicated) and trains them with the collective step of
sae/sharded.py. `LatentShardedJob` narrows the data-parallel collectives (`Distributed`'s batch slice,
gradient mean, statistics) to the replicas of one shard, and adds the latent ones.

Beyond the step itself: the clipping norm sums the shards' squared gradient norms (b_dec counted once);
the logged L0 and dead / dense latent counts are summed over shards; each replica-0 rank writes its own
shard's checkpoints into <run>/latent_shards/shard-s-of-S/ (a resume uses the newest step every shard
has, and needs the same P and S); validation, loss recovered and the final save gather the shards into
one ordinary SAE on rank 0, so <run>/sae/ is what a one-process run writes.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as tdist

from sae_pipeline import layout
from sae_pipeline.errors import UserError
from sae_pipeline.sae import SAE_CLASSES, build_sae
from sae_pipeline.sae.sharded import LATENT_PARAMS, SHARDABLE, shard_module
from sae_pipeline.training import checkpoint
from sae_pipeline.training.distributed import Distributed
from sae_pipeline.training.member import Member
from sae_pipeline.training.stats import LatentStats

SUPPORTED = ", ".join(cls.config_class.arch for cls in SHARDABLE)


def check(specs, d_in: int, tcfg, processes: int, transcoder: bool) -> None:
    """Refuse, in one sentence, a latent sharding this job cannot run (before anything is written)."""
    n = tcfg.latent_shards
    if n < 1:
        raise UserError(
            f"train.latent_shards={n} must be a positive integer (1 = every rank holds every latent)"
        )
    if n == 1:
        return
    if transcoder:
        raise UserError(
            f"train.latent_shards={n} supports SAEs, not transcoders; train a transcoder with train.latent_shards=1"
        )
    if tcfg.resample_every > 0:
        raise UserError(
            f"train.latent_shards={n} does not resample dead latents; pass train.resample_every=0"
        )
    for name, cfg in specs:
        where = f"train.group member {name!r}: " if name else ""
        if SAE_CLASSES[cfg.arch] not in SHARDABLE:
            raise UserError(
                f"{where}train.latent_shards={n} supports sae.arch {SUPPORTED}, not {cfg.arch}; "
                f"train it with train.latent_shards=1"
            )
        width = cfg.resolve_d_sae(d_in)
        if width % n:
            raise UserError(
                f"{where}the dictionary width d_sae={width} does not split into train.latent_shards={n} equal "
                f"shards; choose sae.d_sae (or sae.expansion_factor) so that it is a multiple of {n}"
            )
    if processes % n:
        divisors = [d for d in range(1, processes + 1) if processes % d == 0]
        raise UserError(
            f"train.latent_shards={n} does not divide the {processes} processes of this job; start "
            f"torchrun with a multiple of {n} processes (--nproc_per_node={n} for latent shards alone) or use "
            f"train.latent_shards in {divisors}"
        )


def check_layout(old_record: dict, member_dir, tcfg, dist: Distributed) -> None:
    """A resume must keep the processes and latent shards its checkpoints were written with."""
    old_n = old_record.get("latent_shards", 1)
    old_p = old_record.get("processes", old_record.get("world_size", 1))
    if old_n != tcfg.latent_shards or (old_n > 1 and old_p != dist.processes):
        raise UserError(
            f"the run {member_dir} was trained by {old_p} processes with train.latent_shards={old_n} and this "
            f"resume has {dist.processes} with train.latent_shards={tcfg.latent_shards}; resume it with "
            f"torchrun --nproc_per_node={old_p} and train.latent_shards={old_n}"
        )


def split(dist: Distributed, n_shards: int) -> Distributed:
    """The job seen as replicas x latent shards (`dist` itself when every rank holds every latent)."""
    return dist if n_shards == 1 else LatentShardedJob(dist, n_shards)


class LatentShardedJob(Distributed):
    """rank / world_size / the collectives are those of this shard's data-parallel replicas; is_main,
    broadcast_object and barrier span every process; the latent collectives span one replica's shards."""

    def __init__(self, base: Distributed, n_shards: int):
        replicas = base.world_size // n_shards
        super().__init__(base.rank // n_shards, replicas, base.local_rank, base.device)
        self.global_rank, self._processes = base.rank, base.world_size
        self.shard, self.n_shards, self.data_size = base.rank % n_shards, n_shards, replicas
        self.root = self.shard  # global rank of replica 0's copy of this shard
        # every process creates every group, in the same order (torch.distributed requires it)
        for s in range(n_shards):
            group = tdist.new_group([d * n_shards + s for d in range(replicas)]) if replicas > 1 else None
            if s == self.shard:
                self.group = group
        for d in range(replicas):
            group = tdist.new_group([d * n_shards + s for s in range(n_shards)])
            if d == self.rank:
                self.latent_group = group

    @property
    def processes(self) -> int:
        return self._processes

    @property
    def is_main(self) -> bool:
        return self.global_rank == 0

    @property
    def saves_checkpoints(self) -> bool:
        return self.rank == 0  # replica 0's copy of each shard

    def broadcast_object(self, obj):
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        tdist.barrier()

    def fewest(self, n: int) -> int:
        """The smallest `n` over all processes (shards choose their newest intact checkpoint separately)."""
        t = torch.tensor([n], dtype=torch.int64, device=self.device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
        return int(t)

    def close(self) -> None:
        if tdist.is_initialized():
            tdist.destroy_process_group()

    # ---- the latent axis (sae/sharded.py's communicator) -----------------------------------------
    def gather_latent(self, t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(self.n_shards)]
        tdist.all_gather(parts, t.detach().contiguous(), group=self.latent_group)
        return torch.stack(parts)

    def sum_latent(self, t: torch.Tensor) -> torch.Tensor:
        out = t.detach().clone()
        tdist.all_reduce(out, op=tdist.ReduceOp.SUM, group=self.latent_group)
        return out

    def gather_world(self, t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(self._processes)]
        tdist.all_gather(parts, t.detach().contiguous())
        return torch.cat(parts)


@torch.no_grad()
def gather_sae(shard, job: LatentShardedJob):
    """The whole SAE on rank 0 (None elsewhere), from replica 0's shards; every rank of replica 0 calls it."""
    if job.rank != 0:
        return None
    state = {}
    for name, t in shard.state_dict().items():
        if name in LATENT_PARAMS:
            parts = [torch.empty_like(t) for _ in range(job.n_shards)] if job.is_main else None
            tdist.gather(t.contiguous(), parts, dst=0, group=job.latent_group)
            t = torch.cat(parts, dim=LATENT_PARAMS[name]) if job.is_main else None
        state[name] = t
    if not job.is_main:
        return None
    whole = build_sae(shard.cfg, shard.d_in, d_out=shard.d_out if shard.transcoder else None)
    whole.load_state_dict(state)
    return whole.to(state["b_dec_D"].device)


class ShardedLatentStats(LatentStats):
    """This shard's firing counters; the logged L0 and dead / dense counts are summed over shards."""

    def summary(self) -> dict:
        out = super().summary()
        keys = [k for k in ("l0", "dead_latents", "dense_latents") if k in out]
        local = torch.tensor(
            [float(out[k]) for k in keys], dtype=torch.float64, device=self.since_fired_F.device
        )
        for k, v in zip(keys, self.dist.sum_latent(local).tolist(), strict=True):
            out[k] = v if k == "l0" else int(round(v))
        return out


class ShardedMember(Member):
    """One SAE of a latent-sharded job: this rank's shard, its optimizer and counters."""

    min_keep = 2  # shards save one after another: two kept steps always leave one that every shard has

    def __init__(self, name, run_dir, sae_cfg, d_in, tcfg, device, input_scale, dist, target=None):
        self.job = dist
        super().__init__(name, run_dir, sae_cfg, d_in, tcfg, device, input_scale, dist, target)
        self.checkpoint_root = layout.latent_shard_dir(run_dir, dist.shard, dist.n_shards)
        self.stats = ShardedLatentStats(self.sae.d_local, self.dead_tokens, device, dist)

    def _place(self, sae):
        return shard_module(sae, self.job)

    def _clip(self, max_norm: float) -> torch.Tensor:
        """clip_grad_norm_ over the whole SAE: the shards' squared norms summed, b_dec's counted once."""
        device = self.sae.b_dec_D.device
        local, shared = torch.zeros((), device=device), torch.zeros((), device=device)
        for name, p in self.sae.named_parameters():
            if p.grad is not None:
                sq = p.grad.detach().float().pow(2).sum()
                local, shared = (local + sq, shared) if name in LATENT_PARAMS else (local, shared + sq)
        norm = (self.job.sum_latent(local) + shared).sqrt()
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in self.params:
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.dtype))
        return norm

    def checkpoints(self) -> dict:
        """{step name: this shard's checkpoint} for the steps every shard has completed."""
        roots = [
            layout.latent_shard_dir(self.run_dir, s, self.job.n_shards) for s in range(self.job.n_shards)
        ]
        common = set.intersection(*({p.name for p in checkpoint.list_checkpoints(r)} for r in roots))
        return {p.name: p for p in checkpoint.list_checkpoints(self.checkpoint_root) if p.name in common}

    def for_evaluation(self):
        """This member with the whole SAE, on rank 0 (None elsewhere); replica 0's ranks must all call it."""
        whole = gather_sae(self.sae, self.job)
        if whole is None:
            return None
        view = copy.copy(self)
        view.__class__, view.sae = Member, whole
        return view
