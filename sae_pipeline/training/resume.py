"""Resuming a run: the checkpoint step every member can restart from, and putting a member back there.

A sweep group resumes only at a step every member checkpointed (a kill between two members' saves leaves
one a step ahead), never from a damaged checkpoint, and only with as many processes as wrote it, so a
resumed run continues bit for bit where the killed one stopped."""

from __future__ import annotations

from pathlib import Path

from sae_pipeline.errors import UserError
from sae_pipeline.runtime import compute_change
from sae_pipeline.training import checkpoint


def common_step(ckpts: list[dict], resuming: bool, run_dir: Path, dist) -> str | None:
    """The newest checkpoint step (a folder name) that every member holds intact, or None for a fresh start.

    ckpts: each member's {step name: checkpoint folder}. Every rank must call this (latent shards agree on
    the oldest of their choices)."""
    common = sorted(set.intersection(*(set(c) for c in ckpts))) if resuming else []
    if resuming and not common and any(ckpts):
        raise UserError(
            f"the members of the run {run_dir} share no checkpoint step, so it cannot be resumed exactly; "
            "resume with the same train.group or pass train.overwrite=true"
        )
    if not common:
        return None
    # never resume from a damaged checkpoint: fall back to the newest intact one
    keep = common.index(checkpoint.newest_intact(ckpts, common)) + 1
    # latent shards each check their own files: the oldest choice wins
    return common[: dist.fewest(keep)][-1]


def restore(m, path: Path, record: dict, old_record: dict, compute: dict, world_size: int) -> tuple:
    """Load the checkpoint at path into member m (weights, optimizer, RNG stream, firing counters, the input
    scale it trained on) and note in m's record that scale and config.json's history of compute changes.

    Returns the checkpoint's meta and what changed in the compute (torch build, device, threads) since it
    was written, as a line to print (None if nothing)."""
    meta, extra = checkpoint.load(path, m.sae, m.opt)
    if meta.get("world_size", 1) != world_size:
        raise UserError(
            f"the checkpoint {path} was written by {meta.get('world_size', 1)} processes and this resume "
            f"has {world_size}; resume it with torchrun --nproc_per_node={meta.get('world_size', 1)}"
        )
    changed = compute_change(meta.get("compute"), compute)
    history = old_record.get("compute_changes", [])  # config.json keeps every change of compute
    if changed:
        history = [*history, {"step": meta["step"], "from": meta["compute"], "to": compute}]
    if history:
        record["compute_changes"] = history
    # the scale the checkpoint trained on (a sample's mean norm could differ in its last bit here)
    m.input_scale = record["input_scale"] = meta.get("input_scale", m.input_scale)
    m.rng = {k: v for k, v in extra.items() if k.startswith("rng_")}
    m.stats.since_fired_F.copy_(extra["since_fired_F"])
    m.resumed_from = path
    return meta, changed
