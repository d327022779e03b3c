"""sae-train: stream an activation store and train one SAE, or a sweep group sharing each batch.

    sae-train store=runs/stores/smollm2-135m/shakespeare/blocks.9.hook_resid_post sae=topk sae.k=64
    sae-train -m sae=relu sae.l1_coefficient=1,3,10 store=...                # one job per value
    sae-train store=... 'train.group=[{l1_coefficient:1},{l1_coefficient:3}]' # one pass, two SAEs
    sae-train store=... train.run_dir=runs/train/my-run train.resume=true      # continue a run

The store's manifest gives the model, hook and d_in. Each SAE gets a run folder (see `paths`):
config.json, checkpoints/step-*/ (exact resume), train_log.jsonl, wandb/, and at the end sae/
whose weights take raw activations (the input scale is folded in). A group member's folder is
<run>/<member>/ and its result equals a separate run with the same seed.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from sae_pipeline import checkpoint, paths
from sae_pipeline.config import register_configs, to_container
from sae_pipeline.errors import UserError, report_user_errors
from sae_pipeline.models import resolve_device
from sae_pipeline.reader import ShuffledReader
from sae_pipeline.runlog import LatentStats, RunLogger
from sae_pipeline.runtime import keep_freed_memory
from sae_pipeline.sae import build_sae, save_sae
from sae_pipeline.store import ActivationStore, write_json_atomic
from sae_pipeline.train_config import lr_at, member_specs, sparsity_scale_at
from sae_pipeline.train_eval import LossRecovered, validate


class StopRequested(RuntimeError):
    """Raised after `train.stop_after_steps` (a debug key that simulates a killed run)."""


def _adam(params, lr: float, betas, eps: float) -> torch.optim.Adam:
    """Adam with its fused kernel where this torch build has one (same maths, fewer passes)."""
    try:
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, foreach=True)


class Member:
    """One SAE being trained: its model, optimizer, statistics, RNG stream and log sinks."""

    def __init__(self, name: str, run_dir: Path, sae_cfg, d_in: int, tcfg, device, input_scale: float):
        self.name, self.run_dir, self.sae_cfg, self.input_scale = name, run_dir, sae_cfg, input_scale
        torch.manual_seed(tcfg.seed)  # every member starts from the RNG state a separate run has
        self.sae = build_sae(sae_cfg, d_in, seed=tcfg.seed).to(device)
        self.params = [p for p in self.sae.parameters() if p.requires_grad]
        betas = (tcfg.adam_beta1, tcfg.adam_beta2)
        self.opt = _adam(self.params, tcfg.lr, betas, tcfg.adam_eps)
        self.stats = LatentStats(self.sae.d_sae, tcfg.dead_tokens, device)
        self.rng = checkpoint.rng_state()[0]
        self.logger: RunLogger | None = None

    def train_step(self, x_BD, step: int, lr: float, sparsity_scale: float, tcfg, autocast) -> None:
        checkpoint.set_rng_state(self.rng, {})
        for group in self.opt.param_groups:
            group["lr"] = lr
        xs_BD = x_BD * self.input_scale if self.input_scale != 1.0 else x_BD
        with autocast():
            out = self.sae.training_forward(
                xs_BD, sparsity_scale=sparsity_scale, dead_mask_F=self.stats.dead_mask_F()
            )
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        self.sae.before_optimizer_step()
        check = out.loss.detach().float()
        if tcfg.max_grad_norm > 0:
            check = check + torch.nn.utils.clip_grad_norm_(self.params, tcfg.max_grad_norm)
        if not torch.isfinite(check).item():
            last = checkpoint.latest(self.run_dir)
            kept = (
                f"the last good checkpoint {last} is kept" if last else "no checkpoint had been written yet"
            )
            raise UserError(
                f"the loss of {self.name or 'the SAE'} became {float(out.loss.detach()):g} (or its gradient non-finite) at step "
                f"{step + 1}, so training stopped; {kept} (lower train.lr or check the store for inf/nan activations)"
            )
        self.opt.step()
        self.sae.after_optimizer_step()
        acts_BF, x_hat_BD = out.acts_BF, out.x_hat_BD
        if acts_BF is None or x_hat_BD is None:
            with torch.no_grad():
                acts_BF = self.sae.encode(xs_BD)
                x_hat_BD = self.sae.decode(acts_BF)
        self.stats.update(xs_BD, x_hat_BD, acts_BF, out.loss, out.parts, self.input_scale)
        self.rng = checkpoint.rng_state()[0]

    def folded(self):
        """A copy that takes raw activations (the input scale folded into the weights)."""
        import copy

        sae = copy.deepcopy(self.sae).float()
        if self.input_scale != 1.0:
            sae.fold_input_scale(self.input_scale)
        return sae


# ---- configuration --------------------------------------------------------------------------
def _hydra_info() -> dict:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except ValueError:  # run() called without Hydra (tests, notebooks)
        return {}
    multirun = hc.mode == RunMode.MULTIRUN
    return {
        "output_dir": hc.runtime.output_dir,
        "overrides": hc.job.override_dirname,
        "sweep": Path(hc.sweep.dir).name if multirun else None,
    }


def _run_dir(cfg: DictConfig, hydra_info: dict) -> Path:
    if cfg.train.run_dir:
        return Path(cfg.train.run_dir).expanduser().resolve()
    if hydra_info:
        return Path(hydra_info["output_dir"]).resolve()
    raise UserError("train.run_dir is not set and no Hydra output folder exists; pass train.run_dir=<folder>")


def _prepare_run_dir(run_dir: Path, tcfg) -> bool:
    """True when this run continues one found in run_dir; refuses to clobber a run by accident."""
    has_run = (run_dir / paths.RUN_CONFIG).exists()
    if has_run and tcfg.resume:
        return True
    if has_run and not tcfg.overwrite:
        raise UserError(
            f"the run folder {run_dir} already holds a run; pass train.resume=true to continue it, "
            "train.overwrite=true to replace it, or choose another train.run_dir"
        )
    if has_run:  # overwrite: keep Hydra's own files, remove the previous run
        for entry in run_dir.iterdir():
            if entry.name != ".hydra" and not entry.name.endswith(".log"):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    return False


def _check_resumable(member_dir: Path, record: dict, store: ActivationStore) -> dict:
    """The run's recorded config.json, once checked against what this resume would train."""
    old = json.loads((member_dir / paths.RUN_CONFIG).read_text())
    if old.get("d_in") != store.d_in:
        raise UserError(
            f"the run {member_dir} was trained on d_in={old.get('d_in')} but the store {store.folder} has "
            f"d_in={store.d_in}; resume it with its own store or start a new run"
        )
    if old.get("sae") != record["sae"]:
        raise UserError(
            f"the run {member_dir} was started with other sae settings {old.get('sae')}; resume with the same ones"
        )
    if old.get("store_manifest_sha256") != record["store_manifest_sha256"]:
        raise UserError(
            f"the store {store.folder} changed since the run {member_dir} started (its manifest hash differs)"
        )
    return old


