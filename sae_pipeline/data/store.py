"""The activation store: safetensors shards plus a manifest, written atomically, read back safely.

Layout and names come from `paths`. A shard holds
  activations [n_rows, d_in] (store dtype), token_ids [n_rows] int32,
  context_ids [n_rows] int32 (global context index), positions [n_rows] int32 (position in context),
so every row can be traced back to its context and position. Rows are shuffled within a shard.
"""

from __future__ import annotations

import errno
import json
import math
import queue
import shutil
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from sae_pipeline import layout
from sae_pipeline.data import remote
from sae_pipeline.errors import UserError
from sae_pipeline.files import save_tensors_atomic, sha256_file
from sae_pipeline.integrity.manifest import check_manifest, store_sha256, write_manifest
from sae_pipeline.integrity.shard import shard_problem
from sae_pipeline.locks import is_lock_file

STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SHARD_KEYS = ("activations", "token_ids", "context_ids", "positions")


def row_keys(context_ids: torch.Tensor, positions: torch.Tensor, context_size: int) -> torch.Tensor:
    """One int64 key per row for its (context, position): how a token's rows are matched across two stores."""
    return context_ids.long() * context_size + positions.long()


def store_dtype(name: str) -> torch.dtype:
    if name not in STORE_DTYPES:
        raise UserError(f"harvest.dtype={name!r} is not a store dtype; choose one of {sorted(STORE_DTYPES)}")
    return STORE_DTYPES[name]


def read_manifest(store: Path) -> dict:
    if remote.is_url(store):
        return remote.RemoteStore(str(store)).read_manifest()
    path = remote.local_path(store) / layout.MANIFEST
    if not path.exists():
        raise UserError(
            f"no activation store at {store}: {layout.MANIFEST} is missing (run sae-harvest first)"
        )
    rebuild = (
        "restore it from a copy, or rerun the sae-harvest command that wrote the store with "
        "harvest.overwrite=true to write the store again"
    )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(
            f"the store manifest {path} is damaged: it is not valid JSON ({err.msg} at line {err.lineno}); {rebuild}"
        ) from None
    except UnicodeDecodeError:
        raise UserError(f"the store manifest {path} is damaged: it is not UTF-8 text; {rebuild}") from None
    if isinstance(manifest, dict) and manifest.get("format_version") != layout.STORE_FORMAT_VERSION:
        raise UserError(
            f"the store manifest {path} has format_version {manifest.get('format_version')!r}; "
            f"this version of sae_pipeline reads {layout.STORE_FORMAT_VERSION}"
        )
    check_manifest(manifest, path)
    return manifest


def norm_summary(shards: list[dict]) -> dict:
    """Mean, std, RMS and max of the rows' L2 norms, from per-shard sums."""
    n = sum(s["n_rows"] for s in shards)
    if n == 0:
        return {"mean": 0.0, "std": 0.0, "rms": 0.0, "max": 0.0}
    total = sum(s["norm_sum"] for s in shards)
    total_sq = sum(s["norm_sq_sum"] for s in shards)
    mean = total / n
    return {
        "mean": mean,
        "std": math.sqrt(max(total_sq / n - mean * mean, 0.0)),
        "rms": math.sqrt(total_sq / n),
        "max": max(s["norm_max"] for s in shards),
    }


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


