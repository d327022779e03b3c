"""Synthetic superposition data with a known dictionary, to check that SAEs recover ground-truth features.

gen = SyntheticFeatures(n_features=128, d=64, mean_active=3.0, seed=0)
x_BD = gen.sample(4096)                      # sum of a few active unit directions with positive magnitudes
recovered_fraction(gen.dirs_FD, sae.W_dec_FD)  # share of true directions matched at cosine > 0.9
HierarchicalFeatures(n_parents=2, children_per_parent=4, n_background=6, d=16)  # parents with rarer children
write_store(folder, [x_BD], context_size=16)  # a finished activation store of given rows (no model)
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

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


class HierarchicalFeatures:
    """Frequent parent features whose rarer children fire only with them, plus independent background features.

    Orthonormal directions (n_features <= d), ordered parents, children (parent p's are
    `children_of(p)`), background. Parent p is on with probability p_parent; when it is on, with
    probability p_child exactly one of its children (uniform) is on too. Background features are on
    independently with probability p_background. Magnitudes: parents and children uniform in [0.8, 1.2],
    background in [0.5, 1.5]. x = sum_f m_f * dir_f.
    """

    def __init__(
        self,
        n_parents: int = 2,
        children_per_parent: int = 4,
        n_background: int = 6,
        d: int = 16,
        p_parent: float = 0.4,
        p_child: float = 0.8,
        p_background: float = 0.1,
        seed: int = 0,
    ):
        self.n_parents, self.n_children, self.n_background = n_parents, children_per_parent, n_background
        self.n_features = n_parents * (1 + children_per_parent) + n_background
        if self.n_features > d:
            raise ValueError(f"{self.n_features} orthonormal features do not fit in d={d}")
        self.p_parent, self.p_child, self.p_background = p_parent, p_child, p_background
        self.generator = torch.Generator().manual_seed(seed)
        q_DD, _ = torch.linalg.qr(torch.randn(d, d, generator=self.generator))
        self.dirs_FD = q_DD.t()[: self.n_features].contiguous()

    def children_of(self, p: int) -> range:
        first = self.n_parents + p * self.n_children
        return range(first, first + self.n_children)

    def sample_with_codes(self, n: int) -> tuple[Tensor, Tensor]:
        g, P, C = self.generator, self.n_parents, self.n_children
        codes_NF = torch.zeros(n, self.n_features)
        parent_NP = torch.rand(n, P, generator=g) < self.p_parent
        child_NP = parent_NP & (torch.rand(n, P, generator=g) < self.p_child)
        which_NP = P + torch.arange(P) * C + torch.randint(0, C, (n, P), generator=g)
        codes_NF[:, :P] = parent_NP * (0.8 + 0.4 * torch.rand(n, P, generator=g))
        child_vals_NP = child_NP * (0.8 + 0.4 * torch.rand(n, P, generator=g))
        codes_NF.scatter_(1, which_NP, child_vals_NP)
        bg_NB = torch.rand(n, self.n_background, generator=g) < self.p_background
        codes_NF[:, P + P * C :] = bg_NB * (0.5 + torch.rand(n, self.n_background, generator=g))
        return codes_NF @ self.dirs_FD, codes_NF

    def sample(self, n: int) -> Tensor:
        return self.sample_with_codes(n)[0]


def max_cosines(true_dirs_FD: Tensor, learned_dec_FD: Tensor) -> Tensor:
    """For each true direction, its best cosine similarity with any learned decoder row."""
    true_n = true_dirs_FD / true_dirs_FD.norm(dim=1, keepdim=True).clamp_min(1e-12)
    learned = learned_dec_FD.detach().to(true_n.dtype)
    learned_n = learned / learned.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (true_n @ learned_n.t()).max(dim=1).values


def recovered_fraction(true_dirs_FD: Tensor, learned_dec_FD: Tensor, threshold: float = 0.9) -> float:
    """Fraction of true directions whose best cosine with a learned decoder row exceeds threshold."""
    return (max_cosines(true_dirs_FD, learned_dec_FD) > threshold).float().mean().item()


def write_store(
    folder: Path,
    shard_activations: Iterable[Tensor],
    context_size: int,
    model: dict | None = None,
    seed: int = 0,
) -> Path:
    """A finished activation store (for tests and benchmarks: no model runs) holding the given rows.

    Each tensor is one shard's activations [n_rows, d_in] in context order (whole contexts of
    `context_size` rows, numbered on from the previous shard); the store's dtype is theirs. As in a
    harvested store, rows are shuffled within each shard together with their context ids and positions.
    """
    from sae_pipeline.data.store import STORE_DTYPES, StoreWriter

    dtype_names = {dtype: name for name, dtype in STORE_DTYPES.items()}
    gen = torch.Generator().manual_seed(seed)
    writer, first = None, 0
    for index, acts_ND in enumerate(shard_activations):
        n_rows, d_in = acts_ND.shape
        if writer is None:
            header = {
                "d_in": d_in,
                "dtype": dtype_names[acts_ND.dtype],
                "context_size": context_size,
                "hook": {
                    "name": "blocks.0.hook_resid_post",
                    "module_path": "model.layers.0",
                    "io": "output",
                    "layer": 0,
                },
                "model": model or {"name": str(Path(folder) / "no-model-here"), "id": "none"},
            }
            writer = StoreWriter(folder, header, fingerprint=f"synthetic-{seed}-{d_in}", overwrite=True)
        n_ctx = n_rows // context_size
        perm = torch.randperm(n_rows, generator=gen)
        tensors = {
            "activations": acts_ND[perm],
            "token_ids": torch.randint(0, 100, (n_rows,), generator=gen, dtype=torch.int32),
            "context_ids": torch.arange(first, first + n_ctx, dtype=torch.int32).repeat_interleave(
                context_size
            )[perm],
            "positions": torch.arange(context_size, dtype=torch.int32).repeat(n_ctx)[perm],
        }
        writer.write_shard(index, tensors, first_context=first, n_contexts=n_ctx)
        first += n_ctx
    if writer is None:
        raise ValueError("write_store needs at least one shard")
    writer.finish({})
    return Path(folder)
