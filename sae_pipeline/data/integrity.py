"""Checksums of the activation store, checked wherever the store is read.

    write_manifest(folder, manifest)   # seals the manifest (sha256 of its own canonical JSON) and writes it
    check_manifest(manifest, path)     # the seal and the keys every later stage reads; one sentence if wrong
    ShardChecker.of(store).check(i)    # shard i's sha256, checked once per run the first time it is read

A damaged shard is named with what to do: rerunning the harvest command that wrote the store
rewrites only the damaged shards (harvest is deterministic, see StoreWriter).
"""

from __future__ import annotations

import threading
from pathlib import Path

from sae_pipeline import layout
from sae_pipeline.errors import UserError
from sae_pipeline.files import json_sha256, sha256_file, write_json_atomic

SEAL = "manifest_sha256"  # the manifest's checksum of itself (every other key, canonical JSON)
REPAIR = (
    "rerun the sae-harvest command that wrote the store (its settings are under 'config' in the "
    "manifest): it rewrites only the damaged shards"
)


def _canonical_sha256(obj: dict) -> str:
    return json_sha256(obj, SEAL)


def seal(manifest: dict) -> None:
    manifest[SEAL] = _canonical_sha256(manifest)


def write_manifest(folder: Path, manifest: dict) -> None:
    seal(manifest)
    write_json_atomic(Path(folder) / layout.MANIFEST, manifest)


def _inside(file: str) -> bool:
    rel = Path(file)
    return bool(file) and not rel.is_absolute() and ".." not in rel.parts


def check_manifest(manifest: object, path: Path) -> None:
    """The seal (when the manifest has one: stores written before it had none) and the keys read later."""
    if not isinstance(manifest, dict):
        raise UserError(f"the store manifest {path} is damaged: it holds no JSON object")
    if SEAL in manifest and manifest[SEAL] != _canonical_sha256(manifest):
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


def shard_problem(path: Path, sha256: str) -> str | None:
    """One sentence when the shard file is missing or differs from its recorded checksum, else None."""
    if not path.is_file():
        return f"the shard {path} listed in the manifest is missing; {REPAIR}"
    if sha256_file(path) != sha256:
        return f"the shard {path} is damaged (its sha256 does not match the manifest); {REPAIR}"
    return None


class ShardChecker:
    """Checks each shard of a store once, the first time it is read (from any thread)."""

    def __init__(self, store):
        self.store = store
        self._locks = [threading.Lock() for _ in store.shards]
        self._ok = [False] * len(store.shards)

    @classmethod
    def of(cls, store) -> ShardChecker:
        """The store's one checker: a reader reopened on the same store (a resume) does not hash again."""
        checker = getattr(store, "_shard_checker", None)
        if checker is None:
            checker = store._shard_checker = cls(store)
        return checker

    def check(self, index: int) -> None:
        if self._ok[index]:
            return
        with self._locks[index]:
            if self._ok[index]:
                return
            shard = self.store.shards[index]
            problem = shard_problem(shard.path, shard.sha256)
            if problem:
                raise UserError(problem)
            self._ok[index] = True
