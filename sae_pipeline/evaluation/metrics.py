"""Pure tensor metrics of an SAE's reconstruction and of next-token predictions.

Rows are tokens: `x_ND` the true activations, `x_hat_ND` the SAE's reconstruction, `acts_NF` the
latent activations. Sums are accumulated in float64 so that large activation norms do not lose
precision. `ActivationStats` streams the same quantities over batches (identical to the whole-tensor
functions up to rounding).

Definitions (see DEFINITIONS, stored in every metrics.json):
  FVU                 sum ||x - x_hat||^2 / sum ||x - mean(x)||^2          (mean over all tokens)
  explained_variance  1 - sum ||r - mean(r)||^2 / sum ||x - mean(x)||^2, r = x - x_hat
                      (sklearn's definition: a constant bias in the error is not penalised)
  mse_per_token       mean over tokens of ||x - x_hat||^2 (sum over D)
  mse_per_element     mse_per_token / D
  cosine              mean over tokens of cos(x, x_hat)  (0 where either vector is zero)
  norm_ratio          mean over tokens of ||x_hat|| / ||x||
  l0                  mean over tokens of the number of non-zero latents
  dead / dense        latents that never fired / fired on more than `dense_threshold` of the tokens
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

DEFINITIONS_VERSION = 1
DENSE_THRESHOLD = 0.1
EPS = 1e-12

DEFINITIONS = {
    "version": DEFINITIONS_VERSION,
    "tokens": "valid positions only: BOS and padding are never scored nor replaced",
    "fvu": "sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over all evaluated tokens",
    "explained_variance": "1 - sum ||r - mean(r)||^2 / sum ||x - mean(x)||^2 with r = x - x_hat",
    "mse_per_token": "mean over tokens of ||x - x_hat||^2 (sum over the model dimension)",
    "mse_per_element": "mse_per_token / d_in",
    "cosine": "mean over tokens of cos(x, x_hat)",
    "norm_ratio": "mean over tokens of ||x_hat|| / ||x||",
    "l0": "mean over tokens of the number of non-zero latents",
    "dead": "latents that never fired on the evaluated tokens",
    "dense": f"latents that fired on more than {DENSE_THRESHOLD:.0%} of the evaluated tokens",
    "ce": "next-token cross-entropy (nats) at positions t with both t and t+1 valid",
    "ce_zero / ce_mean": "hook activation replaced by zero / by its mean over the evaluated tokens",
    "loss_recovered": "(ce_zero - ce_sae) / (ce_zero - ce_clean)",
    "loss_recovered_mean": "(ce_mean - ce_sae) / (ce_mean - ce_clean)",
    "ce_increase": "ce_sae - ce_clean (nats)",
    "kl": "mean over scored positions of KL(p_clean || p_spliced) (nats)",
}


# ----------------------------------------------------------------------------- reconstruction


def l0_per_token(acts_NF: Tensor) -> Tensor:
    """Number of non-zero latents of each row, [N] float."""
    return (acts_NF != 0).sum(dim=-1).to(torch.float64)


def squared_error_per_token(x_ND: Tensor, x_hat_ND: Tensor) -> Tensor:
    """||x - x_hat||^2 of each row, [N] float64."""
    return (x_ND.double() - x_hat_ND.double()).pow(2).sum(dim=-1)


def mse_per_token(x_ND: Tensor, x_hat_ND: Tensor) -> float:
    return squared_error_per_token(x_ND, x_hat_ND).mean().item()


def mse_per_element(x_ND: Tensor, x_hat_ND: Tensor) -> float:
    return mse_per_token(x_ND, x_hat_ND) / x_ND.shape[-1]


def total_variance(x_ND: Tensor) -> float:
    """sum over rows of ||x - mean(x)||^2."""
    x = x_ND.double()
    return (x - x.mean(dim=0)).pow(2).sum().item()


def fvu(x_ND: Tensor, x_hat_ND: Tensor) -> float:
    """Fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2."""
    return squared_error_per_token(x_ND, x_hat_ND).sum().item() / max(total_variance(x_ND), EPS)


def explained_variance(x_ND: Tensor, x_hat_ND: Tensor) -> float:
    """1 - Var(residual) / Var(x), variances summed over dimensions."""
    return 1.0 - total_variance(x_ND.double() - x_hat_ND.double()) / max(total_variance(x_ND), EPS)


def cosine_per_token(x_ND: Tensor, x_hat_ND: Tensor) -> Tensor:
    x, y = x_ND.double(), x_hat_ND.double()
    denom = x.norm(dim=-1) * y.norm(dim=-1)
    return torch.where(denom > 0, (x * y).sum(dim=-1) / denom.clamp_min(EPS), torch.zeros_like(denom))


def norm_ratio_per_token(x_ND: Tensor, x_hat_ND: Tensor) -> Tensor:
    return x_hat_ND.double().norm(dim=-1) / x_ND.double().norm(dim=-1).clamp_min(EPS)


def latent_summary(fire_counts_F: Tensor, n_tokens: int, dense_threshold: float = DENSE_THRESHOLD) -> dict:
    """Dead (never fired) and dense (fired on > dense_threshold of tokens) latents from firing counts."""
    counts = fire_counts_F.double()
    d_sae = counts.numel()
    density = counts / max(n_tokens, 1)
    n_dead = int((counts == 0).sum())
    n_dense = int((density > dense_threshold).sum())
    return {
        "d_sae": d_sae,
        "dead": n_dead,
        "dead_frac": n_dead / d_sae,
        "dense": n_dense,
        "dense_frac": n_dense / d_sae,
        "dense_threshold": dense_threshold,
    }


def log10_density_histogram(fire_counts_F: Tensor, n_tokens: int, bins: int = 40) -> dict:
    """Histogram of log10(firing frequency) of the latents that fired, plus the dead count.

    The lower edge is the smallest measurable frequency (one firing in n_tokens), the upper edge 0.
    """
    counts = fire_counts_F.double()
    alive = counts[counts > 0] / max(n_tokens, 1)
    lo = -math.log10(max(n_tokens, 1)) if n_tokens > 1 else -1.0
    edges = torch.linspace(lo, 0.0, bins + 1, dtype=torch.float64)
    hist = torch.histc(alive.log10().clamp(lo, 0.0), bins=bins, min=lo, max=0.0) if alive.numel() else None
    return {
        "edges": edges.tolist(),
        "counts": [int(c) for c in hist.tolist()] if hist is not None else [0] * bins,
        "dead": int((counts == 0).sum()),
    }


def l0_distribution(l0_N: Tensor, quantiles=(0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99), bins: int = 20) -> dict:
    """Mean, spread, quantiles and a histogram of the per-token L0 (needs at least one token)."""
    v = l0_N.double()
    q = torch.quantile(v, torch.tensor(quantiles, dtype=torch.float64))
    hi = max(float(v.max()), 1.0)
    return {
        "mean": float(v.mean()),
        "std": float(v.std(unbiased=False)),
        "min": float(v.min()),
        "max": float(v.max()),
        "quantiles": {f"p{round(p * 100)}": float(x) for p, x in zip(quantiles, q.tolist(), strict=True)},
        "hist_edges": torch.linspace(0.0, hi, bins + 1).tolist(),
        "hist_counts": [int(c) for c in torch.histc(v, bins=bins, min=0.0, max=hi).tolist()],
    }


class _Moments:
    """Count, mean and sum of squared deviations of row vectors, merged batch by batch (Chan et al.)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean_D: Tensor | None = None
        self.m2 = 0.0

    def update(self, x_ND: Tensor) -> None:
        x = x_ND.double()
        nb = x.shape[0]
        if nb == 0:
            return
        mean_b = x.mean(dim=0)
        m2_b = (x - mean_b).pow(2).sum().item()
        if self.mean_D is None:
            self.n, self.mean_D, self.m2 = nb, mean_b, m2_b
            return
        n = self.n + nb
        delta = mean_b - self.mean_D
        self.m2 += m2_b + delta.pow(2).sum().item() * self.n * nb / n
        self.mean_D = self.mean_D + delta * (nb / n)
        self.n = n


