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
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from sae_pipeline import layout
from sae_pipeline.data.store import ActivationStore
from sae_pipeline.files import write_json_atomic
from sae_pipeline.runtime import autocast_dtype, compute_record, keep_freed_memory, resolve_device
from sae_pipeline.sae import input_scale_factor, scale_for_mean_norm
from sae_pipeline.schema import to_container
from sae_pipeline.training import checkpoint, latent_shards
from sae_pipeline.training.distributed import Distributed
from sae_pipeline.training.group import member_specs
from sae_pipeline.training.member import Member
from sae_pipeline.training.member_records import (
    RunFacts,
    group_record,
    member_record,
    open_logger,
    previous_record,
    wandb_names,
)
from sae_pipeline.training.resume import common_step, restore
from sae_pipeline.training.run_folder import lock_folders, prepare_run_dir, provenance, save_final
from sae_pipeline.training.runlog import Clock, NullLogger, progress_line
from sae_pipeline.training.schedule import lr_at, sparsity_scale_at
from sae_pipeline.training.settings import change_history, check_train_config, resume_changes
from sae_pipeline.training.streaming import open_store, planned_steps, stream_reader
from sae_pipeline.training.transcoder import TranscoderTarget, open_reader, open_target
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
    run = TrainingRun(cfg, run_dir, hydra_info, dist)
    dist = run.dist
    held = contextlib.ExitStack()  # rank 0's locks: the run folder, then each group member's folder
    try:
        dist.on_main(lambda: lock_folders(held, [run_dir]))
        resuming = dist.broadcast_object(dist.on_main(lambda: prepare_run_dir(run_dir, cfg.train)))
        dist.on_main(lambda: lock_folders(held, [run_dir / name for name, _ in run.specs if name]))
        run.set_up(resuming)
        run.resume()
        return run.run()
    finally:
        held.close()


