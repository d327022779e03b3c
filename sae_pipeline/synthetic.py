"""Synthetic superposition data with a known dictionary, to check that SAEs recover ground-truth features.

gen = SyntheticFeatures(n_features=128, d=64, mean_active=3.0, seed=0)
x_BD = gen.sample(4096)                      # sum of a few active unit directions with positive magnitudes
recovered_fraction(gen.dirs_FD, sae.W_dec_FD)  # share of true directions matched at cosine > 0.9
"""

from __future__ import annotations

import torch
from torch import Tensor


class SyntheticFeatures:
    """n_features random unit directions in d dims; each sample switches features on independently.

    Feature f is on with probability mean_active / n_features (so about mean_active are on per sample);
    an active feature's magnitude is uniform in [min_magnitude, max_magnitude]. x = sum_f m_f * dir_f.
    """

    def __init__(
        self,
        n_features: int = 128,
        d: int = 64,
        mean_active: float = 3.0,
        min_magnitude: float = 0.5,
        max_magnitude: float = 1.5,
        seed: int = 0,
    ):
        if not 0 < mean_active <= n_features:
            raise ValueError(f"mean_active must be in (0, n_features], got {mean_active}")
        if not 0 <= min_magnitude <= max_magnitude:
            raise ValueError("need 0 <= min_magnitude <= max_magnitude")
        self.n_features, self.d = n_features, d
        self.p_active = mean_active / n_features
        self.min_magnitude, self.max_magnitude = min_magnitude, max_magnitude
        self.generator = torch.Generator().manual_seed(seed)
        dirs_FD = torch.randn(n_features, d, generator=self.generator)
        self.dirs_FD = dirs_FD / dirs_FD.norm(dim=1, keepdim=True)

    def sample_codes(self, n: int) -> Tensor:
        """Ground-truth feature magnitudes [n, n_features] (zero where inactive)."""
        g = self.generator
        on_NF = torch.rand(n, self.n_features, generator=g) < self.p_active
        span = self.max_magnitude - self.min_magnitude
        mags_NF = self.min_magnitude + span * torch.rand(n, self.n_features, generator=g)
        return mags_NF * on_NF

    def sample(self, n: int) -> Tensor:
        """A batch x [n, d]."""
        return self.sample_codes(n) @ self.dirs_FD

    def sample_with_codes(self, n: int) -> tuple[Tensor, Tensor]:
        codes_NF = self.sample_codes(n)
        return codes_NF @ self.dirs_FD, codes_NF


def max_cosines(true_dirs_FD: Tensor, learned_dec_FD: Tensor) -> Tensor:
    """For each true direction, its best cosine similarity with any learned decoder row."""
    true_n = true_dirs_FD / true_dirs_FD.norm(dim=1, keepdim=True).clamp_min(1e-12)
    learned = learned_dec_FD.detach().to(true_n.dtype)
    learned_n = learned / learned.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (true_n @ learned_n.t()).max(dim=1).values


def recovered_fraction(true_dirs_FD: Tensor, learned_dec_FD: Tensor, threshold: float = 0.9) -> float:
    """Fraction of true directions whose best cosine with a learned decoder row exceeds threshold."""
    return (max_cosines(true_dirs_FD, learned_dec_FD) > threshold).float().mean().item()
