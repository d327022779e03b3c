"""The training loop: one pass of batches from the shuffled reader through every member of a run.

Each step reads one global batch, steps every member on it (a sweep group shares the batch), logs window
means every `log_every` steps, validates, measures loss recovered, and checkpoints on schedule; the run
ends by saving each member's SAE with the input scale folded in.
"""

from __future__ import annotations

import contextlib
import random
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from sae_pipeline import layout
from sae_pipeline.data.store import ActivationStore
from sae_pipeline.errors import UserError
from sae_pipeline.files import write_json_atomic
from sae_pipeline.progress import duration
from sae_pipeline.runtime import (
    autocast_dtype,
    compute_change,
    compute_record,
    keep_freed_memory,
    resolve_device,
)
from sae_pipeline.sae import input_scale_factor, scale_for_mean_norm
from sae_pipeline.schema import to_container
from sae_pipeline.tracking import run_name
from sae_pipeline.training import checkpoint, latent_shards
from sae_pipeline.training.distributed import Distributed
from sae_pipeline.training.group import member_specs
from sae_pipeline.training.member import Member
from sae_pipeline.training.run_folder import (
    check_resumable,
    lock_folders,
    prepare_run_dir,
    provenance,
    save_final,
)
from sae_pipeline.training.runlog import NullLogger, RunLogger
from sae_pipeline.training.schedule import lr_at, sparsity_scale_at
from sae_pipeline.training.settings import change_history, check_train_config, resume_changes
from sae_pipeline.training.streaming import open_store, planned_steps, stream_reader
from sae_pipeline.training.transcoder import (
    TranscoderTarget,
    check_target_resumable,
    open_reader,
    open_target,
)
from sae_pipeline.training.validation import LossRecovered, validate


class StopRequested(RuntimeError):
    """Raised after `train.advanced.stop_after_steps` (a debug key that simulates a killed run)."""


def input_scale(sae_cfg, store: ActivationStore, sample_ND: torch.Tensor) -> float:
    """The factor the SAE trains on (x * s), from the store's recorded mean norm or else the sample's
    (always the sample's for a streamed store, whose recorded norms grow with the harvest)."""
    if not sae_cfg.normalize_input:
        return 1.0
    mean = None if store.following else (store.manifest.get("norm_stats") or {}).get("mean")
    return input_scale_factor(sample_ND) if not mean else scale_for_mean_norm(store.d_in, mean)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def train(cfg: DictConfig, run_dir: Path, hydra_info: dict, dist: Distributed | None = None) -> Path:
    """Train the SAE(s) described by cfg into run_dir; returns run_dir.

    hydra_info: the Hydra job's overrides and sweep name (empty without Hydra) for W&B names and groups.
    dist: the ranks of a data-parallel job (training/distributed.py); rank 0 alone writes run_dir."""
    tcfg = cfg.train
    check_train_config(tcfg)
    dist = dist or Distributed(device=resolve_device(tcfg.device))
    store = open_store(cfg.store, tcfg)
    target = open_target(tcfg, store)  # a transcoder's target store, else None
    specs = member_specs(cfg, store)
    latent_shards.check(specs, store.d_in, tcfg, dist.world_size, target is not None)
    dist = latent_shards.split(dist, tcfg.latent_shards)  # replicas x latent shards (dist itself for 1)
    dist.check_batch(tcfg.batch_size)
    device = dist.device
    amp_dtype = autocast_dtype(tcfg.autocast, device)  # checked before the run folder is made
    held = contextlib.ExitStack()  # rank 0's locks: the run folder, then each group member's folder
    try:
        dist.on_main(lambda: lock_folders(held, [run_dir]))
        resuming = dist.broadcast_object(dist.on_main(lambda: prepare_run_dir(run_dir, tcfg)))
        dist.on_main(lambda: lock_folders(held, [run_dir / name for name, _ in specs if name]))
        return _train(cfg, run_dir, hydra_info, dist, store, target, specs, amp_dtype, resuming)
    finally:
        held.close()


