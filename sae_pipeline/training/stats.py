"""Running training statistics of one SAE: window means for the log, and per-latent firing counters."""

from __future__ import annotations

import time

import torch


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
