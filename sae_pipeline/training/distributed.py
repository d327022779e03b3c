"""Data-parallel training: the process group, its collectives, and which rank does what.

    torchrun --standalone --nproc_per_node=2 $(which sae-train) store=... train.run_dir=runs/train/x

`from_env()` reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT, or, when
srun / submitit start the tasks without torchrun, SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID (with
MASTER_ADDR from the environment or SLURM_LAUNCH_NODE_IPADDR, MASTER_PORT default 29500). With no
such variables (or a world of one) it returns a single-process `Distributed` whose collectives are
no-ops, so the trainer has one code path. Backend: NCCL when the device is CUDA (rank r uses
cuda:LOCAL_RANK), gloo on the CPU.

Exactness: `train.batch_size` is the global batch. Every rank runs the same seeded reader and keeps
rows [r*B/N, (r+1)*B/N) of every global batch (`rows`). Each rank therefore reads (and shuffles)
the whole stream and drops (N-1)/N of it: N times the disk reads of one process, which is cheap next
to the SAE's matmuls at the sizes trained here, and it makes the batches, the reader position in a
checkpoint and the data order identical to a one-process run by construction. The losses are means
over rows, so with equal slices the mean of the ranks' gradients is the global batch's gradient;
everything else that spans the batch (dead-latent counters, logged means, BatchTopK's threshold,
AuxK's normaliser, the clipping norm) is reduced explicitly. N ranks thus train the SAE one process
trains, up to the order of float additions.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as tdist

from sae_pipeline.errors import UserError
from sae_pipeline.runtime import resolve_device


class Distributed:
    """The ranks of one training job (world_size 1: everything is a no-op)."""

    # the process group the collectives below span (None: every process) and the global rank of its first
    # member; training/latent_shards.py narrows them to one data-parallel axis of a latent-sharded job
    group = None
    root = 0

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, device=None):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device = device

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this rank writes files, logs and W&B (rank 0)."""
        return self.rank == 0

    @property
    def processes(self) -> int:
        """How many processes the whole job has (world_size, unless training/latent_shards.py narrows it)."""
        return self.world_size

    @property
    def saves_checkpoints(self) -> bool:
        """Whether this rank writes its members' checkpoints (rank 0; one rank per shard when latent-sharded)."""
        return self.is_main

    def __deepcopy__(self, memo):  # SAEs hold a reference; copying one must not copy the group
        return self

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.world_size:
            raise UserError(
                f"train.batch_size={batch_size} must be divisible by the number of processes ({self.world_size}), "
                "since it is the global batch split equally between ranks"
            )

    def rows(self, batch_size: int) -> slice:
        """This rank's contiguous part of a global batch of `batch_size` rows."""
        per = batch_size // self.world_size
        return slice(self.rank * per, (self.rank + 1) * per)

    # ---- collectives (identity with one process) -------------------------------------------------
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of `t` over ranks (a new tensor; `t` is left alone)."""
        if not self.active:
            return t
        out = t.detach().clone()
        tdist.all_reduce(out, op=tdist.ReduceOp.SUM, group=self.group)
        return out

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's `t` (same shape on each) concatenated along dim 0, rank 0 first."""
        if not self.active:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        tdist.all_gather(parts, t.detach().contiguous(), group=self.group)
        return torch.cat(parts)

    def average_grads(self, params: list[torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
        """Replace each gradient by its mean over ranks (one all-reduce); returns the ranks' mean loss.

        A parameter without a gradient gets zeros (the SAEs here give every parameter a gradient)."""
        if not self.active:
            return loss
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1).float() for p in params] + [loss.detach().float().reshape(1)])
        tdist.all_reduce(flat, op=tdist.ReduceOp.SUM, group=self.group)
        flat /= self.world_size
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n
        return flat[-1]

    @torch.no_grad()
    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Make every rank's parameters and buffers equal to rank 0's (the group's first rank's)."""
        if not self.active:
            return
        for t in module.state_dict().values():
            tdist.broadcast(t, src=self.root, group=self.group)

    def fewest(self, n: int) -> int:
        """The smallest `n` of all processes (every rank here sees the same files, so its own)."""
        return n

    def broadcast_object(self, obj):
        """Rank 0's `obj` (picklable) on every rank."""
        if not self.active:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn):
        """fn() on rank 0 alone (None elsewhere); a UserError there is raised on every rank, so a
        refusal (a busy run folder, a run that exists) never leaves the other ranks in a collective."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except UserError as err:
                error = str(err)
        error = self.broadcast_object(error)
        if error is not None:
            raise UserError(error)
        return result

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()

    def close(self) -> None:
        if self.active and tdist.is_initialized():
            tdist.destroy_process_group()


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def from_env(device_name: str = "auto") -> Distributed:
    """The job this process belongs to, from torchrun's or SLURM's variables; joins its process group."""
    world, rank, local = _env_int("WORLD_SIZE"), _env_int("RANK"), _env_int("LOCAL_RANK")
    if world is None and _env_int("SLURM_PROCID") is not None:  # srun / submitit without torchrun
        world, rank, local = _env_int("SLURM_NTASKS"), _env_int("SLURM_PROCID"), _env_int("SLURM_LOCALID")
        os.environ.setdefault("MASTER_ADDR", os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ["WORLD_SIZE"], os.environ["RANK"] = str(world), str(rank)
    device = resolve_device(device_name)
    if not world or world <= 1:
        return Distributed(device=device)
    rank, local = rank or 0, local or 0
    if device.type == "cuda":
        if device.index is not None and device.index != 0:
            raise UserError(
                f"train.device={device_name} names one GPU, but each of the {world} processes uses cuda:LOCAL_RANK; "
                "pass train.device=auto or cuda"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not tdist.is_initialized():
        tdist.init_process_group(
            backend, init_method="env://", rank=rank, world_size=world, timeout=datetime.timedelta(minutes=30)
        )
    return Distributed(rank, world, local, device)