def _train(cfg, run_dir, hydra_info, dist, store, target, specs, amp_dtype, resuming: bool) -> Path:
    """The run, once its folders are locked and prepared."""
    tcfg, adv, device = cfg.train, cfg.train.advanced, dist.device
    member_class = latent_shards.ShardedMember if tcfg.latent_shards > 1 else Member
    if device.type == "cpu":
        keep_freed_memory()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None)

    _seed_everything(tcfg.seed)
    container = to_container(cfg)
    origin = provenance(store)
    compute = compute_record(device)  # torch build, device, threads: what the last bits depend on
    group_mode = bool(tcfg.group)
    if group_mode and dist.is_main:
        record = {
            "config": container,
            **origin,
            "group": [n for n, _ in specs],
            "world_size": dist.world_size,
            "compute": compute,
        }
        write_json_atomic(run_dir / layout.CONFIG, record)

    def reader_at(state=None):
        if tcfg.stream:
            return stream_reader(store, tcfg, device.type == "cuda", run_dir, dist.rank, state=state)
        return open_reader(
            store, target, tcfg.batch_size, seed=tcfg.seed, val_tokens=tcfg.val_tokens, buffer_rows=adv.buffer_rows,
            chunk_rows=adv.chunk_rows, prefetch=adv.prefetch, device=device, read_threads=adv.read_threads,
            state=state,
        )  # fmt: skip

    reader = reader_at()
    sample = reader.sample(min(adv.init_tokens, reader.epoch_rows))  # [N, d_in (+ d_out)]
    sample, sample_y = sample[:, : store.d_in], sample[:, store.d_in :]
    members: list[Member] = []
    for name, sae_cfg in specs:
        mdir = run_dir / name if name else run_dir
        if dist.is_main:
            mdir.mkdir(parents=True, exist_ok=True)
        scale = dist.broadcast_object(input_scale(sae_cfg, store, sample))
        out = None
        if target is not None:  # a transcoder: its target rows get their own scale
            out = TranscoderTarget(target, dist.broadcast_object(input_scale(sae_cfg, target, sample_y)))
        members.append(member_class(name, mdir, sae_cfg, store.d_in, tcfg, device, scale, dist, out))

    # fresh start or resume
    ckpts = [m.checkpoints() for m in members]
    common = sorted(set.intersection(*(set(c) for c in ckpts))) if resuming else []
    if resuming and not common and any(ckpts):
        raise UserError(
            f"the members of the run {run_dir} share no checkpoint step, so it cannot be resumed exactly; "
            "resume with the same train.group or pass train.overwrite=true"
        )
    if common:  # never resume from a damaged checkpoint: fall back to the newest intact one
        keep = common.index(checkpoint.newest_intact(ckpts, common)) + 1
        common = common[
            : dist.fewest(keep)
        ]  # latent shards each check their own files: the oldest choice wins
    start_step, reader_state, exit_code = 0, None, 1
    for m, found in zip(members, ckpts, strict=True):
        record = {
            "config": container, **origin, "arch": m.sae_cfg.arch, "d_in": store.d_in, "d_sae": m.sae.d_sae,
            "sae": asdict(m.sae_cfg), "member": m.name, "input_scale": m.input_scale, "lr": m.lr,
            "world_size": dist.world_size, "compute": compute,
            **(m.target.record() if m.target is not None else {}),
        }  # fmt: skip
        if tcfg.latent_shards > 1:
            record.update(latent_shards=tcfg.latent_shards, processes=dist.processes)
        old = {}
        if resuming and (m.run_dir / layout.CONFIG).exists():
            old = check_resumable(m.run_dir, record, store)
            latent_shards.check_layout(old, m.run_dir, tcfg, dist)
            check_target_resumable(m.run_dir, m.target)
            record["wandb_id"] = old.get("wandb_id")
        changes = resume_changes(old, container, m.run_dir, tcfg.allow_changes)
        if common:
            meta, extra = checkpoint.load(found[common[-1]], m.sae, m.opt)
            if meta.get("world_size", 1) != dist.world_size:
                raise UserError(
                    f"the checkpoint {found[common[-1]]} was written by {meta.get('world_size', 1)} processes and "
                    f"this resume has {dist.world_size}; resume it with torchrun --nproc_per_node={meta.get('world_size', 1)}"
                )
            changed = compute_change(meta.get("compute"), compute)
            if changed and dist.is_main and m is members[0]:  # one line for the run
                print(changed, file=sys.stderr, flush=True)
            history = old.get("compute_changes", [])  # config.json keeps every change of compute
            if changed:
                history = [*history, {"step": meta["step"], "from": meta["compute"], "to": compute}]
            if history:
                record["compute_changes"] = history
            # the scale the checkpoint trained on (a sample's mean norm could differ in its last bit here)
            m.input_scale = record["input_scale"] = meta.get("input_scale", m.input_scale)
            m.rng = {k: v for k, v in extra.items() if k.startswith("rng_")}
            m.stats.since_fired_F.copy_(extra["since_fired_F"])
            start_step, reader_state = meta["step"], meta["reader"]
            m.resumed_from = found[common[-1]]
        else:
            ys = None if m.target is None else (sample_y * m.target.scale).to(device)
            m.sae.init_from_data((sample * m.input_scale).to(device), ys)
        dist.broadcast_module(m.sae)  # every rank starts from rank 0's weights
        if not dist.is_main:
            m.logger = NullLogger()
            continue
        record.setdefault("wandb_id", record.get("wandb_id") or uuid.uuid4().hex[:8])
        base_name = cfg.logger.name or run_name(m.sae_cfg.arch, store.hook_name, hydra_info.get("overrides"))
        record["wandb_name"] = f"{base_name}/{m.name}" if m.name else base_name
        record["wandb_group"] = (
            cfg.logger.group or hydra_info.get("sweep") or (run_dir.name if group_mode else None)
        )
        if changes or old.get("changes"):
            record["changes"] = change_history(old, changes, start_step)
        write_json_atomic(m.run_dir / layout.CONFIG, record)
        wandb_config = {**container, **origin, "member": m.name, "sae": record["sae"], "arch": m.sae_cfg.arch,
                        "d_in": store.d_in, "d_sae": m.sae.d_sae}  # fmt: skip
        m.logger = RunLogger(
            m.run_dir, wandb_config, cfg.logger, name=record["wandb_name"], group=record["wandb_group"],
            wandb_id=record["wandb_id"], resume_step=start_step if resuming else None, member=m.name,
        )  # fmt: skip
    if reader_state is not None:
        reader.close()
        reader = reader_at(reader_state)
    try:
        _train_loop(
            members, reader, store, tcfg, device, autocast, start_step, resuming, dist, target, compute
        )
        exit_code = 0
    finally:
        reader.close()
        for m in members:
            if m.logger is not None:
                m.logger.finish(exit_code)
    return run_dir