class TrainingRun:
    """One run: its store, members, reader and position, from the checks made before its folder exists to the
    saved SAEs. What the loop's parts share (the step, the last checkpoint, the pass) lives here, so each part
    is a short method rather than a free function of ten arguments."""

    def __init__(self, cfg: DictConfig, run_dir: Path, hydra_info: dict, dist: Distributed | None = None):
        """Everything checked before the run folder is made: the settings, the store(s), what each member
        trains, the ranks and the autocast dtype."""
        self.cfg, self.tcfg, self.run_dir, self.hydra_info = cfg, cfg.train, run_dir, hydra_info
        tcfg = cfg.train
        check_train_config(tcfg)
        dist = dist or Distributed(device=resolve_device(tcfg.device))
        self.store = open_store(cfg.store, tcfg)
        self.target = open_target(tcfg, self.store)  # a transcoder's target store, else None
        self.specs = member_specs(cfg, self.store)
        latent_shards.check(self.specs, self.store.d_in, tcfg, dist.world_size, self.target is not None)
        self.dist = latent_shards.split(dist, tcfg.latent_shards)  # replicas x latent shards (dist for 1)
        self.dist.check_batch(tcfg.batch_size)
        self.device = self.dist.device
        self.amp_dtype = autocast_dtype(tcfg.autocast, self.device)  # checked before the run folder is made
        self.resuming = False
        self.members: list[Member] = []
        self.step = self.last_ckpt = 0  # the steps taken, and the step of the last checkpoint
        self.reader_state = None  # the reader's position in the checkpoint resumed from

    # ---- before the first step -------------------------------------------------------------------
    def set_up(self, resuming: bool) -> None:
        """Once the folders are locked and prepared: seed, open the reader, build every member from one
        sample (the input scales come from it)."""
        self.resuming = resuming
        tcfg, dist, device = self.tcfg, self.dist, self.device
        member_class = latent_shards.ShardedMember if tcfg.latent_shards > 1 else Member
        if device.type == "cpu":
            keep_freed_memory()
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        _seed_everything(tcfg.seed)
        # compute: torch build, device, threads: what the last bits depend on
        self.facts = RunFacts(to_container(self.cfg), provenance(self.store), compute_record(device))
        if tcfg.group and dist.is_main:
            record = group_record(self.facts, [n for n, _ in self.specs], dist.world_size)
            write_json_atomic(self.run_dir / layout.CONFIG, record)
        self.reader = self._reader_at()
        d_in = self.store.d_in
        # [N, d_in (+ d_out)]: one sample gives every member its input scale and initial weights
        sample = self.reader.sample(min(tcfg.advanced.init_tokens, self.reader.epoch_rows))
        self.sample, self.sample_y = sample[:, :d_in], sample[:, d_in:]
        for name, sae_cfg in self.specs:
            mdir = self.run_dir / name if name else self.run_dir
            if dist.is_main:
                mdir.mkdir(parents=True, exist_ok=True)
            scale = dist.broadcast_object(input_scale(sae_cfg, self.store, self.sample))
            out = None
            if self.target is not None:  # a transcoder: its target rows get their own scale
                out_scale = dist.broadcast_object(input_scale(sae_cfg, self.target, self.sample_y))
                out = TranscoderTarget(self.target, out_scale)
            self.members.append(member_class(name, mdir, sae_cfg, d_in, tcfg, device, scale, dist, out))

    def _reader_at(self, state=None):
        """The reader of the run's batches, at the position `state` (a checkpoint's) or at the start."""
        tcfg, adv, device = self.tcfg, self.tcfg.advanced, self.device
        if tcfg.stream:
            return stream_reader(
                self.store, tcfg, device.type == "cuda", self.run_dir, self.dist.rank, state=state
            )
        kw = {k: adv[k] for k in ("buffer_rows", "chunk_rows", "prefetch", "read_threads")}  # train.advanced
        kw.update(seed=tcfg.seed, val_tokens=tcfg.val_tokens, device=device, state=state)
        return open_reader(self.store, self.target, tcfg.batch_size, **kw)

    def resume(self) -> None:
        """Each member from the newest checkpoint they all hold (or initialised from the sample), its record
        written and its log opened; the reader moved to where the checkpoint left it."""
        ckpts = [m.checkpoints() for m in self.members]
        step_name = common_step(ckpts, self.resuming, self.run_dir, self.dist)
        for m, found in zip(self.members, ckpts, strict=True):
            self._resume_member(m, None if step_name is None else found[step_name])
        if self.reader_state is not None:
            self.reader.close()
            self.reader = self._reader_at(self.reader_state)

    def _resume_member(self, m: Member, ckpt: Path | None) -> None:
        """Member m from the checkpoint ckpt (None: a fresh start); rank 0 writes its record and opens its log."""
        tcfg, dist = self.tcfg, self.dist
        record = member_record(m, self.facts, self.store.d_in, tcfg, dist)
        old = previous_record(m, record, self.store, tcfg, dist) if self.resuming else {}
        changes = resume_changes(old, self.facts.config, m.run_dir, tcfg.allow_changes)
        if ckpt is not None:
            meta, changed = restore(m, ckpt, record, old, self.facts.compute, dist.world_size)
            if changed and dist.is_main and m is self.members[0]:  # one line for the run
                print(changed, file=sys.stderr, flush=True)
            self.step, self.reader_state = meta["step"], meta["reader"]
        else:
            ys = None if m.target is None else (self.sample_y * m.target.scale).to(self.device)
            m.sae.init_from_data((self.sample * m.input_scale).to(self.device), ys)
        dist.broadcast_module(m.sae)  # every rank starts from rank 0's weights
        if not dist.is_main:
            m.logger = NullLogger()
            return
        record.setdefault("wandb_id", record.get("wandb_id") or uuid.uuid4().hex[:8])
        group_folder = self.run_dir.name if self.tcfg.group else None
        names = wandb_names(self.cfg.logger, m, self.store.hook_name, self.hydra_info, group_folder)
        record["wandb_name"], record["wandb_group"] = names
        if changes or old.get("changes"):
            record["changes"] = change_history(old, changes, self.step)
        write_json_atomic(m.run_dir / layout.CONFIG, record)
        m.logger = open_logger(m, record, self.facts, self.cfg.logger, self.step if self.resuming else None)

    # ---- the loop --------------------------------------------------------------------------------
    def run(self) -> Path:
        """The loop to the planned step and the saved SAEs; the reader is closed and every log finished
        (with the exit code W&B records) however it ends. Returns the run folder."""
        exit_code = 1
        try:
            self._loop()
            exit_code = 0
        finally:
            self.reader.close()
            for m in self.members:
                if m.logger is not None:
                    m.logger.finish(exit_code)
        return self.run_dir

    def _loop(self) -> None:
        """Step to the planned total (or the end of a streamed store), then save the SAEs."""
        tcfg, reader = self.tcfg, self.reader
        self.total = planned_steps(tcfg, reader)
        self.log0 = self.members[0].logger  # where the run-wide events go
        self._announce()
        main = self.dist.is_main  # rank 0 alone validates, evaluates, prints and writes
        self.val_x = reader.validation_rows() if tcfg.val_every > 0 and main else None
        self.loss_rec = None
        if tcfg.eval_every > 0 and main:
            self.loss_rec = LossRecovered(self.store, tcfg, self.device, self.log0, self.target)
        self.epoch, self.last_ckpt, self.rows = reader.epoch, self.step, self.dist.rows(tcfg.batch_size)
        self.clock = Clock(self.step, self.total)
        if getattr(
            reader, "bounded", False
        ):  # caught up with a bounded harvest: checkpoint so it may free shards
            reader.on_wait = self._caught_up
        while self.step < self.total:
            x_BD = reader.next_batch()
            if x_BD is None:  # a streamed store that ended (its data ran out) before the planned steps
                message = f"the store is complete and read: stopping at step {self.step} of {self.total}"
                self.log0.event(self.step, message, True)
                if self.dist.saves_checkpoints:
                    self._save_checkpoints()
                break
            scale = self._train_step(x_BD)
            last = self.step == self.total
            if self.step % tcfg.log_every == 0 or last:
                self._log(scale)
            t_side = time.perf_counter()  # validation, evaluation and checkpoints do not count in tokens/s
            self._evaluate(last)
            self._checkpoint(last)
            for m in self.members:
                m.stats.t0 += time.perf_counter() - t_side
            self._stop_if_asked(last)
        self._finish()

    def _announce(self) -> None:
        """The events a run starts with: resuming, each member's learning rate and dead threshold (and where
        they come from), and how many passes over the store the planned tokens make."""
        tcfg, step, reader = self.tcfg, self.step, self.reader
        if self.resuming:
            message = f"resuming at step {step}/{self.total} (pass {reader.epoch + 1} over the store)"
            self.log0.event(step, message, True)
        for m in self.members:
            why = "train.lr"
            if tcfg.lr is None:
                scale = type(m.sae).default_lr_scale
                why = f"train.lr not given: {scale:g} x 2e-4 / sqrt(d_sae / 2**14), d_sae={m.sae.d_sae}"
            m.logger.event(step, f"peak learning rate {m.lr:.4g} ({why})")
            unset = "" if tcfg.dead_tokens is not None else " not given: the SAE's default"
            m.logger.event(step, f"dead after {m.dead_tokens:,} silent tokens (train.dead_tokens{unset})")
        if step == 0 and not tcfg.stream and self.total * tcfg.batch_size > reader.epoch_rows:
            passes = self.total * tcfg.batch_size / reader.epoch_rows
            message = (
                f"train.total_tokens={tcfg.total_tokens} is {passes:.2f} passes over the store's "
                f"{reader.epoch_rows} training rows"
            )
            self.log0.event(0, message, True)

    def _train_step(self, x_BD: torch.Tensor) -> float:
        """Every member steps on this rank's rows of the global batch; returns the sparsity coefficient's scale."""
        tcfg, step = self.tcfg, self.step
        x_BD = x_BD[self.rows].to(self.device, non_blocking=True)
        lr, scale = lr_at(step, self.total, tcfg, 1.0), sparsity_scale_at(step, tcfg)  # lr: schedule factor
        try:
            for m in self.members:
                m.train_step(x_BD, step, lr * m.lr, scale, tcfg, self._autocast)
        except Exception:  # a failure after a non-finite step is reported as that step
            self._check_finite()
            raise
        self.step += 1
        if self.reader.epoch != self.epoch:
            self.epoch = self.reader.epoch
            self.log0.event(self.step, f"starting pass {self.epoch + 1} over the store", True)
        return scale

    def _autocast(self):
        amp_dtype = self.amp_dtype
        return torch.autocast(
            self.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None
        )

    def _log(self, sparsity_scale: float) -> None:
        """Each member's window means: logged, and printed on rank 0 with the clock."""
        tcfg, step = self.tcfg, self.step
        self._check_finite()  # the one host sync of the finiteness checks (per log line)
        for m in self.members:
            rec = {
                **m.stats.summary(),
                "lr": m.opt.param_groups[0]["lr"],  # what the optimizer used
                "sparsity_coefficient": sparsity_scale,
                "tokens": step * tcfg.batch_size,
            }
            if self.reader.epoch_rows:
                rec["epoch"] = step * tcfg.batch_size / self.reader.epoch_rows
            m.logger.log(step, rec)
            if self.dist.is_main:
                print(f"{progress_line(m.name, step, self.total, rec)} | {self.clock.line(step)}", flush=True)

    def _evaluate(self, last: bool) -> None:
        """Validation and loss recovered when due (and at the last step), on the whole SAEs."""
        tcfg, step = self.tcfg, self.step
        due_val = tcfg.val_every > 0 and (step % tcfg.val_every == 0 or last)
        due_eval = tcfg.eval_every > 0 and (step % tcfg.eval_every == 0 or last)
        # the whole SAEs on rank 0 (latent shards are gathered: every rank takes part; else the members)
        views = [m.for_evaluation() for m in self.members] if due_val or due_eval else []
        if self.val_x is not None and self.val_x.numel() and due_val:
            for v in views:
                v.logger.show(step, validate(v, self.val_x, tcfg.batch_size, self.device))
        if self.loss_rec is not None and due_eval:
            for v in views:
                self.loss_rec(v, step)

    def _checkpoint(self, last: bool) -> None:
        """A checkpoint each time the tokens cross a multiple of `checkpoint_every_tokens`, and at the end."""
        tcfg, step = self.tcfg, self.step
        every = tcfg.checkpoint_every_tokens
        if last or (every > 0 and step * tcfg.batch_size // every > (step - 1) * tcfg.batch_size // every):
            self._check_finite()  # never a checkpoint with non-finite weights (every rank checks)
            if self.dist.saves_checkpoints:  # rank 0, or replica 0's rank of each latent shard
                self._save_checkpoints()
            elif tcfg.stream:
                self.reader.checkpointed()
            self.last_ckpt = step

    def _save_checkpoints(self) -> None:
        """The reader's position is that of the global batch stream every rank reads (one state for all)."""
        step, tcfg = self.step, self.tcfg
        for m in self.members:  # all members first, then prune: a kill in between leaves a common step
            meta = {
                "tokens": step * tcfg.batch_size,
                "reader": self.reader.state(),
                "input_scale": m.input_scale,
            }
            meta["world_size"], meta["compute"] = self.dist.world_size, self.facts.compute
            extra = {**m.rng, "since_fired_F": m.stats.since_fired_F}
            checkpoint.save(m.checkpoint_root, step, m.sae, m.opt, meta, extra)
        for m in self.members:
            checkpoint.prune(m.checkpoint_root, max(tcfg.keep_checkpoints, m.min_keep))
        if tcfg.stream:
            self.reader.checkpointed()  # a bounded store may now delete the shards before this checkpoint's window

    def _caught_up(self) -> None:
        """The reader waits for a bounded harvest: checkpoint now (once per step) so it may free shards."""
        if self.dist.saves_checkpoints and self.last_ckpt != self.step:
            self._save_checkpoints()
            self.last_ckpt = self.step
        self.reader.checkpointed()

    def _stop_if_asked(self, last: bool) -> None:
        """`train.advanced.stop_after_steps`: stop as a killed run would, once every rank's checkpoint is on disk."""
        stop_after = self.tcfg.advanced.stop_after_steps
        if stop_after is not None and self.step >= stop_after and not last:
            self.dist.barrier()  # the checkpoint is on disk before any rank exits
            raise StopRequested(
                f"stopped after step {self.step} (train.advanced.stop_after_steps); "
                f"last checkpoint at step {self.last_ckpt}"
            )

    def _finish(self) -> None:
        """Each member's SAE saved with the input scale folded in (and logged as a W&B artifact)."""
        store = self.store
        views = [
            m.for_evaluation() for m in self.members
        ]  # latent shards are gathered into one SAE on rank 0
        for m in views if self.dist.is_main else ():
            saved = save_final(m, store)
            print(f"saved {saved}", flush=True)
            metadata = {
                "arch": m.sae_cfg.arch,
                "hook": store.hook_name,
                "d_in": store.d_in,
                "step": self.step,
            }
            m.logger.log_sae(saved, metadata)
        if self.tcfg.stream:
            self.reader.finished()  # a bounded harvest may delete every shard this run kept
        self.dist.barrier()

    def _check_finite(self) -> None:
        for m in self.members:
            m.check_finite()
