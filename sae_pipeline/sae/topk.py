"""TopK SAE (Gao et al. 2024): keep the k largest pre-activations per row, ReLU them, decode sparsely.

Cost per training token: one dense encoder matmul (2*D*F FLOP); the top-k, the decode and every backward
product touch only the K selected latents (see `gather_encode` / `sparse_decode` in base.py).
AuxK: the residual x - x_hat (detached) is reconstructed from the aux_k largest pre-activations among the
latents the trainer marks dead, scored by normalised MSE ||e - e_hat||^2 / ||e - mean(e)||^2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sae_pipeline.errors import UserError

from .base import SAE, SAEConfig, SparseCode, TrainOutput
from .batch_reduce import centered_sq_sum
from .kernels import gather_encode, sparse_decode
from .native import topk
from .registry import register

# The one-pass defaults of the K-sparse family (issue 21, scripts/bench_quality.py): AuxK trains the latents
# that have not fired for DEAD_SHARES x their fair share of tokens (d_sae / k tokens per firing), weighted by
# AUX_K_COEFFICIENT. One pass of k=16 8x on SmolLM2 layer 9, latents silent on 20,574 held-out tokens: 10.2%
# with 1/32 after 500k tokens (AuxK never acts), 2.8% weight 1 after 20k, 1.6% weight 4 after 20k, 1.0% weight 4
# after 9,216 (these constants; k=32 0.7% -> 0.04%, k=64 0.0%), FVU within 0.001 of the old defaults at each k.
DEAD_SHARES = 32
AUX_K_COEFFICIENT = 4.0


@dataclass
class TopKConfig(SAEConfig):
    """TopK SAE: sparsity is fixed by k, so there is no penalty coefficient to tune."""

    arch: str = "topk"
    k: int = 32  # active latents per row
    aux_k: int = 0  # dead latents used by the AuxK loss; 0 means d_in // 2 (OpenAI's choice)
    # weight of the (normalised, hence O(1)) AuxK loss; OpenAI's paper uses 1/32 over billions of tokens, which
    # revives nothing within one pass (TopKSAE.default_dead_tokens)
    aux_k_coefficient: float = AUX_K_COEFFICIENT

    def validate(self) -> None:
        super().validate()
        if self.k < 1:
            raise UserError(f"sae.k must be >= 1, got {self.k}.")
        if self.aux_k < 0:
            raise UserError(f"sae.aux_k must be >= 0 (0 means d_in // 2), got {self.aux_k}.")
        self._check_nonnegative("aux_k_coefficient", self.aux_k_coefficient)


@register
class TopKSAE(SAE):
    config_class = TopKConfig
    cfg: TopKConfig
    # Default lr = 4 x Gao et al.'s 2e-4 / sqrt(d_sae / 2**14): one pass (146 steps) of k=32 8x on SmolLM2
    # layer 9 (scripts/bench_quality.py --grid, 4k held-out tokens) gave FVU / loss recovered / dead latents
    # x1 0.234 / 0.964 / 0.2%, x2 0.188 / 0.977 / 0.6%, x4 0.161 / 0.983 / 2.6%, x8 0.148 / 0.989 / 13%,
    # x16 0.148 / 0.985 / 35%; on 20k tokens x4 0.157 / 0.987 / 0.5% and x8 0.144 / 0.988 / 7.4%: x4 is the
    # knee (the target met, few latents that never fire). BatchTopK and Matryoshka inherit it (not measured).
    default_lr_scale = 4.0

    def default_dead_tokens(self) -> int:
        """Dead after DEAD_SHARES x the d_sae / k tokens a latent's fair share of the firings gives it: a fixed
        count (500,000) never marks a latent dead within one 600k-token pass, so AuxK never acted, and would
        mark most latents of a wide dictionary dead."""
        return DEAD_SHARES * self.d_sae // self.cfg.k

    def _init_extra(self) -> None:
        if self.cfg.k > self.d_sae:
            raise UserError(f"sae.k={self.cfg.k} must be <= d_sae={self.d_sae}.")

    @property
    def aux_k(self) -> int:
        return self.cfg.aux_k if self.cfg.aux_k > 0 else max(1, self.d_in // 2)

    # ----- sparse code: (indices, values) -----
    def _select(self, pre_BF: Tensor) -> Tensor:
        """Indices of the latents kept for each row (`native.topk`: torch.topk's answer, bit for bit)."""
        return topk(pre_BF, self.cfg.k, sorted=False)[1]

    def _dense_pre(self, x_BD: Tensor) -> tuple[Tensor, Tensor]:
        """(encoder bias, pre-activations) with no autograd graph: gradients flow only through the
        selected entries (`gather_encode`)."""
        bias_F = self._enc_bias_F(self.b_enc_F)
        with torch.no_grad():
            return bias_F, torch.addmm(bias_F, x_BD, self.W_enc_DF)

    def _sparse_code(self, x_BD: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(bias_F, pre_BF, idx_BK, vals_BK): the kept latents and their (non-negative) activations."""
        bias_F, pre_BF = self._dense_pre(x_BD)
        idx_BK = self._select(pre_BF)
        vals_BK = gather_encode(x_BD, self.W_enc_DF, bias_F, pre_BF, idx_BK).relu()
        return bias_F, pre_BF, idx_BK, vals_BK

    def encode_sparse(self, x_BD: Tensor) -> tuple[Tensor, Tensor]:
        """(idx_BK, vals_BK): kept latents and their (non-negative) activations, differentiable."""
        return self._sparse_code(x_BD)[2:]

    def encode(self, x_BD: Tensor) -> Tensor:
        idx_BK, vals_BK = self.encode_sparse(x_BD)
        out_BF = torch.zeros(x_BD.shape[0], self.d_sae, dtype=vals_BK.dtype, device=vals_BK.device)
        return out_BF.scatter(1, idx_BK, vals_BK)

    def forward(self, x_BD: Tensor) -> Tensor:
        idx_BK, vals_BK = self.encode_sparse(x_BD)
        return self._with_skip(x_BD, sparse_decode(idx_BK, vals_BK, self.W_dec_FD, self.b_dec_D))

    def training_forward(
        self,
        x_BD: Tensor,
        sparsity_scale: float = 1.0,
        dead_mask_F: Tensor | None = None,
        target_BD: Tensor | None = None,
    ) -> TrainOutput:
        y_BD = self._target(x_BD, target_BD)
        bias_F, pre_BF, idx_BK, vals_BK = self._sparse_code(x_BD)
        x_hat_BD = self._with_skip(x_BD, sparse_decode(idx_BK, vals_BK, self.W_dec_FD, self.b_dec_D))
        code = SparseCode(idx_BK, vals_BK.detach(), self.d_sae, x_BD.shape[0])
        return self._output(x_BD, y_BD, x_hat_BD, pre_BF, bias_F, dead_mask_F, code)

    def _output(self, x_BD, y_BD, x_hat_BD, pre_BF, bias_F, dead_mask_F, code: SparseCode) -> TrainOutput:
        """Reconstruction loss (of the target y_BD) plus AuxK on the dead latents (shared with BatchTopK)."""
        mse = self.mse(x_hat_BD, y_BD)
        loss = mse
        parts = {"mse": mse.detach()}
        if self.cfg.aux_k_coefficient > 0 and dead_mask_F is not None:
            aux = self._aux_k_loss(x_BD, y_BD, x_hat_BD.detach(), pre_BF, bias_F, dead_mask_F)
            loss = loss + self.cfg.aux_k_coefficient * aux
            parts["aux_k"] = aux.detach()
        return TrainOutput(loss=loss, parts=parts, x_hat_BD=x_hat_BD.detach(), sparse=code)

    def _aux_k_loss(
        self,
        x_BD: Tensor,
        y_BD: Tensor,
        x_hat_BD: Tensor,
        pre_BF: Tensor,
        bias_F: Tensor,
        dead_mask_F: Tensor,
    ) -> Tensor:
        """AuxK: the dead latents of input x_BD reconstruct the residual y_BD - x_hat_BD of the target."""
        dead_idx = dead_mask_F.to(pre_BF.device).nonzero().squeeze(1)
        if dead_idx.numel() == 0:
            return pre_BF.new_zeros(())
        k_aux = min(self.aux_k, dead_idx.numel())
        with torch.no_grad():
            sub_idx_BA = topk(pre_BF.index_select(1, dead_idx), k_aux, sorted=False)[1]
            idx_BA = dead_idx[sub_idx_BA]
        vals_BA = gather_encode(x_BD, self.W_enc_DF, bias_F, pre_BF, idx_BA).relu()
        resid_BD = y_BD - x_hat_BD
        resid_hat_BD = sparse_decode(idx_BA, vals_BA, self.W_dec_FD, None)
        denom = centered_sq_sum(self.collective, resid_BD).clamp_min(1e-12)  # over the global batch
        return (resid_hat_BD - resid_BD).pow(2).sum() / denom
