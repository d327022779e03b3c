"""Batch-wide quantities of a training step when the batch is split over data-parallel ranks.

An SAE's `collective` attribute is None in one process; the trainer sets it to the job's
`training.distributed.Distributed` (any object with `world_size`, `all_reduce_sum`, `all_gather_cat`)
when N ranks each hold an equal slice of the global batch. These helpers then return what one process
would compute on the whole batch.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _active(coll) -> bool:
    return coll is not None and coll.world_size > 1


@torch.no_grad()
def centered_sq_sum(coll, r_BD: Tensor) -> Tensor:
    """sum_b ||r_b - mean(r)||^2 over the global batch, divided by the number of ranks.

    Dividing a rank's own sum of squared errors by this gives N times its share of the global ratio, so
    the mean of that over ranks (what averaged gradients see) is the one-process value."""
    if not _active(coll):
        return (r_BD - r_BD.mean(0)).pow(2).sum()
    n_rows = r_BD.shape[0] * coll.world_size
    mean_D = coll.all_reduce_sum(r_BD.sum(0)) / n_rows
    return coll.all_reduce_sum((r_BD - mean_D).pow(2).sum()) / coll.world_size


@torch.no_grad()
def kth_largest(coll, pre_BF: Tensor, n_keep_local: int) -> Tensor:
    """The (n_keep_local * N)-th largest entry of the global batch's pre-activations (N ranks).

    Each rank contributes its own largest min(n_keep, numel) entries, which contain every entry of the
    global top n_keep; the threshold is the smallest of the top n_keep of their union."""
    flat = pre_BF.reshape(-1)
    if not _active(coll):
        return flat.topk(n_keep_local, sorted=False).values.min()
    n_keep = n_keep_local * coll.world_size
    local = flat.topk(min(n_keep, flat.numel()), sorted=False).values
    return coll.all_gather_cat(local).topk(n_keep, sorted=False).values.min()