class StoreWriter:
    """Writes one store folder. Shards go to a temporary name and are renamed when complete;
    the manifest is rewritten atomically after each shard, so a killed harvest loses at most
    the shard being written. With `parts` > 1 it holds only the shards part, part + parts, ...
    of the whole store (one part of a sharded harvest, data/parts.py)."""

    def __init__(
        self, folder: Path, header: dict, fingerprint: str, overwrite: bool, part: int = 0, parts: int = 1,
        remote=None,
    ):  # fmt: skip
        self.folder = Path(folder)
        self.remote = remote  # a data.remote.RemoteStore: `folder` only stages each file before its upload
        self.redo: set[int] = set()
        self.part, self.parts = part, parts
        self.manifest = self._open(header, fingerprint, overwrite)

    @property
    def place(self):
        """Where the store lives: its local folder, or the RemoteStore it is uploaded to."""
        return self.remote if self.remote is not None else self.folder

    def _pull_remote_manifest(self, overwrite: bool) -> None:
        """Stage the remote store's manifest (if any) locally, so resuming works as for a local store."""
        self.remote.check_writable()
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        if not overwrite and self.remote.exists(layout.MANIFEST):
            write_manifest(self.folder, self.remote.read_manifest())

    def _problem(self, shard: dict) -> str | None:
        if self.remote is not None:
            return self.remote.problem(shard["file"], shard["sha256"])
        return shard_problem(self.folder / shard["file"], shard["sha256"])

    def delete_shard(self, file: str) -> None:
        if self.remote is not None:
            self.remote.rm(file)
        else:
            (self.folder / file).unlink(missing_ok=True)

    def _open(self, header: dict, fingerprint: str, overwrite: bool) -> dict:
        if self.remote is not None:
            self._pull_remote_manifest(overwrite)
        manifest_path = self.folder / layout.MANIFEST
        if manifest_path.exists() and not overwrite:
            old = read_manifest(self.folder)
            if old.get("fingerprint") != fingerprint:
                raise UserError(
                    f"the store {self.folder} already exists with different settings; "
                    "pass harvest.overwrite=true to replace it or choose another harvest.out_dir"
                )
            return self._keep_valid_shards(old)
        entries = [p for p in self.folder.iterdir() if not is_lock_file(p)] if self.folder.exists() else []
        if entries:
            # only leftovers of our own unfinished writes (a harvest killed before its first manifest)
            leftovers = all(p.name.endswith(".tmp") for p in entries)
            if not overwrite and not manifest_path.exists() and not leftovers:
                raise UserError(
                    f"the folder {self.folder} exists and is not an activation store; "
                    "pass harvest.overwrite=true to replace it or choose another harvest.out_dir"
                )
            for entry in entries:  # everything but the lock this harvest holds
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        self.folder.mkdir(parents=True, exist_ok=True)
        manifest = {
            "format_version": layout.STORE_FORMAT_VERSION,
            **header,
            "fingerprint": fingerprint,
            "complete": False,
            "n_tokens": 0,
            "shards": [],
        }
        self.manifest = manifest
        self.save_manifest()
        return manifest

    def _keep_valid_shards(self, manifest: dict) -> dict:
        """On resume (or rerun of a complete store), check every shard's checksum: a damaged or
        missing one is rewritten in place (`redo`), the others are kept."""
        self.redo = set()
        for i, shard in enumerate(manifest["shards"]):
            if shard.get("consumed"):  # deleted by a bounded harvest after its consumers read it
                continue
            problem = self._problem(shard)
            if problem:
                print(f"{problem.split(';')[0]}: it will be rewritten", file=sys.stderr)
                self.redo.add(i)
        if self.redo:
            manifest["complete"] = False
        for leftover in self.folder.glob("*.tmp"):
            leftover.unlink()
        return manifest

    def position(self, index: int) -> int | None:
        """Where global shard `index` sits among this writer's shards (part i of N writes i, i+N, ...)."""
        position, rest = divmod(index - self.part, self.parts)
        return None if rest or position < 0 else position

    def needs(self, index: int) -> bool:
        """Whether global shard `index` is this writer's and still has to be written (new, or damaged)."""
        position = self.position(index)
        return position is not None and (position >= self.n_complete_shards or position in self.redo)

    @property
    def first_needed(self) -> int:
        """The first of this writer's shards (counted among its own) that has to be written."""
        return min(self.redo, default=self.n_complete_shards)

    @property
    def n_complete_shards(self) -> int:
        return len(self.manifest["shards"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def write_shard(
        self, index: int, tensors: dict[str, torch.Tensor], first_context: int, n_contexts: int
    ) -> None:
        position = self.position(index)
        if position is None:
            raise RuntimeError(
                f"shard {index} does not belong to part {self.part} of {self.parts} ({self.folder})"
            )
        if not self.needs(index):  # already on disk from an earlier, interrupted run
            return
        if position > self.n_complete_shards:
            raise RuntimeError(f"shard {index} written out of order in {self.folder}")
        file = self.folder / layout.shard_name(index)
        acts = tensors["activations"]
        norms = acts.float().norm(dim=-1)
        try:
            save_tensors_atomic(file, {k: tensors[k] for k in SHARD_KEYS}, metadata={"shard": str(index)})
        except (OSError, SafetensorError) as err:
            if getattr(err, "errno", None) == errno.ENOSPC or "No space left" in str(err):
                raise UserError(
                    f"no space left on the device while writing {file}; the store keeps its "
                    f"{self.n_complete_shards} complete shards and the same command resumes from there"
                ) from None
            raise
        digest = sha256_file(file)
        if (
            self.remote is not None
        ):  # uploaded whole before the manifest lists it (no rename on object stores)
            self.remote.put(file, file.name)
            file.unlink()
        entry = {
            "file": file.name,
            "n_rows": int(acts.shape[0]),
            "sha256": digest,
            "first_context": first_context,
            "n_contexts": n_contexts,
            "norm_sum": float(norms.sum()),
            "norm_sq_sum": float(norms.square().sum()),
            "norm_max": float(norms.max()) if norms.numel() else 0.0,
        }
        if position in self.redo:
            self.manifest["shards"][position] = entry
            self.redo.discard(position)
        else:
            self.manifest["shards"].append(entry)
        self.manifest["n_tokens"] = sum(s["n_rows"] for s in self.manifest["shards"])
        self.manifest["norm_stats"] = norm_summary(self.manifest["shards"])
        self.save_manifest()

    def save_manifest(self) -> None:
        write_manifest(self.folder, self.manifest)
        if self.remote is not None:  # the manifest last: every shard it lists is already uploaded
            self.remote.put_manifest(self.manifest)

    def finish(self, extra: dict) -> None:
        self.manifest.update(extra)
        self.manifest["complete"] = True
        self.save_manifest()


class BackgroundWriter:
    """Runs shard writes on a thread so the model never waits for the disk.

    `submit` blocks only when `max_pending` shards are already queued; an error raised on the
    thread is re-raised in the caller at the next `submit` or at `close`."""

    def __init__(self, max_pending: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, max_pending))
        self._error: BaseException | None = None
        self.busy_s = 0.0
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import time

        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._error is None:
                start = time.perf_counter()
                try:
                    job()
                except BaseException as err:  # noqa: BLE001 - re-raised in the caller
                    self._error = err
                self.busy_s += time.perf_counter() - start

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, job) -> None:
        self._raise_if_failed()
        self._queue.put(job)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._raise_if_failed()


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardInfo:
    index: int
    path: Path
    n_rows: int
    sha256: str


