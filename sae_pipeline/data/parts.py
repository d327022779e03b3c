"""A harvest split into parts (processes under torchrun, SLURM array tasks): who writes which shard, merging.

The contexts of a harvest are numbered in packing order and cut into shards of `contexts_per_shard`
contexts (whole forward batches): shard k holds contexts [k * cps, (k + 1) * cps). Part i of N writes
shards i, i + N, i + 2N, ... into its own folder `<store>/part-00i-of-00N/` with its own manifest, so a
killed part resumes alone. Every part packs the same text in the same order and runs the model on the
same batches a one-process harvest would, and a shard's rows are shuffled with the seed and its global
index, so each shard file is byte for byte the one a one-process harvest writes.

When every part is complete, the last one to finish (or `sae-harvest harvest.merge=true`) writes
`<store>/manifest.json`: every shard in global order, its file relative to the store, its checksum, and
`"parts": N`. Readers see one ordinary store.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from sae_pipeline import layout, locks
from sae_pipeline.data.store import StoreWriter, norm_summary, read_manifest
from sae_pipeline.errors import UserError
from sae_pipeline.integrity.manifest import write_manifest


def resolve_part(h) -> tuple[int, int]:
    """(part, parts) from `harvest.part/parts`, or from torchrun's RANK / WORLD_SIZE when it set them."""
    part, parts = int(h.part), int(h.parts)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return part, parts
    if part != 0 or parts not in (1, world):
        raise UserError(
            f"harvest.part={part} harvest.parts={parts} disagree with torchrun's WORLD_SIZE={world}; "
            "under torchrun leave both keys out (each rank harvests part RANK of WORLD_SIZE)"
        )
    return int(os.environ["RANK"]), world


def part_device(name: str) -> str:
    """`auto` under torchrun on a GPU machine means this rank's own GPU (LOCAL_RANK)."""
    local = os.environ.get("LOCAL_RANK")
    if name == "auto" and local is not None and torch.cuda.is_available():
        return f"cuda:{int(local) % torch.cuda.device_count()}"
    return name


@dataclass(frozen=True)
class ShardSpan:
    index: int  # global shard index (its file name and its shuffle seed)
    first_context: int
    n_contexts: int


