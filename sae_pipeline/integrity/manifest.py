"""The store manifest's checksums: its seal, the keys every later stage reads, and the one manifest hash.

    write_manifest(folder, manifest)   # seals the manifest (sha256 of its own canonical JSON) and writes it
    check_manifest(manifest, path)     # the seal and the keys every later stage reads; one sentence if wrong
    store_sha256(manifest, following)  # what identifies a store: its seal, or of a growing store its header

A run folder records the store it trained on as `store_sha256` (a transcoder's target as
`target_store_sha256`); `store_matches_record` also reads the `store_manifest_sha256` that run folders
written before this one hash carried (another hash of the same manifest).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from sae_pipeline import layout
from sae_pipeline.errors import UserError
from sae_pipeline.files import write_json_atomic

from .seal import record_sha256, seal, seal_matches

SEAL = "manifest_sha256"  # the manifest's checksum of itself (every other key, canonical JSON)
REPAIR = (
    "rerun the sae-harvest command that wrote the store (its settings are under 'config' in the "
    "manifest): it rewrites only the damaged shards"
)
# manifest keys that change while a store is harvested (or consumed); the rest identifies the store
VOLATILE = ("shards", "n_tokens", "complete", "norm_stats", "throughput", "data_exhausted", SEAL)
VOLATILE += ("consumed", "consumers")


def manifest_sha256(manifest: dict) -> str:
    """The one manifest hash: sha256 of its canonical JSON, every key but the seal (what the seal holds)."""
    return record_sha256(manifest, SEAL)


def header_sha256(manifest: dict) -> str:
    """What identifies a store whatever its progress: the manifest hash of its settings, not its shards."""
    return manifest_sha256({k: v for k, v in manifest.items() if k not in VOLATILE})


def store_sha256(manifest: dict, following: bool = False) -> str:
    """A store's identity: its manifest hash, or its header's for a store read while it grows."""
    return header_sha256(manifest) if following else manifest_sha256(manifest)


def _recorded_before(manifest: dict, following: bool) -> str:
    """The `store_manifest_sha256` run folders recorded before store_sha256 (read only, never written)."""
    body = {k: v for k, v in manifest.items() if k not in VOLATILE} if following else manifest
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def store_record(role: str, manifest: dict, following: bool = False) -> dict:
    """What a run folder's config.json records of a store in `role` ("store", "target_store")."""
    return {f"{role}_sha256": store_sha256(manifest, following)}


def store_matches_record(record: dict, role: str, manifest: dict | None, following: bool = False) -> bool:
    """Whether the store a run folder recorded in `role` is this one (manifest None: it recorded none)."""
    key, before = f"{role}_sha256", f"{role}_manifest_sha256"
    if manifest is None:
        return key not in record and before not in record
    if key in record:
        return record[key] == store_sha256(manifest, following)
    return record.get(before) == _recorded_before(manifest, following)


def seal_manifest(manifest: dict) -> None:
    seal(manifest, SEAL)


def write_manifest(folder: Path, manifest: dict) -> None:
    seal_manifest(manifest)
    write_json_atomic(Path(folder) / layout.MANIFEST, manifest)


def _inside(file: str) -> bool:
    rel = Path(file)
    return bool(file) and not rel.is_absolute() and ".." not in rel.parts


def check_manifest(manifest: object, path: Path) -> None:
    """The seal (when the manifest has one: stores written before it had none) and the keys read later."""
    if not isinstance(manifest, dict):
        raise UserError(f"the store manifest {path} is damaged: it holds no JSON object")
    if not seal_matches(manifest, SEAL):
        raise UserError(
            f"the store manifest {path} is damaged: its content does not match its {SEAL}; "
            "rerun the sae-harvest command that wrote the store with harvest.overwrite=true"
        )
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise UserError(
            f"the store manifest {path} has no 'shards' list; it is damaged or not a store manifest"
        )
    for key, kind in (("d_in", int), ("dtype", str), ("hook", dict)):
        if not isinstance(manifest.get(key), kind):
            raise UserError(f"the store manifest {path} lacks a valid {key!r}; it is damaged")
    for i, shard in enumerate(shards):
        # a file inside the store: `shard-*.safetensors`, or `part-*/shard-*` in a merged sharded harvest
        ok = isinstance(shard, dict) and isinstance(shard.get("file"), str)
        if ok and not _inside(shard["file"]):
            raise UserError(
                f"the store manifest {path} names shard {i} as {shard['file']!r}, a file outside the store "
                "folder; it is damaged or was edited by hand"
            )
        ok = ok and isinstance(shard.get("n_rows"), int) and isinstance(shard.get("sha256"), str)
        if not ok:
            raise UserError(
                f"the store manifest {path} has a damaged entry for shard {i} (file, n_rows, sha256)"
            )
