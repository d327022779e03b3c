"""Running training statistics of one SAE: window means for the log, and per-latent firing counters."""

from __future__ import annotations

import time

import torch

from sae_pipeline.evaluation.metrics import DENSE_THRESHOLD


class LatentStats:
    """Running training statistics of one SAE.

    `since_fired_F` counts tokens since each latent last fired (dead = >= dead_tokens; it is part
    of the checkpoint so resumed runs mark the same latents dead). The window sums are reset at
    every log line; dense latents fire on more than DENSE_THRESHOLD (10%) of the window's tokens, as in sae-eval."""

    def __init__(self, d_sae: int, dead_tokens: int, device: torch.device, dist=None):
        self.dead_tokens, self.dist = dead_tokens, dist  # dist: sums over data-parallel ranks (or None)
        self.since_fired_F = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.reset_window()

    def reset_window(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.fired_F: torch.Tensor | None = None
        self.n_steps = self.n_tokens = 0
        self.t0 = time.perf_counter()

    def dead_mask_F(self) -> torch.Tensor:
        return self.since_fired_F >= self.dead_tokens

    def fired_counts_F(self, acts_BF=None, sparse=None) -> torch.Tensor:
        """How many of the batch's rows each latent fired on (float32, exact below 2**24 rows), from dense
        [B, F] activations or from a sparse code (sae.base.SparseCode: only its K entries per row are read,
        so a K-sparse architecture's statistics cost O(B*K), not O(B*F))."""
        if sparse is not None:
            counts_F = torch.zeros(self.since_fired_F.shape[0], device=sparse.vals.device)
            return counts_F.index_add_(0, sparse.idx.reshape(-1), (sparse.vals.reshape(-1) != 0).float())
        return (acts_BF != 0).sum(0, dtype=torch.float32)  # one B x F pass, no int64 copy

    @torch.no_grad()
    def update(self, x_BD, x_hat_BD, acts_BF, loss, parts: dict, input_scale: float, sparse=None) -> None:
        """One step's statistics (no host sync); acts_BF may be None when `sparse` is given."""
        fired_F = self.fired_counts_F(acts_BF, sparse)
        err_B = (x_hat_BD.float() - x_BD).pow(2).sum(-1)
        n_rows, err, l0 = x_BD.shape[0], err_B.sum(), fired_F.sum()
        means = {"loss": loss.detach().float(), **{f"loss/{k}": v.detach().float() for k, v in parts.items()}}
        if self.dist is not None and self.dist.active:  # the global batch's values (one all-reduce + one)
            n, names = self.dist.world_size, list(means)
            flat = torch.cat([fired_F, x_BD.sum(0), torch.stack([err, l0, *means.values()])])
            flat = self.dist.all_reduce_sum(flat)
            fired_F, sum_x_D = flat[: fired_F.numel()].round(), flat[fired_F.numel() : -len(names) - 2]
            err, l0, n_rows = flat[-len(names) - 2], flat[-len(names) - 1], n_rows * n
            means = {k: v / n for k, v in zip(names, flat[-len(names) :], strict=True)}
            var = self.dist.all_reduce_sum((x_BD - sum_x_D / n_rows).pow(2).sum())
        else:
            var = (x_BD - x_BD.mean(0)).pow(2).sum()
        self.since_fired_F += n_rows
        self.since_fired_F.masked_fill_(fired_F > 0, 0)  # (a boolean index would sync with the host)
        self.fired_F = fired_F if self.fired_F is None else self.fired_F + fired_F
        values = {
            "loss": means.pop("loss"),
            "mse": err / n_rows / input_scale**2,  # raw activation units, summed over D
            "fvu": err / var.clamp_min(1e-12),
            "l0": l0 / n_rows,
            **means,
        }
        for k, v in values.items():
            self.sums[k] = v if k not in self.sums else self.sums[k] + v
        self.n_steps += 1
        self.n_tokens += n_rows

    def summary(self) -> dict:
        """Window means (one host sync), dead/dense latents and tokens/s; resets the window."""
        out = {k: float(v) / self.n_steps for k, v in self.sums.items()}
        out["dead_latents"] = int(self.dead_mask_F().sum())
        if self.fired_F is not None:
            out["dense_latents"] = int((self.fired_F.float() / self.n_tokens > DENSE_THRESHOLD).sum())
        out["tokens_per_s"] = self.n_tokens / max(time.perf_counter() - self.t0, 1e-9)
        self.reset_window()
        return out
