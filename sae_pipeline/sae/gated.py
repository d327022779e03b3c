"""Gated SAE (Rajamanoharan et al. 2024): a gate decides which latents fire, a magnitude path how much.

    h        = (x - b_dec) @ W_enc                 (one shared matmul; W_enc plays W_gate)
    pi_gate  = h + b_enc                           (b_enc is the gate bias b_gate)
    pi_mag   = h * exp(r_mag) + b_mag              (W_mag = W_gate * exp(r_mag): shared directions)
    f        = 1[pi_gate > 0] * ReLU(pi_mag)
    loss     = ||x - x_hat||^2 + l1 * sum_f ReLU(pi_gate)_f
               + ||x - (ReLU(pi_gate) @ W_dec.detach() + b_dec.detach())||^2
Decoder rows are kept at unit norm (so the L1 needs no decoder-norm factor); the auxiliary term trains the
gate to reconstruct through a frozen copy of the decoder, so it sends no gradient into W_dec or b_dec.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import SAE, SAEConfig, TrainOutput


@dataclass
class GatedConfig(SAEConfig):
    """Gated SAE with an L1 penalty on the gate pre-activations."""

    arch: str = "gated"
    # Same scale reasoning as ReLUConfig.l1_coefficient (unit-norm decoder, inputs of mean norm sqrt(d_in)),
    # but the L1 only shapes the gate, not the magnitudes, so shrinkage does not bias the reconstruction
    # and a value on the same order is right.
    l1_coefficient: float = 5.0

    def validate(self) -> None:
        super().validate()
        self._check_nonnegative("l1_coefficient", self.l1_coefficient)


class GatedSAE(SAE):
    config_class = GatedConfig
    cfg: GatedConfig

    def _init_extra(self) -> None:
        self.r_mag_F = nn.Parameter(torch.zeros(self.d_sae))
        self.b_mag_F = nn.Parameter(torch.zeros(self.d_sae))

    @property
    def b_gate_F(self) -> Tensor:
        """The gate bias is stored as b_enc_F (every SAE has that parameter)."""
        return self.b_enc_F

    def _fold_extra(self, inv: float) -> None:
        self.b_mag_F.mul_(inv)

    def _paths(self, x_BD: Tensor) -> tuple[Tensor, Tensor]:
        h_BF = x_BD @ self.W_enc_DF
        shift_F = self.b_dec_D @ self.W_enc_DF  # (x - b_dec) @ W = x @ W - b_dec @ W
        scale_F = self.r_mag_F.exp()
        pi_gate_BF = h_BF + (self.b_enc_F - shift_F)
        pi_mag_BF = torch.addcmul(self.b_mag_F - shift_F * scale_F, h_BF, scale_F)
        return pi_gate_BF, pi_mag_BF

    def encode(self, x_BD: Tensor) -> Tensor:
        pi_gate_BF, pi_mag_BF = self._paths(x_BD)
        return torch.where(pi_gate_BF > 0, pi_mag_BF.relu(), 0.0)

    def training_forward(
        self, x_BD: Tensor, sparsity_scale: float = 1.0, dead_mask_F: Tensor | None = None
    ) -> TrainOutput:
        pi_gate_BF, pi_mag_BF = self._paths(x_BD)
        acts_BF = torch.where(pi_gate_BF > 0, pi_mag_BF.relu(), 0.0)
        x_hat_BD = self.decode(acts_BF)
        mse = self.mse(x_hat_BD, x_BD)
        gate_BF = pi_gate_BF.relu()
        n_rows = x_BD.shape[0]
        l1 = gate_BF.sum() / n_rows
        x_gate_BD = torch.addmm(self.b_dec_D.detach(), gate_BF, self.W_dec_FD.detach())
        aux = self.mse(x_gate_BD, x_BD)
        loss = mse + (self.cfg.l1_coefficient * sparsity_scale) * l1 + aux
        return TrainOutput(
            loss=loss,
            parts={"mse": mse.detach(), "l1": l1.detach(), "aux_gated": aux.detach()},
            acts_BF=acts_BF.detach(),
            x_hat_BD=x_hat_BD.detach(),
        )