class ActivationStore:
    """Read access to a finished store: its manifest, and shards validated on load.

    `following=True`: a store that may still be harvested (train.stream=true); its shards are read
    through data/stream.py, and its identity is the header of its manifest, which does not change."""

    def __init__(
        self, folder: str | Path, require_complete: bool = True, following: bool = False, location: str | None = None
    ):  # fmt: skip
        self.location = location or str(folder)  # the store's URL when `folder` is a local copy or unused
        self.folder = remote.local_path(folder) if not remote.is_url(folder) else Path(".")
        self.following = following
        self.manifest = read_manifest(
            self.location if remote.is_url(self.location) and following else self.folder
        )
        if require_complete and not following and not self.manifest.get("complete"):
            raise UserError(
                f"the store {self.folder} is incomplete ({self.manifest.get('n_tokens', 0)} rows so far); "
                "rerun the same sae-harvest command to finish it, or train on it as it grows with train.stream=true"
            )
        self.shards = [
            ShardInfo(i, self.folder / s["file"], int(s["n_rows"]), s["sha256"])
            for i, s in enumerate(self.manifest["shards"])
        ]
        if not self.shards and not following:
            raise UserError(f"the store {self.folder} holds no shards")
        gone = next((s for s in self.manifest["shards"] if s.get("consumed")), None)
        if gone is not None and not following:
            raise UserError(
                f"the shard {gone['file']} of the store {self.folder} was deleted after consumer "
                f"{gone.get('consumed_by')} read it (a bounded harvest, harvest.keep_shards); only a streamed "
                "run that registered in time reads such a store: harvest it again without keep_shards"
            )

    @property
    def d_in(self) -> int:
        return int(self.manifest["d_in"])

    @property
    def n_rows(self) -> int:
        return sum(s.n_rows for s in self.shards)

    @property
    def hook_name(self) -> str:
        return self.manifest["hook"]["name"]

    @property
    def dtype(self) -> torch.dtype:
        return STORE_DTYPES[self.manifest["dtype"]]

    def sha256(self) -> str:
        """The store's identity (integrity/manifest.py: its manifest hash, or its header's while it grows)."""
        return store_sha256(self.manifest, self.following)
