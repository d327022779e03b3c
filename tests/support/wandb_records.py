"""Reading an offline W&B run back: the `.wandb` file is a LevelDB-style log of `wandb.proto` Records.

Layout (wandb's datastore): a 7-byte file header (b":W&B", magic 0xBEE1, version 0), then 32 KiB blocks
of chunks, each with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last); a block's
tail shorter than a header is padding. Written from that description, independent of the code under test.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7


def records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), "not a W&B record log"
    out, pos, parts = [], HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            break
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(parts)
            out.append(rec)
    return out


def summary(path: Path) -> dict:
    """What a reader of the run sees: run id/name/group, config, logged history rows, artifacts, summary."""
    info = {
        "id": None,
        "name": None,
        "group": None,
        "config": {},
        "history": [],
        "artifacts": [],
        "summary": {},
    }
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            info.update(id=rec.run.run_id, name=rec.run.display_name, group=rec.run.run_group)
            info["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            info["config"].update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            info["history"].append(row)
        elif kind == "summary":
            info["summary"].update(
                {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.summary.update}
            )
        elif kind == "artifact":
            info["artifacts"].append(rec.artifact)
    return info
