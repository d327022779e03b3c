"""Standard ReLU SAE: x_hat = ReLU((x - b_dec) @ W_enc + b_enc) @ W_dec + b_dec, with an L1 sparsity penalty."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sae_pipeline.errors import UserError

from .base import SAE, SAEConfig, TrainOutput
from .registry import register

SPARSITY_PENALTIES = ("l1", "l1_decoder_norm")
INITS = ("unit", "anthropic")


@dataclass
class ReLUConfig(SAEConfig):
    """ReLU SAE with an L1 penalty."""

    arch: str = "relu"
    # Weight of the L1 term. Inputs are normalised to mean norm sqrt(d_in) (per-dimension scale ~1) and the
    # MSE is summed over D, so a latent of magnitude m that explains its direction saves ~m^2 of MSE and
    # costs lambda*m: lambda = 5 (Anthropic's April-2024 setting for this very normalisation) keeps latents
    # of magnitude >~ 5 alive; sweep it for the L0 you want.
    l1_coefficient: float = 5.0
    # "l1_decoder_norm": sum_f |a_f| * ||W_dec[f]|| with unconstrained decoder rows;
    # "l1": sum_f |a_f| (the seed's plain L1, averaged over B) with decoder rows kept at unit norm.
    sparsity_penalty: str = "l1_decoder_norm"
    # "unit": decoder rows random unit directions, W_enc = W_dec^T. "anthropic" (Anthropic's April-2024 update,
    # with l1_decoder_norm): decoder rows random directions of norm init_decoder_norm, W_enc = W_dec^T, so a
    # latent starts with a small gain (norm^2) and the L1 term cannot silence it before it has learnt a direction.
    init: str = "unit"
    init_decoder_norm: float = 0.1  # the initial decoder row norm of init=anthropic (their range: 0.05-1)

    def validate(self) -> None:
        super().validate()
        self._check_nonnegative("l1_coefficient", self.l1_coefficient)
        self._check_positive("init_decoder_norm", self.init_decoder_norm)
        if self.init not in INITS:
            raise UserError(f"sae.init must be one of {', '.join(INITS)}, got {self.init!r}.")
        if self.init == "anthropic" and self.sparsity_penalty != "l1_decoder_norm":
            raise UserError(
                "sae.init=anthropic needs sae.sparsity_penalty=l1_decoder_norm (with plain l1 the decoder rows "
                "are held at unit norm, which undoes the init's small row norms)."
            )
        if self.sparsity_penalty not in SPARSITY_PENALTIES:
            raise UserError(
                f"sae.sparsity_penalty must be one of {', '.join(SPARSITY_PENALTIES)}, "
                f"got {self.sparsity_penalty!r}."
            )


@register
class ReLUSAE(SAE):
    config_class = ReLUConfig
    cfg: ReLUConfig

    def _init_row_norm(self) -> float:
        return self.cfg.init_decoder_norm if self.cfg.init == "anthropic" else 1.0

    @property
    def unit_norm_decoder(self) -> bool:
        return self.cfg.sparsity_penalty == "l1"

    def encode(self, x_BD: Tensor) -> Tensor:
        return self.pre_acts(x_BD).relu_()

    def training_forward(
        self,
        x_BD: Tensor,
        sparsity_scale: float = 1.0,
        dead_mask_F: Tensor | None = None,
        target_BD: Tensor | None = None,
    ) -> TrainOutput:
        y_BD = self._target(x_BD, target_BD)
        acts_BF = self.encode(x_BD)
        x_hat_BD = self.decode_from(acts_BF, x_BD)
        mse = self.mse(x_hat_BD, y_BD)
        if self.cfg.sparsity_penalty == "l1_decoder_norm":
            # acts >= 0, so |a| = a and sum_f a_f ||W_dec[f]|| is one matvec (in the acts' dtype: CPU autocast
            # leaves mv alone, and it refuses bf16 acts with float32 norms).
            l1 = torch.mv(acts_BF, self.decoder_norms_F().to(acts_BF.dtype)).mean()
        else:
            l1 = acts_BF.sum() / x_BD.shape[0]
        loss = mse + (self.cfg.l1_coefficient * sparsity_scale) * l1
        return TrainOutput(
            loss=loss,
            parts={"mse": mse.detach(), "l1": l1.detach()},
            acts_BF=acts_BF.detach(),
            x_hat_BD=x_hat_BD.detach(),
        )
