"""Matryoshka BatchTopK SAE (Bussmann et al. 2025; Nabeshima 2024): nested dictionaries.

The latents are ordered in consecutive groups (`group_sizes`); prefix g is the union of groups 0..g, and
every prefix must reconstruct the input on its own:

    x_hat_g = b_dec + sum_{f < end_g} a_f W_dec[f]          loss = mean_g ||x - x_hat_g||^2  (+ AuxK)

with the code a chosen once, by batch top-k over the whole dictionary (exactly BatchTopK's selection, kept
entries > 0, and its EMA inference threshold), so the last prefix is the full reconstruction. Early latents
are pushed to carry general, frequent directions (they must reconstruct without help from later ones), which
stops a frequent parent feature from being absorbed into the latents of its rarer children.

Mean, not sum, of the prefix losses: with one group the loss is BatchTopK's MSE exactly, so lr, gradient
clipping and aux_k_coefficient (relative to the reconstruction term) keep their meaning whatever the number
of groups; a sum would scale the reconstruction gradient by the number of groups. (Bussmann et al.'s code
also averages.) AuxK reconstructs the full reconstruction's residual from dead latents, as in BatchTopK.

Cost: as BatchTopK, plus one pass over the kept entries sorted into (row, group) bags: the decode gives each
row's per-group partial sums [B, G, D] in one embedding_bag, and a cumsum over G gives every prefix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from sae_pipeline.errors import UserError

from .base import SparseCode, TrainOutput
from .batchtopk import BatchTopKConfig, BatchTopKSAE
from .kernels import gather_encode, sparse_decode
from .registry import register


def _default_groups() -> list[float]:
    return [0.0625, 0.0625, 0.125, 0.25, 0.5]  # Bussmann et al.'s split: d/16, d/16, d/8, d/4, d/2


@dataclass
class MatryoshkaConfig(BatchTopKConfig):
    """Matryoshka BatchTopK SAE: k is the mean number of active latents per row over the whole dictionary."""

    arch: str = "matryoshka"
    # Sizes of the consecutive latent groups, first (most general) group first: fractions of d_sae summing
    # to 1 (e.g. [0.25, 0.75]) or whole latent counts summing to d_sae (e.g. [16, 48, 192]).
    group_sizes: list[float] = field(default_factory=_default_groups)

    def validate(self) -> None:
        super().validate()
        sizes = list(self.group_sizes)
        if not sizes:
            raise UserError("sae.group_sizes must list at least one group size.")
        if not all(isinstance(s, (int, float)) and math.isfinite(s) and s > 0 for s in sizes):
            raise UserError(f"sae.group_sizes must be finite numbers > 0, got {sizes}.")
        if not self.sizes_are_fractions() and not all(float(s).is_integer() for s in sizes):
            raise UserError(
                f"sae.group_sizes must be fractions of d_sae summing to 1 or whole latent counts, got {sizes}."
            )

    def sizes_are_fractions(self) -> bool:
        sizes = [float(s) for s in self.group_sizes]
        return all(s <= 1.0 for s in sizes) and abs(sum(sizes) - 1.0) < 1e-6

    def prefix_ends(self, d_sae: int) -> list[int]:
        """End (exclusive) of every prefix: strictly increasing, the last one d_sae."""
        sizes = [float(s) for s in self.group_sizes]
        if self.sizes_are_fractions():
            total, ends = 0.0, []
            for s in sizes:
                total += s
                ends.append(round(total * d_sae))
            ends[-1] = d_sae
            if min(b - a for a, b in zip([0, *ends[:-1]], ends, strict=True)) < 1:
                raise UserError(
                    f"sae.group_sizes={sizes} leaves a group with no latent at d_sae={d_sae}; "
                    "use fewer or larger groups."
                )
            return ends
        if round(sum(sizes)) != d_sae:
            raise UserError(
                f"sae.group_sizes={[int(s) for s in sizes]} sum to {round(sum(sizes))} latents, "
                f"but d_sae is {d_sae}."
            )
        ends, total = [], 0
        for s in sizes:
            total += int(s)
            ends.append(total)
        return ends


@register
class MatryoshkaSAE(BatchTopKSAE):
    config_class = MatryoshkaConfig
    cfg: MatryoshkaConfig

    def _init_extra(self) -> None:
        super()._init_extra()
        self.prefix_ends = self.cfg.prefix_ends(self.d_sae)
        group_F = torch.zeros(self.d_sae, dtype=torch.long)
        for end in self.prefix_ends[:-1]:
            group_F[end:] += 1
        # which group each latent belongs to (derived from the config: not saved)
        self.register_buffer("group_F", group_F, persistent=False)

    @property
    def n_groups(self) -> int:
        return len(self.prefix_ends)

    def training_forward(
        self,
        x_BD: Tensor,
        sparsity_scale: float = 1.0,
        dead_mask_F: Tensor | None = None,
        target_BD: Tensor | None = None,
    ) -> TrainOutput:
        y_BD = self._target(x_BD, target_BD)
        bias_F, pre_BF = self._dense_pre(x_BD)
        n_rows, n_groups = x_BD.shape[0], self.n_groups
        with torch.no_grad():
            idx_BM, keep_BM, t = self._batch_select(pre_BF)
            self._update_threshold(t)
            rows_N = keep_BM.nonzero()[:, 0]
            idx_N = idx_BM[keep_BM]
            # Sort each row's kept entries by group (rows stay in order), so that the entries of one
            # (row, group) bag are contiguous: bag b * G + g holds row b's latents of group g.
            bag_N = rows_N * n_groups + self.group_F[idx_N]
            order_N = torch.argsort(bag_N, stable=True)
            rows_N, idx_N, bag_N = rows_N[order_N], idx_N[order_N], bag_N[order_N]
            offsets_B = _starts(rows_N, n_rows)
            offsets_BG = _starts(bag_N, n_rows * n_groups)
        vals_N = gather_encode(x_BD, self.W_enc_DF, bias_F, pre_BF, idx_N, rows_N, offsets_B)
        part_BGD = sparse_decode(idx_N, vals_N, self.W_dec_FD, None, offsets_BG).view(n_rows, n_groups, -1)
        prefix_BGD = part_BGD.cumsum(1) + self.b_dec_D  # prefix g: groups 0..g
        if self.W_skip_DO is not None:  # every prefix of a skip transcoder has the skip term
            prefix_BGD = prefix_BGD + (x_BD @ self.W_skip_DO).to(prefix_BGD.dtype).unsqueeze(1)
        mse_G = (prefix_BGD - y_BD.unsqueeze(1)).pow(2).sum(dim=(0, 2)) / n_rows
        x_hat_BD = prefix_BGD[:, -1]
        loss = mse_G.mean()
        parts = {"mse": mse_G[-1].detach(), "mse_prefix_mean": loss.detach()}
        parts.update({f"mse_prefix{g}": mse_G[g].detach() for g in range(n_groups - 1)})
        if self.cfg.aux_k_coefficient > 0 and dead_mask_F is not None:
            aux = self._aux_k_loss(x_BD, y_BD, x_hat_BD.detach(), pre_BF, bias_F, dead_mask_F)
            loss = loss + self.cfg.aux_k_coefficient * aux
            parts["aux_k"] = aux.detach()
        code = SparseCode(idx_N, vals_N.detach(), self.d_sae, n_rows, rows_N)
        return TrainOutput(loss=loss, parts=parts, x_hat_BD=x_hat_BD.detach(), sparse=code)


def _starts(sorted_keys_N: Tensor, n_bags: int) -> Tensor:
    """First entry of every bag 0..n_bags-1 given the entries' sorted bag keys (empty bags allowed)."""
    counts = torch.bincount(sorted_keys_N, minlength=n_bags)
    starts = torch.zeros(n_bags, dtype=sorted_keys_N.dtype, device=sorted_keys_N.device)
    torch.cumsum(counts[:-1], 0, out=starts[1:])
    return starts
