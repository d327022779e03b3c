"""Transcoders in training: the target store beside the input store, its scale, and what a run records.

    sae-train store=<input hook's store> train.target_store=<target hook's store> sae=topk [sae.skip=true]

The reader is `data.paired.PairedReader` (batches [B, d_in + d_out]); each member splits them, trains
on (x * s_in, y * s_out) with s_out the target store's own normalisation, and folds both scales at the
end (`SAE.fold_input_scale(s_in, s_out)`), so the saved transcoder maps raw x to raw y.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from sae_pipeline import layout
from sae_pipeline.data.paired import PairedReader, check_pair
from sae_pipeline.data.reader import ShuffledReader
from sae_pipeline.data.store import ActivationStore
from sae_pipeline.errors import UserError
from sae_pipeline.integrity.manifest import store_matches_record, store_record


def open_target(tcfg, store: ActivationStore) -> ActivationStore | None:
    """The target store of a transcoder run (checked against the input store), or None for an SAE."""
    if not tcfg.target_store:
        return None
    target = ActivationStore(Path(tcfg.target_store).expanduser())
    check_pair(store, target)
    return target


def open_reader(store: ActivationStore, target: ActivationStore | None, batch_size: int, **kwargs):
    """The shuffled reader of an SAE run, or its paired form (input and target rows) for a transcoder."""
    if target is None:
        return ShuffledReader(store, batch_size, **kwargs)
    return PairedReader(store, target, batch_size, **kwargs)


@dataclass
class TranscoderTarget:
    """One member's target: the store and the factor its rows are trained at (y * scale)."""

    store: ActivationStore
    scale: float

    @property
    def d_out(self) -> int:
        return self.store.d_in

    def split_scaled(self, xy_BC: torch.Tensor, d_in: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(x [B, d_in], y * scale [B, d_out], scale) of a paired batch."""
        x_BD, y_BD = xy_BC[:, :d_in].contiguous(), xy_BC[:, d_in:].contiguous()
        return x_BD, (y_BD * self.scale if self.scale != 1.0 else y_BD), self.scale

    def record(self) -> dict:
        """What config.json and the final sae/ folder say about the target."""
        return {
            "d_out": self.d_out,
            "target_store": str(self.store.folder.resolve()),
            **store_record("target_store", self.store.manifest, self.store.following),
            "target_hook": self.store.hook_name,
            "target_scale": self.scale,
        }


def check_target_resumable(member_dir: Path, target: TranscoderTarget | None) -> None:
    """A resume trains toward the same target store it started with (or none, as it started)."""
    old = json.loads((member_dir / layout.CONFIG).read_text())
    store = target.store if target is not None else None
    if not store_matches_record(
        old, "target_store", store and store.manifest, bool(store and store.following)
    ):
        said = f"the target store {old['target_store']}" if old.get("target_store") else "no target store"
        raise UserError(
            f"the run {member_dir} was started with {said}; resume it with the same train.target_store"
        )