def _train_loop(
    members, reader, store, tcfg, device, autocast, step: int, resuming: bool, dist, target, compute: dict
) -> None:
    total_steps = planned_steps(tcfg, reader)
    log0 = members[0].logger
    if resuming:
        log0.event(
            step, f"resuming at step {step}/{total_steps} (pass {reader.epoch + 1} over the store)", True
        )
    for m in members:
        why = (
            "train.lr"
            if tcfg.lr is not None
            else f"train.lr not given: {type(m.sae).default_lr_scale:g} x 2e-4 / sqrt(d_sae / 2**14), d_sae={m.sae.d_sae}"
        )
        m.logger.event(step, f"peak learning rate {m.lr:.4g} ({why})")
        unset = "" if tcfg.dead_tokens is not None else " not given: the SAE's default"
        m.logger.event(step, f"dead after {m.dead_tokens:,} silent tokens (train.dead_tokens{unset})")
    if step == 0 and not tcfg.stream and total_steps * tcfg.batch_size > reader.epoch_rows:
        passes = total_steps * tcfg.batch_size / reader.epoch_rows
        log0.event(
            0,
            f"train.total_tokens={tcfg.total_tokens} is {passes:.2f} passes over the store's {reader.epoch_rows} training rows",
            True,
        )
    main = dist.is_main  # rank 0 alone validates, evaluates, prints and writes
    val_x = reader.validation_rows() if tcfg.val_every > 0 and main else None
    loss_rec = LossRecovered(store, tcfg, device, log0, target) if tcfg.eval_every > 0 and main else None
    epoch, last_ckpt, rows = reader.epoch, step, dist.rows(tcfg.batch_size)
    clock = Clock(step, total_steps)
    if getattr(
        reader, "bounded", False
    ):  # caught up with a bounded harvest: checkpoint so it may free shards

        def caught_up():
            nonlocal last_ckpt
            if dist.saves_checkpoints and last_ckpt != step:
                _save_checkpoints(members, step, reader, tcfg, dist.world_size, compute)
                last_ckpt = step
            reader.checkpointed()

        reader.on_wait = caught_up
    while step < total_steps:
        x_BD = reader.next_batch()
        if x_BD is None:  # a streamed store that ended (its data ran out) before the planned steps
            log0.event(
                step, f"the store is complete and read: stopping at step {step} of {total_steps}", True
            )
            if dist.saves_checkpoints:
                _save_checkpoints(members, step, reader, tcfg, dist.world_size, compute)
            break
        x_BD = x_BD[rows].to(device, non_blocking=True)
        lr, scale = lr_at(step, total_steps, tcfg, 1.0), sparsity_scale_at(step, tcfg)  # lr: schedule factor
        try:
            for m in members:
                m.train_step(x_BD, step, lr * m.lr, scale, tcfg, autocast)
        except Exception:  # a failure after a non-finite step is reported as that step
            _check_finite(members)
            raise
        step += 1
        if reader.epoch != epoch:
            epoch = reader.epoch
            log0.event(step, f"starting pass {epoch + 1} over the store", True)
        last = step == total_steps
        if step % tcfg.log_every == 0 or last:
            _check_finite(members)  # the one host sync of the finiteness checks (per log line)
            for m in members:
                rec = {
                    **m.stats.summary(),
                    "lr": m.opt.param_groups[0]["lr"],  # what the optimizer used
                    "sparsity_coefficient": scale,
                    "tokens": step * tcfg.batch_size,
                }
                if reader.epoch_rows:
                    rec["epoch"] = step * tcfg.batch_size / reader.epoch_rows
                m.logger.log(step, rec)
                if main:
                    print(f"{_progress(m, step, total_steps, rec)} | {clock.line(step)}", flush=True)
        t_side = time.perf_counter()  # validation, evaluation and checkpoints do not count in tokens/s
        due_val = tcfg.val_every > 0 and (step % tcfg.val_every == 0 or last)
        due_eval = tcfg.eval_every > 0 and (step % tcfg.eval_every == 0 or last)
        # the whole SAEs on rank 0 (latent shards are gathered: every rank takes part; else the members)
        views = [m.for_evaluation() for m in members] if due_val or due_eval else []
        if val_x is not None and val_x.numel() and due_val:
            for v in views:
                v.logger.show(step, validate(v, val_x, tcfg.batch_size, device))
        if loss_rec is not None and due_eval:
            for v in views:
                loss_rec(v, step)
        every = tcfg.checkpoint_every_tokens
        if last or (every > 0 and step * tcfg.batch_size // every > (step - 1) * tcfg.batch_size // every):
            _check_finite(members)  # never a checkpoint with non-finite weights (every rank checks)
            if dist.saves_checkpoints:  # rank 0, or replica 0's rank of each latent shard
                _save_checkpoints(members, step, reader, tcfg, dist.world_size, compute)
            elif tcfg.stream:
                reader.checkpointed()
            last_ckpt = step
        for m in members:
            m.stats.t0 += time.perf_counter() - t_side
        if (stop_after := tcfg.advanced.stop_after_steps) is not None and step >= stop_after and not last:
            dist.barrier()  # the checkpoint is on disk before any rank exits
            raise StopRequested(
                f"stopped after step {step} (train.advanced.stop_after_steps); last checkpoint at step {last_ckpt}"
            )
    views = [m.for_evaluation() for m in members]  # latent shards are gathered into one SAE on rank 0
    for m in views if main else ():
        saved = save_final(m, store)
        print(f"saved {saved}", flush=True)
        m.logger.log_sae(
            saved, {"arch": m.sae_cfg.arch, "hook": store.hook_name, "d_in": store.d_in, "step": step}
        )
    if tcfg.stream:
        reader.finished()  # a bounded harvest may delete every shard this run kept
    dist.barrier()


def _check_finite(members) -> None:
    for m in members:
        m.check_finite()


def _save_checkpoints(members, step: int, reader, tcfg, world_size: int, compute: dict) -> None:
    """The reader's position is that of the global batch stream every rank reads (one state for all)."""
    for m in members:  # all members first, then prune: a kill in between leaves a common step
        meta = {"tokens": step * tcfg.batch_size, "reader": reader.state(), "input_scale": m.input_scale}
        meta["world_size"], meta["compute"] = world_size, compute
        checkpoint.save(
            m.checkpoint_root, step, m.sae, m.opt, meta, {**m.rng, "since_fired_F": m.stats.since_fired_F}
        )
    for m in members:
        checkpoint.prune(m.checkpoint_root, max(tcfg.keep_checkpoints, m.min_keep))
    if tcfg.stream:
        reader.checkpointed()  # a bounded store may now delete the shards before this checkpoint's window


class Clock:
    """Elapsed time since this process started training and the ETA at the rate of its steps so far."""

    def __init__(self, first_step: int, total_steps: int):
        self.first, self.total, self.start = first_step, total_steps, time.perf_counter()

    def line(self, step: int) -> str:
        elapsed = time.perf_counter() - self.start
        done = step - self.first
        eta = duration(elapsed / done * (self.total - step)) if done > 0 else "?"
        return f"elapsed {duration(elapsed)} | ETA {eta}"


def _progress(m: Member, step: int, total: int, rec: dict) -> str:
    who = f"[{m.name}] " if m.name else ""
    return (
        f"{who}step {step}/{total} loss {rec['loss']:.4g} mse {rec['mse']:.4g} fvu {rec['fvu']:.3f} "
        f"l0 {rec['l0']:.1f} dead {rec['dead_latents']} lr {rec['lr']:.2e} {rec['tokens_per_s']:.0f} tok/s"
    )
