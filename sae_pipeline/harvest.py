"""sae-harvest: run a model over text and store activations at hook points as safetensors shards.

    sae-harvest                                   # embedded SmolLM2 on Shakespeare, layer 9 residual
    sae-harvest hook=all hook.layer=3 harvest.n_tokens=1000000
    sae-harvest model.name=EleutherAI/pythia-70m data.name=NeelNanda/pile-10k hook.layer=3

The forward stops right after the deepest requested hook (no later layer, no LM head). Shards are
written by a background thread while the model computes the next batch. A killed harvest resumes
from its last complete shard when the same command is run again.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from sae_pipeline import hooks, paths, store, text
from sae_pipeline.config import register_configs, to_container
from sae_pipeline.errors import UserError, report_user_errors
from sae_pipeline.models import load_model, max_context, resolve_device


def _check_settings(h: DictConfig) -> None:
    store.store_dtype(h.dtype)
    for key in ("context_size", "batch_size", "n_tokens", "shard_size"):
        if int(h[key]) < 1:
            raise UserError(f"harvest.{key}={h[key]} must be a positive integer")
    if h.context_size < 2 and h.prepend_bos:
        raise UserError(f"harvest.context_size={h.context_size} leaves no room for text after BOS")


def _hook_names(hook_cfg: DictConfig) -> list[str]:
    names = [hooks.hook_name(p, hook_cfg.layer) for p in hook_cfg.points] + list(hook_cfg.names)
    if not names:
        raise UserError("no hook point requested; set hook.points or hook.names")
    return list(dict.fromkeys(names))


def _fingerprint(cfg: DictConfig, hook_name: str) -> str:
    """What must match for an existing store to be resumed (not the output folder or the device)."""
    h = cfg.harvest
    keys = ("context_size", "prepend_bos", "batch_size", "n_tokens", "shard_size", "dtype", "seed")
    spec = {
        "model": to_container(cfg.model),
        "data": to_container(cfg.data),
        "hook": hook_name,
        "harvest": {k: h[k] for k in keys},
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


class _ShardBuffer:
    """Rows of one shard for one hook, collected batch by batch, shuffled at write time."""

    def __init__(self):
        self.parts: dict[str, list[torch.Tensor]] = {k: [] for k in store.SHARD_KEYS}

    def add(self, acts_NTD: torch.Tensor, ids_NT: torch.Tensor, first_context: int, start_pos: int, dtype):
        n, t, d = acts_NTD.shape
        self.parts["activations"].append(acts_NTD[:, start_pos:].reshape(-1, d).to("cpu", dtype))
        self.parts["token_ids"].append(ids_NT[:, start_pos:].reshape(-1).to(torch.int32))
        contexts = torch.arange(first_context, first_context + n, dtype=torch.int32)
        self.parts["context_ids"].append(contexts[:, None].expand(n, t - start_pos).reshape(-1))
        positions = torch.arange(start_pos, t, dtype=torch.int32)
        self.parts["positions"].append(positions[None, :].expand(n, t - start_pos).reshape(-1))

    def shuffled(self, seed: int, shard_index: int) -> dict[str, torch.Tensor]:
        tensors = {k: torch.cat(v) for k, v in self.parts.items()}
        gen = torch.Generator().manual_seed(seed * 1_000_003 + shard_index)
        perm = torch.randperm(tensors["token_ids"].shape[0], generator=gen)
        return {k: v[perm] for k, v in tensors.items()}


def _write_shard(
    writer, buf: _ShardBuffer, seed: int, index: int, first_context: int, n_contexts: int
) -> None:
    """Runs on the writer thread: shuffle the shard's rows, then write it atomically."""
    writer.write_shard(index, buf.shuffled(seed, index), first_context, n_contexts)


def _batches(contexts: Iterator[torch.Tensor], batch_size: int, n_contexts: int) -> Iterator[torch.Tensor]:
    taken = 0
    while taken < n_contexts:
        batch = list(itertools.islice(contexts, min(batch_size, n_contexts - taken)))
        if not batch:
            return
        taken += len(batch)
        yield torch.stack(batch)


