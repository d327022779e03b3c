"""Where a training run's records go: `<run>/train_log.jsonl` always, and W&B when `logger.wandb` is on
(offline, under `<run>/wandb/`, unless WANDB_API_KEY is set or `logger.mode=online`)."""

from __future__ import annotations

import json
from pathlib import Path

from sae_pipeline import layout
from sae_pipeline.tracking import log_sae_artifact, start_wandb


class RunLogger:
    """JSON lines + optional W&B for one run folder; `finish()` closes both."""

    def __init__(
        self,
        run_dir: Path,
        config: dict,
        logger_cfg,
        name: str,
        group: str | None,
        wandb_id: str | None,
        resume_step: int | None = None,
    ):
        self.path = Path(run_dir) / layout.TRAIN_LOG
        if resume_step is not None and self.path.exists():  # drop lines logged after the checkpoint
            keep = [ln for ln in self.path.read_text().splitlines() if _step(ln) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        self.file = open(self.path, "a")
        self.run = None
        self.log_artifact = bool(logger_cfg.log_artifact)
        if logger_cfg.wandb:
            self.run = start_wandb(logger_cfg, run_dir, name, group, config, id=wandb_id, resume="allow")

    def log(self, step: int, metrics: dict) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_sae(self, sae_dir: Path, metadata: dict) -> None:
        """The final SAE as a W&B artifact `sae-<run id>` (unless `logger.log_artifact=false`)."""
        if self.run is not None and self.log_artifact:
            log_sae_artifact(self.run, sae_dir, f"sae-{self.run.id}", metadata)

    def event(self, step: int, message: str) -> None:
        """A notable event (new pass over the store, skipped evaluation...): printed and logged."""
        print(f"[step {step}] {message}", flush=True)
        self.file.write(json.dumps({"step": step, "event": message}) + "\n")
        self.file.flush()

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None
        self.file.close()


def _step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 1 << 62


class NullLogger:
    """What the ranks other than 0 of a data-parallel job log to: nothing."""

    def log(self, step: int, metrics: dict) -> None:
        pass

    def event(self, step: int, message: str) -> None:
        pass

    def log_sae(self, sae_dir: Path, metadata: dict) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass
