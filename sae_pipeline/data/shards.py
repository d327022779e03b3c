"""Harvest's side of the store: rows collected per shard and what identifies a store.

`store_fingerprint` is what must match for an existing store to be resumed; `ShardBuffer` collects one
shard's rows with their context ids and positions and shuffles them (seeded) when the shard is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sae_pipeline import layout
from sae_pipeline.data.store import SHARD_KEYS
from sae_pipeline.schema import to_container
from sae_pipeline.schema.common import DataConfig, ModelConfig


def _set_keys(group: DictConfig, schema) -> dict:
    """The keys that differ from the schema's defaults, so a key added later at its default keeps old fingerprints."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    out = {}
    for k, v in to_container(group).items():
        f = fields.get(k)
        default = None if f is None else (f.default_factory() if callable(f.default_factory) else f.default)
        if f is None or v != default:
            out[k] = v
    return out


def _fingerprint(cfg: DictConfig, hook_name: str) -> str:
    """What must match for an existing store to be resumed (not the output folder or the device)."""
    h = cfg.harvest
    keys = ("context_size", "prepend_bos", "batch_size", "n_tokens", "shard_size", "dtype", "seed")
    spec = {
        "model": _set_keys(cfg.model, ModelConfig),
        "data": _set_keys(cfg.data, DataConfig),
        "hook": hook_name,
        "harvest": {k: h[k] for k in keys},
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def store_fingerprint(cfg: DictConfig, hook_name: str, folder: Path | None = None) -> str:
    """What must match for an existing store to be resumed. With the store's `folder`: when its manifest
    was written by an older version (whose fingerprint also hashed keys now at their defaults) but the
    config it records gives today's fingerprint, that store's own fingerprint, so it stays resumable."""
    current = _fingerprint(cfg, hook_name)
    path = None if folder is None else Path(folder) / layout.MANIFEST
    if path is None or not path.exists():
        return current
    try:
        old = json.loads(path.read_text())
        recorded = _fingerprint(OmegaConf.create(old["config"]), hook_name)
    except (OSError, ValueError, KeyError, TypeError, OmegaConfBaseException):
        return current  # an unreadable manifest: the writer's own checks name the problem
    return old.get("fingerprint", current) if recorded == current else current


class ShardBuffer:
    """Rows of one shard for one hook, collected batch by batch, shuffled at write time."""

    def __init__(self):
        self.parts: dict[str, list[torch.Tensor]] = {k: [] for k in SHARD_KEYS}

    def add(self, acts_NTD: torch.Tensor, ids_NT: torch.Tensor, first_context: int, start_pos: int, dtype,
            context_ids_N: torch.Tensor | None = None):  # fmt: skip
        """Rows of n contexts numbered first_context.. (or `context_ids_N`: a tensor dataset's example indices)."""
        n, t, d = acts_NTD.shape
        self.parts["activations"].append(acts_NTD[:, start_pos:].reshape(-1, d).to("cpu", dtype))
        self.parts["token_ids"].append(ids_NT[:, start_pos:].reshape(-1).to(torch.int32))
        contexts = torch.arange(first_context, first_context + n, dtype=torch.int32)
        if context_ids_N is not None:
            contexts = context_ids_N.to(torch.int32)
        self.parts["context_ids"].append(contexts[:, None].expand(n, t - start_pos).reshape(-1))
        positions = torch.arange(start_pos, t, dtype=torch.int32)
        self.parts["positions"].append(positions[None, :].expand(n, t - start_pos).reshape(-1))

    def shuffled(self, seed: int, shard_index: int) -> dict[str, torch.Tensor]:
        tensors = {k: torch.cat(v) for k, v in self.parts.items()}
        gen = torch.Generator().manual_seed(seed * 1_000_003 + shard_index)
        perm = torch.randperm(tensors["token_ids"].shape[0], generator=gen)
        return {k: v[perm] for k, v in tensors.items()}


def write_shard_job(
    writer, buf: ShardBuffer, seed: int, index: int, first_context: int, n_contexts: int, keeper=None
) -> None:
    """Runs on the writer thread: (a bounded harvest: wait for room, data/consumers.py) shuffle the
    shard's rows, then write it atomically."""
    if keeper is not None:
        keeper.make_room(writer)
    writer.write_shard(index, buf.shuffled(seed, index), first_context, n_contexts)
