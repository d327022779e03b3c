"""The one manifest hash and the run-folder records of a store, old and new.

A run folder written before `store_sha256` recorded `store_manifest_sha256`: sha256 of
json.dumps(manifest, sort_keys=True) (the whole manifest, seal included), or of its header (the
non-volatile keys) for a store trained while it was harvested. Those folders must still resume.
"""

from __future__ import annotations

import hashlib
import json

from sae_pipeline.integrity.manifest import (
    SEAL,
    VOLATILE,
    header_sha256,
    manifest_sha256,
    seal_manifest,
    store_matches_record,
    store_record,
)


def _manifest() -> dict:
    m = {"format_version": 1, "d_in": 4, "dtype": "float32", "hook": {"name": "h"}, "complete": True}
    m["shards"] = [{"file": "shard-00000.safetensors", "n_rows": 3, "sha256": "ab" * 32}]
    seal_manifest(m)
    return m


def test_manifest_hash_is_what_the_seal_holds():
    m = _manifest()
    body = {k: v for k, v in m.items() if k != SEAL}
    by_hand = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert m[SEAL] == manifest_sha256(m) == by_hand
    grown = {**m, "shards": m["shards"] * 2, "complete": False}  # only volatile keys differ
    assert header_sha256(grown) == header_sha256(m) and manifest_sha256(grown) != manifest_sha256(m)


def test_records_written_now_and_before_are_both_matched():
    m = _manifest()
    assert store_matches_record(store_record("store", m), "store", m)
    before_whole = hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest()
    assert store_matches_record({"store_manifest_sha256": before_whole}, "store", m)
    header = {k: v for k, v in m.items() if k not in VOLATILE}
    before_header = hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()
    assert store_matches_record(
        {"target_store_manifest_sha256": before_header}, "target_store", m, following=True
    )
    other = {**m, "d_in": 5}
    assert not store_matches_record(store_record("store", m), "store", other)
    assert not store_matches_record({"store_manifest_sha256": before_whole}, "store", other)
    assert not store_matches_record({}, "store", m)  # a run that recorded no store
    assert store_matches_record({}, "target_store", None)  # no target then, none now
    assert not store_matches_record(store_record("target_store", m), "target_store", None)
