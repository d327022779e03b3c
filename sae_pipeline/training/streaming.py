"""Training on a store while it is harvested (`train.stream=true`): opening it, its reader, its length.

    sae-harvest harvest.n_tokens=10000000 &                 # writes shard after shard
    sae-train store=<its store> train.stream=true           # trains on each window of shards as it lands

The order of rows is data/stream.py's (shard sequence and seed, never timing), so the streamed run
equals `sae-train train.stream=true` on the finished store, and a killed run resumes to the same SAE.
A streamed run makes one pass: it stops at train.total_tokens, or when the complete store is read.
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

from sae_pipeline.data.remote import RemoteStore, is_url, local_path
from sae_pipeline.data.source import open_source
from sae_pipeline.data.store import ActivationStore
from sae_pipeline.data.stream import StreamReader
from sae_pipeline.errors import UserError
from sae_pipeline.files import sha256_file
from sae_pipeline.integrity.manifest import write_manifest
from sae_pipeline.layout import cache_root

POLL_S = 0.2


def open_store(location: str, tcfg) -> ActivationStore:
    """The store a run trains on; with train.stream=true one that may still be harvested (its manifest
    is waited for up to train.advanced.stream_wait_s when the harvest has not written it yet)."""
    if is_url(location) and not tcfg.stream:  # a shuffled pass needs the whole store: fetched once, checked
        return ActivationStore(fetch_store(location, tcfg), location=location)
    path = location if is_url(location) else local_path(location)
    if not tcfg.stream:
        return ActivationStore(path)
    if tcfg.target_store:
        raise UserError(
            "train.stream=true does not train transcoders yet; drop train.target_store or train.stream"
        )
    source, started = open_source(location), time.monotonic()
    while not source.has_manifest():
        waited = time.monotonic() - started
        if waited > tcfg.advanced.stream_wait_s:
            raise UserError(
                f"no activation store appeared at {path} within train.advanced.stream_wait_s={tcfg.advanced.stream_wait_s:g} s; "
                "start sae-harvest for it (or check the store= path)"
            )
        if int(waited) % 10 == 0 and waited - int(waited) < POLL_S:
            print(
                f"waiting for the store {path} to be created by sae-harvest: {waited:.0f} s", file=sys.stderr
            )
        time.sleep(POLL_S)
    return ActivationStore(path, following=True, location=str(location))


def fetch_store(url: str, tcfg) -> Path:
    """A complete store at a URL, copied into a local cache folder with every shard's sha256 checked."""
    remote = RemoteStore(url)
    manifest = remote.read_manifest()
    if not manifest.get("complete"):
        raise UserError(
            f"the store {url} is incomplete; finish its sae-harvest or train on it with train.stream=true"
        )
    cache = cache_root() / "stores" / hashlib.sha256(url.encode()).hexdigest()[:16]
    for shard in manifest["shards"]:
        have = cache / shard["file"]
        if not (have.is_file() and sha256_file(have) == shard["sha256"]):
            remote.fetch(shard["file"], shard["sha256"], cache)
    write_manifest(cache, manifest)
    print(f"fetched the store {url} into {cache}", file=sys.stderr)
    return cache


def consumer_id(run_dir: Path, rank: int) -> str:
    """This run's name among a bounded store's consumers: stable across resumes, one per rank."""
    return f"{hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:12]}-rank{rank}"


def stream_reader(store, tcfg, pin_memory: bool, run_dir: Path, rank: int, state=None) -> StreamReader:
    consumer = (consumer_id(run_dir, rank), str(run_dir))
    return StreamReader(
        open_source(store.location), tcfg.batch_size, seed=tcfg.seed, val_tokens=tcfg.val_tokens,
        window_shards=tcfg.advanced.stream_window_shards, prefetch=tcfg.advanced.prefetch, state=state,
        pin_memory=pin_memory, wait_s=tcfg.advanced.stream_wait_s, consumer=consumer,
    )  # fmt: skip


def planned_steps(tcfg, reader) -> int:
    """Steps of the run: train.total_tokens, or for a streamed run at most one pass over the rows the
    harvest will write (known from its first manifest, so never from timing)."""
    tokens = tcfg.total_tokens
    if tcfg.stream and reader.epoch_rows is not None:
        tokens = min(tokens, reader.epoch_rows)
    return max(1, tokens // tcfg.batch_size)
