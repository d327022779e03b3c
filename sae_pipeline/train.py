"""sae-train: stream an activation store and train one SAE, or a sweep group sharing each batch.

    sae-train store=runs/stores/smollm2-135m/shakespeare/blocks.9.hook_resid_post sae=topk sae.k=64
    sae-train -m sae=relu sae.l1_coefficient=1,3,10 store=...                # one job per value
    sae-train store=... 'train.group=[{l1_coefficient:1},{l1_coefficient:3}]' # one pass, two SAEs
    sae-train store=... train.run_dir=runs/train/my-run train.resume=true      # continue a run
    torchrun --standalone --nproc_per_node=2 $(which sae-train) store=... train.run_dir=runs/train/ddp
                                            # data-parallel: same SAE, batch split over 2 processes
    sae-train store=<MLP input store> train.target_store=<MLP output store> sae=topk sae.skip=true
                                            # a (skip) transcoder: predicts the target hook's activations

The store's manifest gives the model, hook and d_in. Each SAE gets a run folder (see `paths`):
config.json, checkpoints/step-*/ (exact resume), train_log.jsonl, wandb/, and at the end sae/
whose weights take raw activations (the input scale is folded in). A group member's folder is
<run>/<member>/ and its result equals a separate run with the same seed.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from sae_pipeline import layout
from sae_pipeline.errors import report_config_errors, report_user_errors
from sae_pipeline.schema import register_configs
from sae_pipeline.training import distributed
from sae_pipeline.training.trainer import StopRequested, train


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
    """train.run_dir, else a multirun job's own folder, else a new folder under paths.train."""
    if cfg.train.run_dir:
        return Path(cfg.train.run_dir).expanduser().resolve()
    if hydra_info.get("sweep"):
        return Path(hydra_info["output_dir"]).resolve()
    return (Path(cfg.paths.train) / layout.train_run_name(cfg.sae.arch)).expanduser().resolve()


def run(cfg: DictConfig) -> Path:
    """Train the SAE(s) described by cfg; returns the run folder.

    Under torchrun (or srun with one task per GPU) every rank calls this with the same config and joins
    one data-parallel job; rank 0's run folder wins."""
    info = _hydra_info()
    dist = distributed.from_env(cfg.train.device)
    try:
        return train(cfg, dist.broadcast_object(_run_dir(cfg, info)), info, dist)
    finally:
        dist.close()


register_configs()


@report_config_errors  # outside hydra.main: an override it cannot compose is one line too
@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@report_user_errors
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except StopRequested as stop:
        print(stop, flush=True)


if __name__ == "__main__":
    main()
