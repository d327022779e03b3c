"""sae-harvest for a language model on text: packed token contexts through the model, rows per hook point.

The forward stops right after the deepest requested hook (no later layer, no LM head). Shards are
written by a background thread while the model computes the next batch. A killed harvest resumes
from its last complete shard when the same command is run again; a rerun rewrites only damaged shards.
A harvest split into parts writes every N-th shard and the last part to finish merges them (parts.py).
Its sibling for `model=torch_module data=tensors` is tensor_harvest.py.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from sae_pipeline import layout, locks
from sae_pipeline.data import parts, remote, store, text
from sae_pipeline.data.consumers import ShardKeeper
from sae_pipeline.data.shards import ShardBuffer, store_fingerprint, write_shard_job
from sae_pipeline.errors import UserError
from sae_pipeline.model import activations, hook_points
from sae_pipeline.model.hook_points import requested_hook_names
from sae_pipeline.model.loading import load_model, max_context
from sae_pipeline.progress import progress
from sae_pipeline.runtime import resolve_device
from sae_pipeline.schema import to_container


def harvest_text(cfg: DictConfig, held: contextlib.ExitStack) -> list[Path]:
    """Harvest every requested hook point of a language model into its own store; returns the stores.

    Each folder written (a store, or this part's folder in it) is locked in `held`."""
    h = cfg.harvest
    url = remote.is_url(h.out_dir)  # a store at an fsspec URL: each shard staged locally, then uploaded
    out_dir = Path(h.out_dir) if not url else Path(cfg.paths.root) / "staging"
    part, n_parts = parts.resolve_part(h)
    if url and (n_parts > 1 or h.merge):
        raise UserError(
            f"harvest.out_dir={h.out_dir} is a URL: a harvest split into parts writes local folders only"
        )
    if h.merge:
        for name in requested_hook_names(cfg.hook):
            held.enter_context(locks.hold(layout.store_dir(out_dir, name), "the store", "merge later"))
            parts.merge(layout.store_dir(out_dir, name), n_parts, store_fingerprint(cfg, name))
            print(f"merged {n_parts} parts into {layout.store_dir(out_dir, name)}", file=sys.stderr)
        return [layout.store_dir(out_dir, name) for name in requested_hook_names(cfg.hook)]
    device = resolve_device(parts.part_device(h.device))
    model, tokenizer = load_model(cfg.model, device)
    limit = max_context(model)
    if limit is not None and h.context_size > limit:
        raise UserError(
            f"harvest.context_size={h.context_size} is longer than the model's maximum of {limit} tokens"
        )
    points = [hook_points.resolve_hook(model, name) for name in requested_hook_names(cfg.hook)]
    bos_id = text.bos_token_id(tokenizer, h.prepend_bos)
    start_pos = int(bos_id is not None)
    rows_per_context = h.context_size - start_pos
    per_shard = -(-h.shard_size // rows_per_context)
    contexts_per_shard = -(-per_shard // h.batch_size) * h.batch_size  # whole forward batches per shard
    n_contexts = -(-h.n_tokens // rows_per_context)
    dtype = store.store_dtype(h.dtype)

    train_docs, heldout = text.split_documents(cfg.data, h.seed)
    probe = torch.full((1, min(h.context_size, 4)), tokenizer.eos_token_id or 0, device=device)
    d_in = {name: t.shape[-1] for name, t in activations.capture(model, probe, None, points).items()}
    writers, fingerprints = {}, {}
    for hp in points:
        header = {
            "model": {
                **to_container(cfg.model),
                "architecture": type(model).__name__,
                "n_layers": hook_points.num_layers(model),
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
            **(
                {"bounded": {"keep_shards": h.keep_shards, "consumers": h.consumers}} if h.keep_shards else {}
            ),
            "config": to_container(cfg),
        }
        folder = layout.store_dir(out_dir, hp.name)
        fingerprints[hp.name] = store_fingerprint(cfg, hp.name, None if url else folder)
        held.enter_context(parts.lock_store(folder, part, n_parts))
        if url:
            where = remote.RemoteStore(remote.join(h.out_dir, folder.name))
            writers[hp.name] = store.StoreWriter(
                folder, header, fingerprints[hp.name], h.overwrite, remote=where
            )
        elif n_parts == 1:
            writers[hp.name] = store.StoreWriter(folder, header, fingerprints[hp.name], h.overwrite)
        else:
            writer = parts.open_part_writer(folder, header, fingerprints[hp.name], h.overwrite, part, n_parts)
            if writer is not None:  # None: the merged store is already complete
                writers[hp.name] = writer
    folders = (
        [w.place for w in writers.values()] if url else [layout.store_dir(out_dir, hp.name) for hp in points]
    )
    if all(w.complete for w in writers.values()):
        print(f"store already complete, nothing to do: {', '.join(map(str, folders))}", file=sys.stderr)
        for name in writers if n_parts > 1 else ():  # this part is done: merge if the others are too
            parts.merge_if_ready(layout.store_dir(out_dir, name), n_parts, fingerprints[name])
        return folders

    plan = parts.shard_plan(n_contexts, contexts_per_shard, part, n_parts)
    first_shard = min(w.first_needed for w in writers.values())  # counted among this part's shards
    cursor = parts.ContextCursor(text.pack_contexts(tokenizer, train_docs, h.context_size, bos_id))
    skipped = sum(span.n_contexts for span in plan[:first_shard])
    damaged = sorted({layout.shard_name(w.part + p * w.parts) for w in writers.values() for p in w.redo})
    if damaged:  # a rerun repairing a store: the shards after the first damaged one are kept, not redone
        kept = min(w.n_complete_shards - len(w.redo) for w in writers.values())
        print(
            f"rewriting the damaged {', '.join(damaged)}; the {kept} intact shards are kept", file=sys.stderr
        )
    elif first_shard:
        print(f"resuming after {first_shard} complete shards ({skipped} contexts)", file=sys.stderr)

    writer_thread = store.BackgroundWriter(h.advanced.writer_queue)
    keeper = ShardKeeper(h.keep_shards, h.consumers) if h.keep_shards else None
    buffers = {name: ShardBuffer() for name in writers}
    forward_s, started, harvested_contexts, written = 0.0, time.perf_counter(), 0, 0
    total = sum(span.n_contexts for span in plan) * rows_per_context
    bar = progress(total, "harvest", initial=skipped * rows_per_context)

    try:
        for span in plan[first_shard:]:
            if not any(w.needs(span.index) for w in writers.values()):
                continue  # intact on disk (a rerun that repairs damaged shards): its contexts are skipped
            n_ctx = 0
            for ids_NT in cursor.batches(span, h.batch_size):
                tick = time.perf_counter()
                acts = activations.capture(
                    model, ids_NT.to(device), None, points, early_exit=h.advanced.early_exit
                )
                forward_s += time.perf_counter() - tick
                for name, acts_NTD in acts.items():
                    buffers[name].add(acts_NTD, ids_NT, span.first_context + n_ctx, start_pos, dtype)
                n_ctx += ids_NT.shape[0]
                bar.update(ids_NT.shape[0] * rows_per_context)
            if n_ctx == 0:
                break
            for name, buf in buffers.items():
                if writers[name].needs(span.index):  # another hook's store may hold this shard intact
                    job = functools.partial(
                        write_shard_job,
                        writers[name],
                        buf,
                        h.seed,
                        span.index,
                        span.first_context,
                        n_ctx,
                        keeper,
                    )
                    writer_thread.submit(job)
                buffers[name] = ShardBuffer()
            harvested_contexts, written = harvested_contexts + n_ctx, written + 1
            if h.advanced.shard_delay_s > 0:
                time.sleep(h.advanced.shard_delay_s)
            if written == h.advanced.stop_after_shards:
                writer_thread.submit(parts.kill_self)
            if n_ctx < span.n_contexts:
                break
    finally:
        writer_thread.close()  # a failed shard write surfaces here, before the bar's final line
    bar.close()
    wall_s = time.perf_counter() - started
    harvested = harvested_contexts * rows_per_context
    # a rerun that only repaired shards stops reading early: the first run's record stands
    exhausted = cursor.exhausted or any(bool(w.manifest.get("data_exhausted")) for w in writers.values())
    if exhausted:
        print(
            f"warning: the data ran out after {cursor.position * rows_per_context} tokens "
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
        "early_exit": bool(h.advanced.early_exit),
    }
    for name, w in writers.items():
        w.finish({"throughput": throughput, "data_exhausted": exhausted})
        if n_parts > 1:
            parts.merge_if_ready(layout.store_dir(out_dir, name), n_parts, fingerprints[name])
    print(
        f"harvested {harvested} tokens at {throughput['tokens_per_s']} tok/s "
        f"({100 * (throughput['forward_fraction'] or 0):.1f}% in the forward) into {', '.join(map(str, folders))}",
        file=sys.stderr,
    )
    return folders
