"""What a run records about each member: its config.json (what a resume is checked against and what later
stages read), its W&B name and group, and the log it writes to. A group's folder gets a record of its own
naming the members."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sae_pipeline import layout
from sae_pipeline.tracking import run_name
from sae_pipeline.training import latent_shards
from sae_pipeline.training.run_folder import check_resumable
from sae_pipeline.training.runlog import RunLogger
from sae_pipeline.training.transcoder import check_target_resumable


@dataclass(frozen=True)
class RunFacts:
    """What every record of a run shares: the resolved config, the store's provenance, the compute."""

    config: dict
    origin: dict
    compute: dict


def group_record(facts: RunFacts, names: list[str], world_size: int) -> dict:
    """config.json of a sweep group's folder: the run's facts and its members' names."""
    return {
        "config": facts.config,
        **facts.origin,
        "group": names,
        "world_size": world_size,
        "compute": facts.compute,
    }


def member_record(m, facts: RunFacts, d_in: int, tcfg, dist) -> dict:
    """config.json of member m as this run starts it (a resume adds its W&B id and histories)."""
    record = {
        "config": facts.config,
        **facts.origin,
        "arch": m.sae_cfg.arch,
        "d_in": d_in,
        "d_sae": m.sae.d_sae,
        "sae": asdict(m.sae_cfg),
        "member": m.name,
        "input_scale": m.input_scale,
        "lr": m.lr,
        "world_size": dist.world_size,
        "compute": facts.compute,
        **(m.target.record() if m.target is not None else {}),
    }
    if tcfg.latent_shards > 1:
        record.update(latent_shards=tcfg.latent_shards, processes=dist.processes)
    return record


def previous_record(m, record: dict, store, tcfg, dist) -> dict:
    """The config.json of the run being resumed ({} if it has none), once checked against this run's record,
    whose W&B id it carries over."""
    if not (m.run_dir / layout.CONFIG).exists():
        return {}
    old = check_resumable(m.run_dir, record, store)
    latent_shards.check_layout(old, m.run_dir, tcfg, dist)
    check_target_resumable(m.run_dir, m.target)
    record["wandb_id"] = old.get("wandb_id")
    return old


def wandb_names(logger_cfg, m, hook_name: str, hydra_info: dict, group_folder: str | None) -> tuple:
    """(W&B name, W&B group) of member m: `logger.name` or one made of the arch, hook and overrides (a group
    member's with its name appended); `logger.group`, else the Hydra sweep's name, else the group's folder."""
    base_name = logger_cfg.name or run_name(m.sae_cfg.arch, hook_name, hydra_info.get("overrides"))
    name = f"{base_name}/{m.name}" if m.name else base_name
    return name, logger_cfg.group or hydra_info.get("sweep") or group_folder


def open_logger(m, record: dict, facts: RunFacts, logger_cfg, resume_step: int | None) -> RunLogger:
    """Member m's log (train_log.jsonl, and W&B under the names and id its record holds)."""
    wandb_config = {
        **facts.config,
        **facts.origin,
        "member": m.name,
        "sae": record["sae"],
        "arch": m.sae_cfg.arch,
        "d_in": record["d_in"],
        "d_sae": m.sae.d_sae,
    }
    return RunLogger(
        m.run_dir,
        wandb_config,
        logger_cfg,
        name=record["wandb_name"],
        group=record["wandb_group"],
        wandb_id=record["wandb_id"],
        resume_step=resume_step,
        member=m.name,
    )
