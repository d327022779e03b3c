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