def shard_plan(n_contexts: int, contexts_per_shard: int, part: int, parts: int) -> list[ShardSpan]:
    """The shards part `part` of `parts` writes, in order (round robin over the global shards)."""
    n_shards = -(-n_contexts // contexts_per_shard)
    return [
        ShardSpan(k, k * contexts_per_shard, min(contexts_per_shard, n_contexts - k * contexts_per_shard))
        for k in range(part, n_shards, parts)
    ]


class ContextCursor:
    """Walks the packed contexts once; `batches` skips to a shard's first context and yields its batches."""

    def __init__(self, contexts: Iterator[torch.Tensor]):
        self._contexts = contexts
        self.position = 0  # global index of the next context
        self.exhausted = False

    def _next(self) -> torch.Tensor | None:
        ctx = next(self._contexts, None)
        if ctx is None:
            self.exhausted = True
        else:
            self.position += 1
        return ctx

    def batches(self, span: ShardSpan, batch_size: int) -> Iterator[torch.Tensor]:
        """[n, T] batches of the span's contexts; fewer contexts when the text runs out."""
        if self.position > span.first_context:
            raise RuntimeError(f"shard {span.index} starts at context {span.first_context}, already passed")
        while self.position < span.first_context:
            if self._next() is None:
                return
        end = span.first_context + span.n_contexts
        while self.position < end:
            batch = []
            while len(batch) < batch_size and self.position < end:
                ctx = self._next()
                if ctx is None:
                    break
                batch.append(ctx)
            if batch:
                yield torch.stack(batch)
            if self.exhausted:
                return


def kill_self() -> None:
    """What `harvest.advanced.stop_after_shards` does: die like a killed process (no clean-up, no finally)."""
    print("harvest.advanced.stop_after_shards reached: killing this process", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------------------------
# The store folder of a part, and the merge
# --------------------------------------------------------------------------------------------


def _is_own_part_dir(path: Path, store: Path, parts: int) -> bool:
    return any(path == layout.part_dir(store, j, parts) for j in range(parts))


def _clear_stale(store: Path, parts: int) -> None:
    """Remove what an earlier store left in the folder, except the part folders of this split."""
    for entry in list(store.iterdir()):
        if _is_own_part_dir(entry, store, parts) or locks.is_lock_file(entry):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)  # another part may be removing it too
        else:
            entry.unlink(missing_ok=True)


def open_part_writer(
    store: Path, header: dict, fingerprint: str, overwrite: bool, part: int, parts: int
) -> StoreWriter | None:
    """The writer of this part's folder, or None when the store is already complete with these settings."""
    store = Path(store)
    if (store / layout.MANIFEST).exists():
        old = read_manifest(store)
        same = old.get("fingerprint") == fingerprint
        if same and old.get("complete") and not overwrite:
            return None
        if not overwrite:
            what = "different settings" if not same else "an unfinished one-process harvest"
            raise UserError(
                f"the store {store} already exists with {what}; "
                "pass harvest.overwrite=true to replace it or choose another harvest.out_dir"
            )
        _clear_stale(store, parts)
    elif store.exists() and any(
        not (_is_own_part_dir(e, store, parts) or locks.is_lock_file(e)) for e in store.iterdir()
    ):
        if not overwrite:
            raise UserError(
                f"the folder {store} holds files that are not parts of a {parts}-part harvest; "
                "pass harvest.overwrite=true to replace them or choose another harvest.out_dir"
            )
        _clear_stale(store, parts)
    header = {**header, "part": part, "parts": parts}
    folder = layout.part_dir(store, part, parts)
    return StoreWriter(folder, header, fingerprint, overwrite, part=part, parts=parts)


def lock_store(store: Path, part: int, parts: int) -> locks.FolderLock:
    """The lock of the folder this harvest writes: the store itself, or this part's folder in it.

    A one-process harvest and the parts of a split one exclude each other too: each takes its own
    lock first and then looks at the other kind's (parts at the store's, a one-process harvest at
    every part folder's), so of two that start at once at least one sees the other."""
    store = Path(store)
    hint = "choose another harvest.out_dir"
    if parts == 1:
        lock = locks.hold(store, "the store", hint)
        others = sorted(store.glob("part-*-of-*"))
    else:
        lock = locks.hold(layout.part_dir(store, part, parts), f"part {part} of {parts} of the store", hint)
        others = [store]
    for folder in others:
        holder = locks.holder(folder)
        if holder is not None:
            lock.release()
            raise locks.FolderLock(folder, "the store" if folder == store else "the part", hint).busy(holder)
    return lock


def _part_manifests(store: Path, parts: int, fingerprint: str) -> tuple[list[dict], list[tuple[int, str]]]:
    """The manifests of the complete parts, and (part, what is wrong) for each part that is not ready."""
    manifests, missing = [], []
    for j in range(parts):
        folder = layout.part_dir(store, j, parts)
        if not (folder / layout.MANIFEST).exists():
            missing.append((j, f"part {j} of {parts} is missing ({folder / layout.MANIFEST} does not exist)"))
            continue
        manifest = read_manifest(folder)
        if manifest.get("fingerprint") != fingerprint:
            missing.append((j, f"part {j} of {parts} ({folder}) was harvested with different settings"))
        elif not manifest.get("complete"):
            n = len(manifest["shards"])
            missing.append((j, f"part {j} of {parts} is incomplete ({n} shards in {folder})"))
        else:
            manifests.append(manifest)
    return manifests, missing


def _merged_throughput(manifests: list[dict]) -> dict:
    per_part = [m.get("throughput", {}) for m in manifests]
    tokens = sum(t.get("tokens", 0) for t in per_part)
    wall = max((t.get("wall_s", 0.0) for t in per_part), default=0.0)
    return {
        "tokens": tokens,
        "wall_s": wall,  # the slowest part; parts run at the same time
        "tokens_per_s": round(tokens / wall, 1) if wall > 0 else None,
        "parts": per_part,
    }


def merge(store: Path, parts: int, fingerprint: str) -> dict:
    """Write the store manifest from every complete part; a part that is not ready is one sentence."""
    store = Path(store)
    manifests, missing = _part_manifests(store, parts, fingerprint)
    if missing:
        j, what = missing[0]
        raise UserError(
            f"cannot merge {store}: {what}; run it first (harvest.part={j} harvest.parts={parts})"
        )
    shards = []
    for j, m in enumerate(manifests):
        prefix = layout.part_dir(store, j, parts).name
        for position, shard in enumerate(m["shards"]):
            shards.append({**shard, "file": f"{prefix}/{shard['file']}", "index": j + position * parts})
    shards.sort(key=lambda s: s["index"])
    if [s["index"] for s in shards] != list(range(len(shards))):
        raise UserError(
            f"cannot merge {store}: the parts' shards leave a gap ({[s['index'] for s in shards]})"
        )
    merged = {k: v for k, v in manifests[0].items() if k not in ("part", "shards", "throughput")}
    merged.update(
        parts=parts,
        shards=shards,
        n_tokens=sum(s["n_rows"] for s in shards),
        norm_stats=norm_summary(shards),
        throughput=_merged_throughput(manifests),
        data_exhausted=any(m.get("data_exhausted") for m in manifests),
        complete=True,
    )
    write_manifest(store, merged)  # sealed with its own checksum, like every store manifest
    return merged


def merge_if_ready(store: Path, parts: int, fingerprint: str) -> bool:
    """After a part finishes: merge when every part is complete (this was the last), else say who is left.

    Two parts that finish at once may both find every part complete: the store's lock lets one merge."""
    _, missing = _part_manifests(Path(store), parts, fingerprint)
    if missing:
        print(f"{store}: waiting for other parts: {'; '.join(what for _, what in missing)}", file=sys.stderr)
        return False
    try:
        lock = locks.hold(store, "the store", "choose another harvest.out_dir")
    except locks.FolderBusy as busy:
        print(f"another process merges the parts: {busy}", file=sys.stderr)
        return False
    with lock:
        merge(store, parts, fingerprint)
    print(f"all {parts} parts are complete: merged into {Path(store) / layout.MANIFEST}", file=sys.stderr)
    return True
