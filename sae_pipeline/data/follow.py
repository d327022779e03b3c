"""Following a store that is still being harvested: the shards it lists, waited for in order.

    follower = StoreFollower(source, wait_s=3600)
    shards = follower.shards_upto(8)   # the first 8 listed shards, or all of them once the store is complete
                                      # (blocks, printing "waiting for shard 00005 ..." while it waits)

A shard appears in the manifest only after its file is complete (the harvest writes the file, then
the manifest), so whatever the manifest lists can be read. What a follower returns depends only on
the manifest's contents, never on when it looked: `shards_upto(n)` returns n shards, or fewer only
when the manifest says the store is complete. The reader built on it (data/stream.py) therefore reads
the same rows in the same order whether the harvest runs ahead of training or behind it.
"""

from __future__ import annotations

import sys
import time

from sae_pipeline.data.source import ShardEntry, StoreSource
from sae_pipeline.errors import UserError

POLL_S = 0.2  # how often the manifest is re-read while waiting
REPORT_S = 10.0  # how often a waiting reader says so


class StoreFollower:
    def __init__(self, source: StoreSource, wait_s: float = 3600.0, poll_s: float = POLL_S):
        self.source, self.wait_s, self.poll_s = source, float(wait_s), float(poll_s)
        self.manifest = source.read_manifest()
        self.header_sha256 = source.header_sha256(self.manifest)
        self.waiting = False  # True while shards_upto waits for the harvest

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def entries(self) -> list[ShardEntry]:
        return self.source.entries(self.manifest)

    def refresh(self) -> None:
        manifest = self.source.read_manifest()
        if self.source.header_sha256(manifest) != self.header_sha256:
            raise UserError(
                f"the store {self.source} was replaced by a harvest with other settings while it was being "
                "read; rerun sae-train on the new store with train.overwrite=true"
            )
        self.manifest = manifest

    def shards_upto(self, n: int) -> list[ShardEntry]:
        """The first `n` shards, waiting for the harvest to list them; fewer only when the store is complete."""
        try:
            return self._wait_for(n)
        finally:
            self.waiting = False

    def _wait_for(self, n: int) -> list[ShardEntry]:
        waited_since, last_report = None, 0.0
        while True:
            listed = self.entries()
            if len(listed) >= n or self.complete:
                if waited_since is not None:
                    took = time.monotonic() - waited_since
                    print(f"shard {n - 1:05d} of {self.source} arrived after {took:.1f} s", file=sys.stderr)
                return listed[:n]
            now = time.monotonic()
            if waited_since is None:
                waited_since, self.waiting = now, True
            if now - last_report >= REPORT_S:
                print(
                    f"waiting for shard {len(listed):05d} of {self.source} (the harvest has listed "
                    f"{len(listed)} so far): {now - waited_since:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
                last_report = now
            if now - waited_since > self.wait_s:
                raise UserError(
                    f"no new shard arrived in the store {self.source} for {self.wait_s:g} s (train.advanced.stream_wait_s) "
                    f"after {len(listed)} shards and the store is not complete; is its sae-harvest still running?"
                )
            self._nap()
            self.refresh()

    def _nap(self) -> None:
        """Sleep between two looks at the manifest (tests hook in here to know the reader waits)."""
        time.sleep(self.poll_s)
