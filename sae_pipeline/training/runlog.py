"""Where a training run's records go: `<run>/train_log.jsonl` always, and W&B when `logger.wandb` is on
(offline, under `<run>/wandb/`, unless WANDB_API_KEY is set or `logger.mode=online`); and the printed
progress line with its clock."""

from __future__ import annotations

import json
import time
from pathlib import Path

from sae_pipeline import layout
from sae_pipeline.progress import duration
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
        member: str = "",
    ):
        self.prefix = f"[{member}] " if member else ""  # a sweep group's printed lines name their member
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

    def show(self, step: int, metrics: dict) -> None:
        """Measurements taken during training (validation, loss recovered): logged, and printed in one line."""
        self.log(step, metrics)
        print(f"{self.prefix}step {step} {measured_line(metrics)}", flush=True)

    def log_sae(self, sae_dir: Path, metadata: dict) -> None:
        """The final SAE as a W&B artifact `sae-<run id>` (unless `logger.log_artifact=false`)."""
        if self.run is not None and self.log_artifact:
            log_sae_artifact(self.run, sae_dir, f"sae-{self.run.id}", metadata)

    def event(self, step: int, message: str, run_wide: bool = False) -> None:
        """A notable event (new pass over the store, skipped evaluation...): printed and logged. The line names
        the member of a sweep group unless the event is the whole run's (logged in the first member's log)."""
        print(f"{'' if run_wide else self.prefix}[step {step}] {message}", flush=True)
        self.file.write(json.dumps({"step": step, "event": message}) + "\n")
        self.file.flush()

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None
        self.file.close()


def measured_line(metrics: dict) -> str:
    """val/* and eval/* records as the printed line: `val mse 1.2e+04 fvu 0.183 l0 32.0`, `eval loss recovered
    0.979 ce +0.122 nats kl 0.310`."""
    parts = []
    if "val/fvu" in metrics:
        parts.append(
            f"val mse {metrics['val/mse']:.4g} fvu {metrics['val/fvu']:.4f} l0 {metrics['val/l0']:.1f}"
        )
    if "eval/loss_recovered" in metrics:
        parts.append(f"eval loss recovered {metrics['eval/loss_recovered']:.4f}")
    if "eval/ce_increase" in metrics:
        parts.append(f"ce {metrics['eval/ce_increase']:+.4f} nats")
    if "eval/kl" in metrics:
        parts.append(f"kl {metrics['eval/kl']:.4f}")
    return " ".join(parts)


def progress_line(member: str, step: int, total: int, rec: dict) -> str:
    """The printed line of one log record: `[member] step 8/64 loss ... tok/s` (the member named in a group)."""
    who = f"[{member}] " if member else ""
    return (
        f"{who}step {step}/{total} loss {rec['loss']:.4g} mse {rec['mse']:.4g} fvu {rec['fvu']:.3f} "
        f"l0 {rec['l0']:.1f} dead {rec['dead_latents']} lr {rec['lr']:.2e} {rec['tokens_per_s']:.0f} tok/s"
    )


class Clock:
    """Elapsed time since this process started training and the ETA at the rate of its steps so far."""

    def __init__(self, first_step: int, total_steps: int):
        self.first, self.total, self.start = first_step, total_steps, time.perf_counter()

    def line(self, step: int) -> str:
        elapsed = time.perf_counter() - self.start
        done = step - self.first
        eta = duration(elapsed / done * (self.total - step)) if done > 0 else "?"
        return f"elapsed {duration(elapsed)} | ETA {eta}"


def _step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 1 << 62


class NullLogger:
    """What the ranks other than 0 of a data-parallel job log to: nothing."""

    def log(self, step: int, metrics: dict) -> None:
        pass

    def event(self, step: int, message: str, run_wide: bool = False) -> None:
        pass

    def show(self, step: int, metrics: dict) -> None:
        pass

    def log_sae(self, sae_dir: Path, metadata: dict) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass
