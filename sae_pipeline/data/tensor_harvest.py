"""sae-harvest for `model=torch_module data=tensors`: one store row per example.

Each harvested example is a context of one position: context id = the example's index in `data.path`,
position 0, token id 0 (there are no tokens), context_size 1. The activation of shape [...] at the hook
is flattened into one row of d_in = prod(...) values. The stores are ordinary activation stores, so
`sae-train` reads them unchanged. A rerun of the same command keeps complete shards, as for text.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from sae_pipeline import layout
from sae_pipeline.data import store, tensors
from sae_pipeline.data.parts import lock_store
from sae_pipeline.data.shards import ShardBuffer, store_fingerprint
from sae_pipeline.errors import UserError
from sae_pipeline.model.hook_points import resolve_hook
from sae_pipeline.model.torch_module import capture_rows, load_torch_module
from sae_pipeline.progress import progress
from sae_pipeline.schema import to_container


def hook_names(cfg: DictConfig) -> list[str]:
    """A plain module has no decoder blocks: its hooks are hook.names (module:<path>[:input|output])."""
    names = list(dict.fromkeys(cfg.hook.names))
    if not names:
        raise UserError("model=torch_module needs hook.names=[module:<dotted.path>] (a submodule's output)")
    return names


def _absolute(cfg: DictConfig) -> DictConfig:
    """The files the store's manifest names, as absolute paths (so sae-eval works from any folder); a
    dotted factory gets model.factory_path = the folder it was imported from (the working directory)."""
    cfg = cfg.copy()
    m, d = cfg.model, cfg.data
    for group, key in ((m, "weights"), (d, "path"), (d, "eval_path")):
        if group.get(key):
            group[key] = str(Path(group[key]).expanduser().resolve())
    where, _, fn = str(m.factory or "").rpartition(":")
    if where.endswith(".py"):
        m.factory = f"{Path(where).resolve()}:{fn}"
    elif where:
        m.factory_path = str(Path(m.factory_path or ".").resolve())
    return cfg


def harvest_tensors(cfg: DictConfig, device: torch.device, held: contextlib.ExitStack) -> list[Path]:
    """Harvest the hook points of an nn.Module over a tensor dataset; each store folder is locked into `held`."""
    cfg = _absolute(cfg)
    h = cfg.harvest
    if int(h.parts) > 1:
        raise UserError("harvest.parts > 1 is not supported for model=torch_module; harvest in one process")
    if cfg.data.get("name") != "tensors":
        raise UserError(
            f"model=torch_module reads data=tensors (data.path=<file.safetensors>), not data.name={cfg.data.name}"
        )
    model = load_torch_module(cfg.model, device)
    points = [resolve_hook(model, name) for name in hook_names(cfg)]
    train, _, heldout = tensors.split(cfg.data, h.seed)
    n = min(int(h.n_tokens), train.inputs.shape[0])
    per_shard = -(-int(h.shard_size) // h.batch_size) * h.batch_size  # whole forward batches per shard
    d_in = {k: v.shape[1] for k, v in capture_rows(model, train.inputs[:1].to(device), points).items()}
    dtype = store.store_dtype(h.dtype)
    out_dir = Path(h.out_dir)
    writers = {}
    for hp in points:
        header = {
            "model": {**to_container(cfg.model), "architecture": type(model).__name__, "n_layers": None},
            "hook": {"name": hp.name, "module_path": hp.module_path, "io": hp.io, "layer": hp.layer},
            "d_in": int(d_in[hp.name]),
            "dtype": h.dtype,
            "context_size": 1,
            "rows_per_context": 1,
            "contexts_per_shard": per_shard,
            "bos": {"prepended": False, "token_id": None, "stored": False},
            "dataset": {
                "config": to_container(cfg.data),
                "heldout": heldout,
                "labels": train.labels is not None,
                "example_shape": list(train.inputs.shape[1:]),
                "rows": "one row per example: context id = index in data.path, position 0, token id 0",
            },
            "seed": h.seed,
            "n_tokens_requested": h.n_tokens,
            "config": to_container(cfg),
        }
        folder = layout.store_dir(out_dir, hp.name)
        held.enter_context(lock_store(folder, 0, 1))
        writers[hp.name] = store.StoreWriter(
            folder, header, store_fingerprint(cfg, hp.name, folder), h.overwrite
        )
    folders = [layout.store_dir(out_dir, hp.name) for hp in points]
    if all(w.complete for w in writers.values()):
        print(f"store already complete, nothing to do: {', '.join(map(str, folders))}", file=sys.stderr)
        return folders
    started, bar = time.perf_counter(), progress(n, "harvest")
    for index, first in enumerate(range(0, n, per_shard)):
        last = min(first + per_shard, n)
        bar.update(last - first)
        if not any(w.needs(index) for w in writers.values()):
            continue
        buffers = {name: ShardBuffer() for name in writers}
        for b in range(first, last, h.batch_size):
            e = min(b + h.batch_size, last)
            rows = capture_rows(model, train.inputs[b:e].to(device), points, early_exit=h.advanced.early_exit)
            ids = torch.zeros(e - b, 1, dtype=torch.int32)
            for name, x_BD in rows.items():  # a row's context id is its example's index in data.path
                buffers[name].add(x_BD[:, None, :], ids, b, 0, dtype, context_ids_N=train.index[b:e])
        for name, buf in buffers.items():
            if writers[name].needs(index):
                writers[name].write_shard(index, buf.shuffled(h.seed, index), first, last - first)
    bar.close()
    wall = time.perf_counter() - started
    for w in writers.values():
        w.finish(
            {
                "throughput": {"tokens": n, "wall_s": round(wall, 3), "device": str(device)},
                "data_exhausted": n < h.n_tokens,
            }
        )
    print(f"harvested {n} examples into {', '.join(map(str, folders))}", file=sys.stderr)
    return folders
