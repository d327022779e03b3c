"""A shard's sha256 against its manifest, checked wherever a shard is read.

    shard_problem(path, sha256)         # one sentence when the file is missing or damaged, else None
    ShardChecker.of(store).check(i)     # shard i's sha256, checked once per run the first time it is read

A damaged shard is named with what to do: rerunning the harvest command that wrote the store
rewrites only the damaged shards (harvest is deterministic, see StoreWriter).
"""

from __future__ import annotations

import threading
from pathlib import Path

from sae_pipeline.errors import UserError
from sae_pipeline.files import sha256_file

from .manifest import REPAIR


def missing(where) -> str:
    return f"the shard {where} listed in the manifest is missing; {REPAIR}"


def damaged(where) -> str:
    return f"the shard {where} is damaged (its sha256 does not match the manifest); {REPAIR}"


def shard_problem(path: Path, sha256: str) -> str | None:
    """One sentence when the shard file is missing or differs from its recorded checksum, else None."""
    if not path.is_file():
        return missing(path)
    if sha256_file(path) != sha256:
        return damaged(path)
    return None


def check_shard(path: Path, sha256: str) -> None:
    problem = shard_problem(path, sha256)
    if problem:
        raise UserError(problem)


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
            check_shard(shard.path, shard.sha256)
            self._ok[index] = True
