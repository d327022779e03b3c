"""Rows of two activation stores matched by (context id, position): the same token seen at two hook points.

Two stores harvested in one pass (`hook.names=[a, b]`) hold the same contexts shard by shard, each shard's
rows shuffled on its own, so matching goes through the context ids and positions every shard carries.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from sae_pipeline.data.store import ActivationStore, row_keys
from sae_pipeline.errors import UserError
from sae_pipeline.integrity.shard import check_shard


def _load(store: ActivationStore, index: int) -> dict[str, torch.Tensor]:
    shard = store.shards[index]
    check_shard(shard.path, shard.sha256)
    return load_file(str(shard.path))


def aligned_rows(
    store_a: str | Path, store_b: str | Path, max_rows: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_a [N, d_a], x_b [N, d_b]) float32, row n of both from the same (context, position), in key order.

    Shards are read pairwise (shard i of each store) until max_rows matched rows are collected (0: all).
    """
    a, b = ActivationStore(store_a), ActivationStore(store_b)
    ctx = max(int(a.manifest.get("context_size", 1)), int(b.manifest.get("context_size", 1)))
    xs_a, xs_b, n = [], [], 0
    for i in range(min(len(a.shards), len(b.shards))):
        ta, tb = _load(a, i), _load(b, i)
        ka, kb = (row_keys(t["context_ids"], t["positions"], ctx) for t in (ta, tb))
        kb_sorted, order_b = kb.sort()
        ka_sorted, order_a = ka.sort()
        where = torch.searchsorted(kb_sorted, ka_sorted).clamp_max(max(0, len(kb_sorted) - 1))
        hit = (
            kb_sorted[where] == ka_sorted if len(kb_sorted) else torch.zeros_like(ka_sorted, dtype=torch.bool)
        )
        xs_a.append(ta["activations"][order_a[hit]].float())
        xs_b.append(tb["activations"][order_b[where[hit]]].float())
        n += int(hit.sum())
        if max_rows and n >= max_rows:
            break
    if n == 0:
        raise UserError(
            f"the stores {a.folder} and {b.folder} share no (context, position) rows; harvest both hook "
            "points in one sae-harvest run (hook.names=[...]) so their rows can be matched"
        )
    x_a, x_b = torch.cat(xs_a), torch.cat(xs_b)
    if max_rows:
        x_a, x_b = x_a[:max_rows], x_b[:max_rows]
    return x_a, x_b
