"""Where a store's manifest and shards come from, for readers that follow or fetch a store.

    source = open_source("runs/stores/.../blocks.9.hook_resid_post")
    manifest = source.read_manifest()            # checked and sealed (integrity/manifest.py)
    for entry in source.entries(manifest):
        path = source.local_path(entry)          # a local file to memory-map, its sha256 checked

The streaming reader (data/stream.py) reads shards only through a source, so that what it reads
(which shards, in which order) stays apart from how the bytes arrive.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from sae_pipeline import layout
from sae_pipeline.data.remote import RemoteStore, is_url, local_path
from sae_pipeline.data.store import read_manifest
from sae_pipeline.integrity.manifest import header_sha256
from sae_pipeline.integrity.shard import check_shard


@dataclass(frozen=True)
class ShardEntry:
    index: int
    file: str
    n_rows: int
    sha256: str


class StoreSource:
    """A store folder on the local disk."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def __str__(self) -> str:
        return str(self.folder)

    @property
    def place(self):
        """What consumers.py records progress in: this folder (a RemoteStore for a URL)."""
        return self.folder

    def has_manifest(self) -> bool:
        return (self.folder / layout.MANIFEST).exists()

    def read_manifest(self) -> dict:
        return read_manifest(self.folder)

    header_sha256 = staticmethod(header_sha256)

    @staticmethod
    def entries(manifest: dict) -> list[ShardEntry]:
        return [
            ShardEntry(i, s["file"], int(s["n_rows"]), s["sha256"]) for i, s in enumerate(manifest["shards"])
        ]

    def local_path(self, entry: ShardEntry) -> Path:
        """The shard as a local file, its sha256 checked (a damaged or missing file is named)."""
        path = self.folder / entry.file
        check_shard(path, entry.sha256)
        return path

    def release(self, path: Path) -> None:
        """Done with a file `local_path` returned (a fetched copy is removed; a local shard stays)."""


class RemoteSource(StoreSource):
    """A store at an fsspec URL: each shard is downloaded whole into a private temporary folder, its
    sha256 checked, read, and removed (`release`); the reader's prefetch thread downloads ahead."""

    def __init__(self, url: str):
        self.remote = RemoteStore(url)
        self.folder = Path(tempfile.mkdtemp(prefix="sae-shards-"))

    def __str__(self) -> str:
        return str(self.remote)

    @property
    def place(self):
        return self.remote

    def has_manifest(self) -> bool:
        return self.remote.exists(layout.MANIFEST)

    def read_manifest(self) -> dict:
        return self.remote.read_manifest()

    def local_path(self, entry: ShardEntry) -> Path:
        return self.remote.fetch(entry.file, entry.sha256, self.folder)

    def release(self, path: Path) -> None:
        Path(path).unlink(missing_ok=True)


def open_source(location: str | Path) -> StoreSource:
    if is_url(location):
        return RemoteSource(str(location))
    return StoreSource(local_path(location))