def _input_scale(sae_cfg, store: ActivationStore, sample_ND) -> float:
    if not sae_cfg.normalize_input:
        return 1.0
    mean = (store.manifest.get("norm_stats") or {}).get("mean")
    if not mean:
        mean = sample_ND.norm(dim=-1).mean().item()
    if not (mean > 0 and math.isfinite(mean)):
        raise UserError(
            f"the store {store.folder} has activation mean norm {mean}, so inputs cannot be normalised"
        )
    return math.sqrt(store.d_in) / mean


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


# ---- the run --------------------------------------------------------------------------------
def run(cfg: DictConfig) -> Path:
    """Train the SAE(s) described by cfg; returns the run folder."""
    tcfg = cfg.train
    store = ActivationStore(Path(cfg.store).expanduser())
    store_path = str(store.folder.resolve())
    hydra_info = _hydra_info()
    run_dir = _run_dir(cfg, hydra_info)
    specs = member_specs(cfg, store)
    resuming = _prepare_run_dir(run_dir, tcfg)
    device = resolve_device(tcfg.device)
    if device.type == "cpu":
        keep_freed_memory()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    _seed_everything(tcfg.seed)
    container = to_container(cfg)
    manifest_hash = store.manifest_hash()
    group_mode = bool(tcfg.group)
    if group_mode:
        write_json_atomic(
            run_dir / paths.RUN_CONFIG,
            {
                "config": container,
                "store": store_path,
                "store_manifest_sha256": manifest_hash,
                "group": [n for n, _ in specs],
            },
        )
    reader = ShuffledReader(
        store, tcfg.batch_size, seed=tcfg.seed, val_tokens=tcfg.val_tokens, buffer_rows=tcfg.buffer_rows,
        chunk_rows=tcfg.chunk_rows, prefetch=tcfg.prefetch, pin_memory=device.type == "cuda",
    )  # fmt: skip
    sample = reader.sample(min(tcfg.init_tokens, reader.epoch_rows))
    members: list[Member] = []
    for name, sae_cfg in specs:
        mdir = run_dir / name if name else run_dir
        mdir.mkdir(parents=True, exist_ok=True)
        members.append(
            Member(name, mdir, sae_cfg, store.d_in, tcfg, device, _input_scale(sae_cfg, store, sample))
        )

    # ---- fresh start or resume ----
    ckpts = [{p.name: p for p in checkpoint.list_checkpoints(m.run_dir)} for m in members]
    common = sorted(set.intersection(*(set(c) for c in ckpts))) if resuming else []
    if resuming and not common and any(ckpts):
        raise UserError(
            f"the members of the run {run_dir} share no checkpoint step, so it cannot be resumed exactly; "
            "resume with the same train.group or pass train.overwrite=true"
        )
    start_step, reader_state, exit_code = 0, None, 1
    for m, found in zip(members, ckpts, strict=True):
        record = {
            "config": container, "store": store_path, "store_manifest_sha256": manifest_hash, "arch": m.sae_cfg.arch,
            "d_in": store.d_in, "d_sae": m.sae.d_sae, "sae": asdict(m.sae_cfg), "member": m.name,
            "hook": store.hook_name, "model": store.manifest.get("model"), "input_scale": m.input_scale,
        }  # fmt: skip
        if resuming and (m.run_dir / paths.RUN_CONFIG).exists():
            record["wandb_id"] = _check_resumable(m.run_dir, record, store).get("wandb_id")
        if common:
            meta, extra = checkpoint.load(found[common[-1]], m.sae, m.opt)
            m.rng = {k: v for k, v in extra.items() if k.startswith("rng_")}
            m.stats.since_fired_F.copy_(extra["since_fired_F"])
            start_step, reader_state = meta["step"], meta["reader"]
        else:
            m.sae.init_from_data((sample * m.input_scale).to(device))
        record.setdefault("wandb_id", record.get("wandb_id") or uuid.uuid4().hex[:8])
        write_json_atomic(m.run_dir / paths.RUN_CONFIG, record)
        base_name = cfg.logger.name or hydra_info.get("overrides") or run_dir.name
        m.logger = RunLogger(
            m.run_dir, {**container, "member": m.name, "sae": record["sae"]}, cfg.logger,
            name=f"{base_name}/{m.name}" if m.name else base_name,
            group=cfg.logger.group or hydra_info.get("sweep") or (run_dir.name if group_mode else None),
            wandb_id=record["wandb_id"], resume_step=start_step if resuming else None,
        )  # fmt: skip
    if reader_state is not None:
        reader.close()
        reader = ShuffledReader(
            store, tcfg.batch_size, seed=tcfg.seed, val_tokens=tcfg.val_tokens, buffer_rows=tcfg.buffer_rows,
            chunk_rows=tcfg.chunk_rows, prefetch=tcfg.prefetch, pin_memory=device.type == "cuda", state=reader_state,
        )  # fmt: skip
    try:
        _train_loop(members, reader, store, tcfg, device, autocast, start_step, resuming)
        exit_code = 0
    finally:
        reader.close()
        for m in members:
            if m.logger is not None:
                m.logger.finish(exit_code)
    return run_dir


