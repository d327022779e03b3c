"""Bounded disk (`sae-harvest harvest.keep_shards=N`): who reads a store, how far, and which shards may go.

    <store>/consumers/<id>.json   {"id", "run", "next_shard", "keep", "done"}   (one small file per consumer)

A consumer (a streamed training run; each rank of a data-parallel one) registers when its reader opens
the store and records, after every checkpoint, the first shard a resume from that checkpoint would read
(`next_shard`) and the shards it keeps for good (`keep`: shard 0, where its validation rows and its
initial sample come from). The harvest (the only writer of the manifest) deletes a shard's file once
every registered consumer has passed it and none keeps it, and marks its manifest entry consumed: the
entry keeps its row count and sha256 and says which consumer passed it last. It writes shard i only while
fewer than N written shards remain on disk, so the store holds at most N shards (plus the `.tmp` file
being written). It deletes nothing before `harvest.consumers` consumers have registered, so consumers
started a little after the harvest are not refused.

A consumer that needs a deleted shard (one registering late, a resume from an older checkpoint) is
refused in one sentence naming the shard and the consumer that passed it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from sae_pipeline.errors import UserError
from sae_pipeline.files import write_json_atomic

FOLDER = "consumers"
DONE = 1 << 62  # next_shard of a consumer that has finished reading


def _remote(place) -> bool:
    return hasattr(place, "put_json")  # a data.remote.RemoteStore; else a local store folder


def _read(place, name: str):
    if _remote(place):
        return place.read_json(f"{FOLDER}/{name}")
    return json.loads((Path(place) / FOLDER / name).read_text())


def read_consumers(place) -> list[dict]:
    """Every registered consumer's record; `place` is a store folder or a RemoteStore."""
    out = []
    names = place.list(FOLDER) if _remote(place) else [p.name for p in (Path(place) / FOLDER).glob("*.json")]
    for name in sorted(n for n in names if n.endswith(".json")):
        try:
            rec = _read(place, name)
        except (OSError, ValueError):
            continue  # being replaced (atomic rename) or damaged: treated as not registered yet
        if isinstance(rec, dict) and isinstance(rec.get("next_shard"), int):
            out.append(rec)
    return out


def deleted_shard(manifest: dict, needed) -> dict | None:
    """The manifest entry (with its index) of the first shard in `needed` whose file was deleted, or None."""
    shards = manifest["shards"]
    for i in needed:
        if i < len(shards) and shards[i].get("consumed"):
            return {"index": i, **shards[i]}
    return None


def register(store, manifest: dict, consumer: str, run: str, first_shard: int) -> None:
    """Register (or re-register on resume) a consumer that will read shard 0 and shards first_shard on."""
    gone = deleted_shard(manifest, [0, *range(first_shard, len(manifest["shards"]))])
    if gone is not None:
        raise UserError(
            f"the shard {gone['file']} of the store {store} was deleted after consumer {gone.get('consumed_by')} "
            f"read it (harvest.keep_shards), but this run (consumer {consumer}) still needs it; register every "
            "consumer before the harvest deletes shards (harvest.consumers) or harvest the store again"
        )
    progress(store, consumer, run, first_shard)


def progress(place, consumer: str, run: str, next_shard: int, done: bool = False) -> None:
    rec = {"id": consumer, "run": run, "next_shard": DONE if done else int(next_shard)}
    rec.update(keep=[] if done else [0], done=done)
    if _remote(place):
        place.put_json(f"{FOLDER}/{consumer}.json", rec)
        return
    path = Path(place) / FOLDER / f"{consumer}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, rec)


class ShardKeeper:
    """The harvest's side: before writing shard `index`, delete passed shards and wait for room."""

    def __init__(self, keep_shards: int, consumers: int, poll_s: float = 0.2):
        self.keep, self.min_consumers, self.poll_s = int(keep_shards), int(consumers), poll_s

    def _collect(self, writer) -> int:
        """Delete the files of shards every registered consumer has passed; returns shards still on disk."""
        manifest = writer.manifest
        consumers = read_consumers(writer.place)
        changed = False
        if len(consumers) >= self.min_consumers:
            for i, shard in enumerate(manifest["shards"]):
                if shard.get("consumed"):
                    continue
                if all(i < c["next_shard"] and i not in c.get("keep", []) for c in consumers):
                    writer.delete_shard(shard["file"])
                    slowest = min(consumers, key=lambda c: (c["next_shard"], c["id"]))
                    shard.update(consumed=True, consumed_by=slowest["id"])
                    changed = True
        if changed:
            writer.save_manifest()
        return sum(not s.get("consumed") for s in manifest["shards"])

    def make_room(self, writer) -> None:
        waited, last = None, 0.0
        while (on_disk := self._collect(writer)) >= self.keep:
            now = time.monotonic()
            waited = waited or now
            if now - last >= 10.0:
                consumers = read_consumers(writer.place)
                slow = min((c["next_shard"] for c in consumers), default=None)
                who = (
                    f"the slowest consumer is at shard {slow}"
                    if consumers
                    else "no consumer has registered yet"
                )
                print(
                    f"harvest paused: {on_disk} shards written and not consumed (harvest.keep_shards="
                    f"{self.keep}); {who}: {now - waited:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
                last = now
            time.sleep(self.poll_s)
