"""The sha256 a JSON record carries of itself, and the sha256 of the files a record lists.

seal(record, "state_sha256")                  # record["state_sha256"] = sha256 of every other key
seal_matches(record, "state_sha256")          # False only when a seal is present and wrong
record["sha256"] = file_checksums(folder, names)
file_problem(folder, name, record)            # one sentence when the file differs from its record
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from sae_pipeline.files import sha256_file

FILES = "sha256"  # the key under which a record lists its files' checksums ({name: sha256})


def record_sha256(record: dict, seal_key: str) -> str:
    """sha256 of a JSON object's canonical form, every key but `seal_key` (where it keeps this value)."""
    body = {k: v for k, v in record.items() if k != seal_key}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal(record: dict, seal_key: str) -> None:
    record[seal_key] = record_sha256(record, seal_key)


def seal_matches(record: dict, seal_key: str) -> bool:
    """True when the record's seal matches its content, or it has none (records written before seals)."""
    return seal_key not in record or record[seal_key] == record_sha256(record, seal_key)


def file_checksums(folder: Path, names: tuple[str, ...] | list[str]) -> dict[str, str]:
    return {name: sha256_file(Path(folder) / name) for name in names}


def file_problem(folder: Path, name: str, record: dict) -> str | None:
    """'missing' or 'mismatch' when the file is absent or differs from the sha256 the record lists
    (a record that lists none, written before checksums, is not checked), else None."""
    path = Path(folder) / name
    if not path.is_file():
        return "missing"
    recorded = (record.get(FILES) or {}).get(name)
    if recorded is not None and sha256_file(path) != recorded:
        return "mismatch"
    return None