def run(cfg: DictConfig) -> list[Path]:
    """Harvest every requested hook point into its own store folder; returns the store folders."""
    h = cfg.harvest
    _check_settings(h)
    device = resolve_device(h.device)
    model, tokenizer = load_model(cfg.model, device)
    limit = max_context(model)
    if limit is not None and h.context_size > limit:
        raise UserError(
            f"harvest.context_size={h.context_size} is longer than the model's maximum of {limit} tokens"
        )
    hook_points = [hooks.resolve_hook(model, name) for name in _hook_names(cfg.hook)]
    bos_id = text.bos_token_id(tokenizer, h.prepend_bos)
    start_pos = int(bos_id is not None)
    rows_per_context = h.context_size - start_pos
    per_shard = -(-h.shard_size // rows_per_context)
    contexts_per_shard = -(-per_shard // h.batch_size) * h.batch_size  # whole forward batches per shard
    n_contexts = -(-h.n_tokens // rows_per_context)
    dtype = store.store_dtype(h.dtype)

    train_docs, heldout = text.split_documents(cfg.data, h.seed)
    probe = torch.full((1, min(h.context_size, 4)), tokenizer.eos_token_id or 0, device=device)
    d_in = {name: t.shape[-1] for name, t in hooks.capture(model, probe, None, hook_points).items()}
    out_dir = Path(h.out_dir)
    writers = {}
    for hp in hook_points:
        header = {
            "model": {
                **to_container(cfg.model),
                "architecture": type(model).__name__,
                "n_layers": hooks.num_layers(model),
            },
            "hook": {"name": hp.name, "module_path": hp.module_path, "io": hp.io, "layer": hp.layer},
            "d_in": int(d_in[hp.name]),
            "dtype": h.dtype,
            "context_size": h.context_size,
            "rows_per_context": rows_per_context,
            "contexts_per_shard": contexts_per_shard,
            "bos": {"prepended": bool(h.prepend_bos), "token_id": bos_id, "stored": False},
            "dataset": {"config": to_container(cfg.data), "heldout": heldout},
            "seed": h.seed,
            "n_tokens_requested": h.n_tokens,
            "config": to_container(cfg),
        }
        folder = paths.store_dir(out_dir, hp.name)
        writers[hp.name] = store.StoreWriter(folder, header, _fingerprint(cfg, hp.name), h.overwrite)
    folders = [w.folder for w in writers.values()]
    if all(w.complete for w in writers.values()):
        print(f"store already complete, nothing to do: {', '.join(map(str, folders))}", file=sys.stderr)
        return folders

    first_shard = min(w.n_complete_shards for w in writers.values())
    contexts = text.pack_contexts(tokenizer, train_docs, h.context_size, bos_id)
    skipped = sum(1 for _ in itertools.islice(contexts, first_shard * contexts_per_shard))
    context_index = skipped
    if first_shard:
        print(f"resuming after {first_shard} complete shards ({skipped} contexts)", file=sys.stderr)

    writer_thread = store.BackgroundWriter(h.writer_queue)
    buffers = {name: _ShardBuffer() for name in writers}
    shard_index, shard_first_context = first_shard, context_index
    forward_s, started = 0.0, time.perf_counter()
    bar = tqdm(
        total=n_contexts * rows_per_context,
        initial=skipped * rows_per_context,
        unit="tok",
        unit_scale=True,
        desc="harvest",
        disable=None,
    )

    def flush() -> None:
        nonlocal shard_index, shard_first_context
        n_ctx = context_index - shard_first_context
        for name, buf in buffers.items():
            job = functools.partial(
                _write_shard, writers[name], buf, h.seed, shard_index, shard_first_context, n_ctx
            )
            writer_thread.submit(job)
            buffers[name] = _ShardBuffer()
        shard_index, shard_first_context = shard_index + 1, context_index

    try:
        for ids_NT in _batches(contexts, h.batch_size, n_contexts - skipped):
            tick = time.perf_counter()
            acts = hooks.capture(model, ids_NT.to(device), None, hook_points, early_exit=h.early_exit)
            forward_s += time.perf_counter() - tick
            for name, acts_NTD in acts.items():
                buffers[name].add(acts_NTD, ids_NT, context_index, start_pos, dtype)
            context_index += ids_NT.shape[0]
            bar.update(ids_NT.shape[0] * rows_per_context)
            if context_index - shard_first_context >= contexts_per_shard:
                flush()
        if context_index > shard_first_context:
            flush()
    finally:
        bar.close()
        writer_thread.close()
    wall_s = time.perf_counter() - started
    harvested = (context_index - skipped) * rows_per_context
    exhausted = context_index < n_contexts
    if exhausted:
        print(
            f"warning: the data ran out after {context_index * rows_per_context} tokens "
            f"of the {h.n_tokens} requested",
            file=sys.stderr,
        )
    throughput = {
        "tokens": harvested,
        "wall_s": round(wall_s, 3),
        "forward_s": round(forward_s, 3),
        "tokens_per_s": round(harvested / wall_s, 1) if wall_s > 0 else None,
        "forward_fraction": round(forward_s / wall_s, 4) if wall_s > 0 else None,
        "writer_busy_s": round(writer_thread.busy_s, 3),
        "device": str(device),
        "early_exit": bool(h.early_exit),
    }
    for w in writers.values():
        w.finish({"throughput": throughput, "data_exhausted": exhausted})
    print(
        f"harvested {harvested} tokens at {throughput['tokens_per_s']} tok/s "
        f"({100 * (throughput['forward_fraction'] or 0):.1f}% in the forward) into {', '.join(map(str, folders))}",
        file=sys.stderr,
    )
    return folders


register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="harvest")
@report_user_errors  # inside hydra.main, which would otherwise report the error with its own wrapper
def main(cfg: DictConfig) -> None:
    OmegaConf.resolve(cfg)
    run(cfg)


if __name__ == "__main__":
    main()
