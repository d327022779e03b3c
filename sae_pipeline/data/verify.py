"""Whole-store verification: the manifest's seal and keys, then every shard's sha256."""

from __future__ import annotations

from pathlib import Path

from sae_pipeline.data.integrity import shard_problem
from sae_pipeline.data.remote import RemoteStore, is_url
from sae_pipeline.data.store import read_manifest
from sae_pipeline.errors import UserError


def verify_store(folder: Path) -> tuple[int, list[str]]:
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
