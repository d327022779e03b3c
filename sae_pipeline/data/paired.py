"""The shuffled reader over two stores at once: each input row with the target row of the same token.

    reader = PairedReader(input_store, target_store, batch_size=4096, seed=0)
    xy_BC = reader.next_batch()         # [B, d_in + d_out]: x = xy[:, :d_in], y = xy[:, d_in:]

What a transcoder trains on. Two stores harvested in one pass (`hook.names=[a, b]`) hold the same
contexts shard by shard, shard i of both with the same rows; `ShuffledReader` plans chunks, windows and
the shuffle from the input store, and every chunk read here carries the target's rows for the same
(context id, position) beside the input's. Batch order, reader state (exact resume) and data-parallel row
slices are therefore those of `ShuffledReader` on the input store alone.

Matching: the first time a shard is read, both shards' context ids and positions are compared (a few
bytes per row next to the activations). A harvest shuffles a shard's rows with the seed and the shard's
index whatever the hook, so they are usually in the same order and chunks are read as contiguous slices
of both; otherwise the target's rows are gathered by key. A shard pair that holds different tokens is a
UserError naming both files.
"""

from __future__ import annotations

import numpy as np
import torch

from sae_pipeline.data.reader import _NP_DTYPES, _TORCH_VIEW, ShuffledReader, _Tensor, _tensor_index
from sae_pipeline.data.store import ActivationStore, row_keys
from sae_pipeline.errors import UserError
from sae_pipeline.integrity.shard import ShardChecker

# manifest entries that two stores of one harvest share
_SHARED = ("model", "context_size", "dataset")


def check_pair(store: ActivationStore, target: ActivationStore) -> None:
    """One sentence naming what differs when the two stores cannot come from one harvest."""
    where = f"train.target_store={target.folder} and store={store.folder}"
    for key in _SHARED:
        if store.manifest.get(key) != target.manifest.get(key):
            raise UserError(
                f"{where} differ in their manifests' {key!r}; harvest both hook points in one sae-harvest run "
                "(hook.names=[input,target]) so their rows hold the same tokens"
            )
    sizes = [s.n_rows for s in store.shards], [s.n_rows for s in target.shards]
    if sizes[0] != sizes[1]:
        raise UserError(
            f"{where} hold different rows (shard sizes {sizes[1][:4]}... vs {sizes[0][:4]}...); harvest both "
            "hook points in one sae-harvest run (hook.names=[input,target])"
        )


def _read_indexed(t: _Tensor, idx_N: torch.Tensor) -> torch.Tensor:
    """Rows idx of a shard tensor (any order) through a short-lived memory map."""
    try:
        mm = np.memmap(t.path, dtype=_NP_DTYPES[t.dtype], mode="r", offset=t.offset, shape=t.shape)
        out = torch.from_numpy(np.array(mm[idx_N.numpy()]))
        del mm
    except (OSError, ValueError) as err:
        raise UserError(f"the shard {t.path} could not be read ({err})") from None
    return out.view(_TORCH_VIEW[t.dtype]) if t.dtype in _TORCH_VIEW else out


def _keys(index: dict[str, _Tensor], path, context_size: int) -> torch.Tensor:
    if "context_ids" not in index or "positions" not in index:
        raise UserError(f"the shard {path} has no context_ids/positions, so its rows cannot be matched")
    ctx, pos = index["context_ids"], index["positions"]
    return row_keys(ctx.read_rows(0, ctx.shape[0]), pos.read_rows(0, pos.shape[0]), context_size)


class PairedReader(ShuffledReader):
    """`ShuffledReader` on `store` whose rows carry `target`'s row of the same token: [B, d_in + d_out]."""

    def __init__(self, store: ActivationStore, target: ActivationStore, batch_size: int, **kwargs):
        check_pair(store, target)
        self.target, self.d_out = target, target.d_in
        self._target_checker = ShardChecker.of(target)
        self._target_acts: list[_Tensor] = []
        for shard in target.shards:
            acts = _tensor_index(shard.path).get("activations")
            if acts is None or acts.shape != (shard.n_rows, target.d_in) or acts.dtype not in _NP_DTYPES:
                got = None if acts is None else (acts.dtype, acts.shape)
                raise UserError(
                    f"the shard {shard.path} has activations {got}, but the manifest says ({shard.n_rows}, {target.d_in})"
                )
            self._target_acts.append(acts)
        self._maps: dict[int, torch.Tensor | None] = {}  # shard -> target row of each input row (None: same)
        super().__init__(store, batch_size, **kwargs)

    def _map(self, shard: int) -> torch.Tensor | None:
        """Which target row holds each input row's token (None when both shards list them in one order)."""
        if shard not in self._maps:
            self._checker.check(shard)
            self._target_checker.check(shard)
            ctx = int(self.store.manifest.get("context_size", 1))
            a, b = self.store.shards[shard].path, self.target.shards[shard].path
            ka, kb = _keys(_tensor_index(a), a, ctx), _keys(_tensor_index(b), b, ctx)
            if torch.equal(ka, kb):
                self._maps[shard] = None
            else:
                kb_sorted, order_b = kb.sort()
                where = torch.searchsorted(kb_sorted, ka).clamp_max(max(0, len(kb) - 1))
                if len(kb) != len(ka) or not torch.equal(kb_sorted[where], ka):
                    raise UserError(
                        f"the shard {b} of train.target_store holds other (context, position) rows than {a}; "
                        "harvest both hook points in one sae-harvest run (hook.names=[input,target])"
                    )
                self._maps[shard] = order_b[where]
        return self._maps[shard]

    def _target_rows(self, shard: int, start: int, stop: int) -> torch.Tensor:
        m = self._map(shard)
        t = self._target_acts[shard]
        return t.read_rows(start, stop) if m is None else _read_indexed(t, m[start:stop])

    def _read_chunk(self, c) -> torch.Tensor:
        self._map(c.shard)  # checks both shards' checksums and matches their rows
        x = self._acts[c.shard].read_rows(c.start, c.stop).float()
        rows = torch.cat([x, self._target_rows(c.shard, c.start, c.stop).float()], dim=1)
        if c.shard == len(self._acts) - 1 and self._val_mask is not None:
            rows = rows[~self._val_mask[c.start : c.stop]]
        return rows

    def _window_rows(self, chunks, buffers=None) -> tuple[torch.Tensor, None]:
        """Paired rows are joined (and made float32) on the host, into a new tensor (`buffers` unused): the two
        stores' dtypes may differ."""
        return torch.cat([self._read_chunk(c) for c in chunks]), None

    def validation_rows(self) -> torch.Tensor:
        """The held-out rows [N, d_in + d_out] (float32), never returned by `next_batch`."""
        if self._val_mask is None:
            return torch.empty(0, self.store.d_in + self.d_out)
        last, mask, out = len(self._acts) - 1, self._val_mask, []
        for start in range(0, mask.shape[0], 8192):
            stop = min(start + 8192, mask.shape[0])
            if mask[start:stop].any():
                x = self._acts[last].read_rows(start, stop).float()
                rows = torch.cat([x, self._target_rows(last, start, stop).float()], dim=1)
                out.append(rows[mask[start:stop]])
        return torch.cat(out)
