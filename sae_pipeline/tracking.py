"""Weights & Biases start-up, shared by every stage that logs a run.

W&B runs offline (a real run folder, uploadable later with `wandb sync`) unless WANDB_API_KEY is set
or `logger.mode=online`; it never prompts and never prints its banner.
"""

from __future__ import annotations

import os

from sae_pipeline.errors import check_choice
from sae_pipeline.schema.common import LOGGER_MODES


def wandb_mode(mode: str) -> str:
    check_choice("logger.mode", mode, LOGGER_MODES)
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE")
    if env in ("offline", "online", "disabled"):
        return env
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def start_wandb(logger_cfg, folder, name: str, group: str | None, config: dict, **kwargs):
    """A new W&B run writing under `folder`, configured from the `logger` group."""
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    import wandb

    return wandb.init(
        project=logger_cfg.project,
        entity=logger_cfg.entity,
        mode=wandb_mode(logger_cfg.mode),
        dir=str(folder),
        name=name,
        group=group,
        tags=list(logger_cfg.tags),
        config=config,
        reinit="create_new",
        settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
        **kwargs,
    )


def run_name(arch: str, hook: str, overrides: str | None) -> str:
    """`<arch>-<hook>-<key overrides>`: what a W&B table shows for a training run (`sae=<arch>` not repeated)."""
    keys = [o for o in (overrides or "").split(",") if o and not o.startswith("sae=")]
    return "-".join([arch, hook, *([",".join(keys)] if keys else [])])


def log_sae_artifact(run, sae_dir, name: str, metadata: dict) -> None:
    """The saved SAE folder as a W&B `model` artifact (files referenced in place, not copied)."""
    import wandb

    artifact = wandb.Artifact(name=name, type="model", metadata=metadata)
    artifact.add_dir(str(sae_dir), policy="immutable")
    run.log_artifact(artifact, aliases=["final"])


def training_wandb(record: dict) -> dict | None:
    """{id, name, group, last_step} of the W&B run that trained a run folder (its config.json), or None."""
    logger = (record.get("config") or {}).get("logger") or {}
    if not (logger.get("wandb") and record.get("wandb_id")):
        return None
    return {k: record.get(f"wandb_{k}") for k in ("id", "name", "group", "last_step")}
