"""Whole stores, and every store, checkpoint and final SAE under a folder (what sae-verify checks).

    checked, problems = verify_store(folder_or_url)   # the manifest's seal and keys, then every shard
    checked, problems = verify_tree(Path("runs"))     # one sentence per damaged file

A store is a folder with manifest.json (the manifest's seal, then every shard's sha256), a
checkpoint a checkpoints/step-*/ folder (state.json's seal, both safetensors files, finite
values), a final SAE an sae/ folder (its weights' sha256 in its config.json).
"""

from __future__ import annotations

from pathlib import Path

from sae_pipeline import layout
from sae_pipeline.data.remote import RemoteStore, is_url
from sae_pipeline.data.store import read_manifest
from sae_pipeline.errors import UserError
from sae_pipeline.sae import read_sae
from sae_pipeline.training.checkpoint import list_checkpoints

from .checkpoint import checkpoint_problem
from .shard import shard_problem


def verify_store(folder: Path | str) -> tuple[int, list[str]]:
    """(files checked, one sentence per problem) for the store in folder (or at an fsspec URL)."""
    try:
        manifest = read_manifest(folder)
    except UserError as err:
        return 1, [str(err)]
    listed = [s for s in manifest["shards"] if not s.get("consumed")]  # a bounded harvest deleted the rest
    if is_url(folder):
        where = RemoteStore(str(folder))
        problems = [where.problem(s["file"], s["sha256"]) for s in listed]
    else:
        problems = [shard_problem(Path(folder) / s["file"], s["sha256"]) for s in listed]
    if not manifest.get("complete"):
        problems.append(f"the store {folder} is incomplete; rerun the sae-harvest command that wrote it")
    return 1 + len(manifest["shards"]), [p for p in problems if p]


def verify_tree(path: Path) -> tuple[int, list[str]]:
    """(files checked, one sentence per problem) for every store, checkpoint and final SAE under path."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"path={path} does not exist")
    checked, problems = 0, []
    for manifest in sorted(path.rglob(layout.MANIFEST)):
        n, found = verify_store(manifest.parent)
        checked, problems = checked + n, problems + found
    for folder in sorted(path.rglob(layout.CHECKPOINTS)):
        for ckpt in list_checkpoints(folder.parent):
            checked += 1
            why = checkpoint_problem(ckpt)
            if why:
                problems.append(f"the checkpoint {ckpt} is damaged: {why}")
    for weights in sorted(path.rglob(f"{layout.FINAL_SAE}/{layout.SAE_WEIGHTS}")):
        checked += 1
        try:
            read_sae(weights.parent)
        except UserError as err:
            problems.append(str(err))
    if checked == 0:
        raise UserError(f"path={path} holds no activation store, checkpoint or SAE to verify")
    return checked, problems