class ActivationStats:
    """Streams reconstruction metrics over batches of (x, x_hat, acts) rows of valid tokens."""

    def __init__(self, d_sae: int, dense_threshold: float = DENSE_THRESHOLD) -> None:
        self.dense_threshold = dense_threshold
        self.x = _Moments()
        self.residual = _Moments()
        self.sq_err = 0.0
        self.cos_sum = 0.0
        self.ratio_sum = 0.0
        self.l0_chunks: list[Tensor] = []
        self.fire_counts_F = torch.zeros(d_sae, dtype=torch.float64)
        self.d_in: int | None = None

    @property
    def n_tokens(self) -> int:
        return self.x.n

    def update(self, x_ND: Tensor, x_hat_ND: Tensor, acts_NF: Tensor) -> None:
        self.d_in = x_ND.shape[-1]
        self.x.update(x_ND)
        self.residual.update(x_ND.double() - x_hat_ND.double())
        self.sq_err += squared_error_per_token(x_ND, x_hat_ND).sum().item()
        self.cos_sum += cosine_per_token(x_ND, x_hat_ND).sum().item()
        self.ratio_sum += norm_ratio_per_token(x_ND, x_hat_ND).sum().item()
        fired = acts_NF != 0
        self.l0_chunks.append(fired.sum(dim=-1).to(torch.float64).cpu())
        self.fire_counts_F += fired.sum(dim=0).to(torch.float64).cpu()

    def mean_activation(self) -> Tensor:
        """Mean of x over every row seen (float32), the mean-ablation value."""
        if self.x.mean_D is None:
            raise ValueError("no activations were seen")
        return self.x.mean_D.float()

    def compute(self) -> dict:
        n = self.n_tokens
        if n == 0:
            raise ValueError("no activations were seen")
        var = max(self.x.m2, EPS)
        l0_N = torch.cat(self.l0_chunks)
        return {
            "n_tokens": n,
            "l0": float(l0_N.mean()),
            "fvu": self.sq_err / var,
            "explained_variance": 1.0 - self.residual.m2 / var,
            "mse_per_token": self.sq_err / n,
            "mse_per_element": self.sq_err / (n * self.d_in),
            "cosine": self.cos_sum / n,
            "norm_ratio": self.ratio_sum / n,
            "latents": latent_summary(self.fire_counts_F, n, self.dense_threshold),
            "l0_distribution": l0_distribution(l0_N),
            "log10_density_histogram": log10_density_histogram(self.fire_counts_F, n),
        }


# ----------------------------------------------------------------------------- next-token predictions


def scored_positions(loss_mask_BT: Tensor) -> Tensor:
    """[B, T-1] bool: the prediction at t of token t+1 is scored iff positions t and t+1 are both valid."""
    m = loss_mask_BT.bool()
    return m[:, :-1] & m[:, 1:]


def kl_divergence(logp_clean_NV: Tensor, logp_other_NV: Tensor) -> Tensor:
    """KL(p_clean || p_other) per row from log-probabilities, [N]."""
    return (logp_clean_NV.exp() * (logp_clean_NV - logp_other_NV)).sum(dim=-1)


def loss_recovered(ce_clean: float, ce_sae: float, ce_ablated: float) -> float:
    """(ce_ablated - ce_sae) / (ce_ablated - ce_clean): 1 is perfect, 0 is no better than ablating."""
    denom = ce_ablated - ce_clean
    if abs(denom) < EPS:
        return float("nan")
    return (ce_ablated - ce_sae) / denom