def _train_loop(members, reader, store, tcfg, device, autocast, step: int, resuming: bool) -> None:
    total_steps = max(1, tcfg.total_tokens // tcfg.batch_size)
    log0 = members[0].logger
    if resuming:
        log0.event(step, f"resuming at step {step}/{total_steps} (pass {reader.epoch + 1} over the store)")
    if step == 0 and total_steps * tcfg.batch_size > reader.epoch_rows:
        passes = total_steps * tcfg.batch_size / reader.epoch_rows
        log0.event(
            0,
            f"train.total_tokens={tcfg.total_tokens} is {passes:.2f} passes over the store's {reader.epoch_rows} training rows",
        )
    val_x = reader.validation_rows() if tcfg.val_every > 0 else None
    loss_rec = LossRecovered(store, tcfg, device, log0) if tcfg.eval_every > 0 else None
    epoch, last_ckpt = reader.epoch, step
    while step < total_steps:
        x_BD = reader.next_batch().to(device, non_blocking=True)
        lr, scale = lr_at(step, total_steps, tcfg), sparsity_scale_at(step, tcfg)
        for m in members:
            m.train_step(x_BD, step, lr, scale, tcfg, autocast)
        step += 1
        if reader.epoch != epoch:
            epoch = reader.epoch
            log0.event(step, f"starting pass {epoch + 1} over the store")
        last = step == total_steps
        if step % tcfg.log_every == 0 or last:
            for m in members:
                rec = {
                    **m.stats.summary(),
                    "lr": lr,
                    "sparsity_coefficient": scale,
                    "tokens": step * tcfg.batch_size,
                }
                rec["epoch"] = step * tcfg.batch_size / reader.epoch_rows
                m.logger.log(step, rec)
                print(_progress(m, step, total_steps, rec), flush=True)
        t_side = time.perf_counter()  # validation, evaluation and checkpoints do not count in tokens/s
        if val_x is not None and val_x.numel() and (step % tcfg.val_every == 0 or last):
            for m in members:
                m.logger.log(step, validate(m, val_x, tcfg.batch_size, device))
        if loss_rec is not None and (step % tcfg.eval_every == 0 or last):
            for m in members:
                loss_rec(m, step)
        every = tcfg.checkpoint_every_tokens
        if last or (every > 0 and step * tcfg.batch_size // every > (step - 1) * tcfg.batch_size // every):
            _save_checkpoints(members, step, reader, tcfg)
            last_ckpt = step
        for m in members:
            m.stats.t0 += time.perf_counter() - t_side
        if tcfg.stop_after_steps is not None and step >= tcfg.stop_after_steps and not last:
            raise StopRequested(
                f"stopped after step {step} (train.stop_after_steps); last checkpoint at step {last_ckpt}"
            )
    for m in members:
        _save_final(m, store)


def _save_checkpoints(members, step: int, reader, tcfg) -> None:
    for m in members:  # all members first, then prune: a kill in between leaves a common step
        meta = {"tokens": step * tcfg.batch_size, "reader": reader.state(), "input_scale": m.input_scale}
        checkpoint.save(
            m.run_dir, step, m.sae, m.opt, meta, {**m.rng, "since_fired_F": m.stats.since_fired_F}
        )
    for m in members:
        checkpoint.prune(m.run_dir, tcfg.keep_checkpoints)


def _save_final(m: Member, store: ActivationStore) -> None:
    out = m.run_dir / paths.FINAL_SAE
    tmp = paths.tmp_name(out)
    shutil.rmtree(tmp, ignore_errors=True)
    extra = {
        "store": str(store.folder.resolve()),
        "store_manifest_sha256": store.manifest_hash(),
        "hook": store.hook_name,
        "model": store.manifest.get("model"),
        "input_scale_folded": m.input_scale,
    }
    save_sae(m.folded().cpu(), tmp, extra=extra)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"saved {out}", flush=True)


def _progress(m: Member, step: int, total: int, rec: dict) -> str:
    who = f"[{m.name}] " if m.name else ""
    return (
        f"{who}step {step}/{total} loss {rec['loss']:.4g} mse {rec['mse']:.4g} fvu {rec['fvu']:.3f} "
        f"l0 {rec['l0']:.1f} dead {rec['dead_latents']} lr {rec['lr']:.2e} {rec['tokens_per_s']:.0f} tok/s"
    )


register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@report_user_errors
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except StopRequested as stop:
        print(stop, flush=True)


if __name__ == "__main__":
    main()
