"""What a training run reports: per-latent firing statistics, and the log sinks (JSON lines + W&B).

Every record goes to `<run>/train_log.jsonl` (always) and to W&B when `logger.wandb` is on.
W&B runs offline (a real run folder under `<run>/wandb/`, uploadable with `wandb sync`) unless
WANDB_API_KEY is set or `logger.mode=online`; it never prompts.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from sae_pipeline import paths
from sae_pipeline.errors import UserError
from sae_pipeline.train_config import LOGGER_MODES


class LatentStats:
    """Running training statistics of one SAE.

    `since_fired_F` counts tokens since each latent last fired (dead = >= dead_tokens; it is part
    of the checkpoint so resumed runs mark the same latents dead). The window sums are reset at
    every log line; dense latents fire on more than 10% of the window's tokens."""

    DENSE = 0.1

    def __init__(self, d_sae: int, dead_tokens: int, device: torch.device):
        self.dead_tokens = dead_tokens
        self.since_fired_F = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.reset_window()

    def reset_window(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.fired_F: torch.Tensor | None = None
        self.n_steps = self.n_tokens = 0
        self.t0 = time.perf_counter()

    def dead_mask_F(self) -> torch.Tensor:
        return self.since_fired_F >= self.dead_tokens

    @torch.no_grad()
    def update(self, x_BD, x_hat_BD, acts_BF, loss, parts: dict, input_scale: float) -> None:
        fired_BF = acts_BF != 0
        fired_F = fired_BF.sum(0)
        self.since_fired_F += x_BD.shape[0]
        self.since_fired_F[fired_F > 0] = 0
        self.fired_F = fired_F if self.fired_F is None else self.fired_F + fired_F
        err_B = (x_hat_BD.float() - x_BD).pow(2).sum(-1)
        var = (x_BD - x_BD.mean(0)).pow(2).sum()
        values = {
            "loss": loss.detach().float(),
            "mse": err_B.mean() / input_scale**2,  # raw activation units, summed over D
            "fvu": err_B.sum() / var.clamp_min(1e-12),
            "l0": fired_BF.sum(-1).float().mean(),
            **{f"loss/{k}": v.detach().float() for k, v in parts.items()},
        }
        for k, v in values.items():
            self.sums[k] = v if k not in self.sums else self.sums[k] + v
        self.n_steps += 1
        self.n_tokens += x_BD.shape[0]

    def summary(self) -> dict:
        """Window means (one host sync), dead/dense latents and tokens/s; resets the window."""
        out = {k: float(v) / self.n_steps for k, v in self.sums.items()}
        out["dead_latents"] = int(self.dead_mask_F().sum())
        if self.fired_F is not None:
            out["dense_latents"] = int((self.fired_F.float() / self.n_tokens > self.DENSE).sum())
        out["tokens_per_s"] = self.n_tokens / max(time.perf_counter() - self.t0, 1e-9)
        self.reset_window()
        return out


def wandb_mode(mode: str) -> str:
    if mode not in LOGGER_MODES:
        raise UserError(f"logger.mode={mode!r} is not one of {', '.join(LOGGER_MODES)}")
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE")
    if env in ("offline", "online", "disabled"):
        return env
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class RunLogger:
    """JSON lines + optional W&B for one run folder. Use as a context manager (finishes W&B)."""

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
        self.path = Path(run_dir) / paths.TRAIN_LOG
        if resume_step is not None and self.path.exists():  # drop lines logged after the checkpoint
            keep = [ln for ln in self.path.read_text().splitlines() if _step(ln) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        self.file = open(self.path, "a")
        self.run = None
        if logger_cfg.wandb:
            os.environ.setdefault("WANDB_SILENT", "true")
            os.environ.setdefault("WANDB_CONSOLE", "off")
            import wandb

            self.run = wandb.init(
                project=logger_cfg.project,
                entity=logger_cfg.entity,
                group=group,
                name=name,
                tags=list(logger_cfg.tags),
                dir=str(run_dir),
                id=wandb_id,
                resume="allow",
                mode=wandb_mode(logger_cfg.mode),
                config=config,
                reinit="create_new",
                settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
            )

    def log(self, step: int, metrics: dict) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.run is not None:
            self.run.log(metrics, step=step)

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
