"""Tied SAE (the seed's tied autoencoder, seeds/002): the decoder is the encoder's transpose, one weight matrix.

    acts = ReLU((x - b_dec) @ W_enc + b_enc)            (with k > 0: only each row's k largest survive)
    x_hat = acts @ W_enc.T + b_dec                      loss = ||x - x_hat||^2 + l1_coefficient * penalty

`W_dec_FD` is a read-only view `W_enc_DF.T` (so the logit lens, steering and every reader of decoder rows
work unchanged); the state dict holds W_enc_DF, b_enc_F and b_dec_D only.

Decoder norms. A row w_f = c u_f (unit u_f) gives activation ~c <u_f, x> and contribution ~c^2 <u_f, x> u_f,
so with the seed's plain L1 on free rows the penalty is linear in c while the reconstruction it buys is
quadratic: below some c shrinking the row always lowers the loss and the latent collapses to zero (measured:
at l1_coefficient=5 on tests/unit/sae/test_recovery.py's data, free rows + plain L1 ended with mean row norm 0.4,
L0 0.3 and FVU 1.0). The two choices offered are the ones sae=relu offers, with the same names:
    l1_decoder_norm (default)  penalty sum_f a_f ||w_f|| (~ c^2, like the reconstruction): rows stay free,
                               so each latent keeps its own gain c^2; nothing is renormalised.
    l1                         the seed's plain L1 sum_f a_f, with every row held at unit norm (the gradient's
                               component along each row removed, then rows renormalised: on W_enc's columns,
                               which are the decoder's rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sae_pipeline.errors import UserError

from .base import SAE, SAEConfig
from .registry import register
from .relu import SPARSITY_PENALTIES, ReLUSAE


@dataclass
class TiedConfig(SAEConfig):
    """Tied SAE: ReLU + L1 (the seed's), optionally TopK selection (then usually l1_coefficient=0)."""

    arch: str = "tied"
    # Weight of the sparsity penalty (mean over rows), on inputs normalised to mean norm sqrt(d_in) as for
    # sae=relu; sweep it for the L0 you want (the transposed encoder cannot cancel interference, so a tied SAE
    # needs a larger L0 than an untied one for the same reconstruction; see the tests' recovery notes).
    l1_coefficient: float = 5.0
    # "l1_decoder_norm": sum_f a_f ||W_dec[f]|| with free rows; "l1": sum_f a_f with unit-norm rows
    sparsity_penalty: str = "l1_decoder_norm"
    k: int = 0  # > 0: keep only each row's k largest pre-activations (TopK selection); 0: plain ReLU

    def validate(self) -> None:
        super().validate()
        self._check_nonnegative("l1_coefficient", self.l1_coefficient)
        if self.sparsity_penalty not in SPARSITY_PENALTIES:
            raise UserError(
                f"sae.sparsity_penalty must be one of {', '.join(SPARSITY_PENALTIES)}, "
                f"got {self.sparsity_penalty!r}."
            )
        if self.k < 0:
            raise UserError(f"sae.k must be >= 0 (0 means no TopK selection), got {self.k}.")


@register
class TiedSAE(SAE):
    config_class = TiedConfig
    cfg: TiedConfig

    def _init_decoder(self, W_dec_FD: Tensor) -> None:
        """No decoder parameter: the base initialised W_enc as W_dec_FD's transpose (unit rows), and the
        decoder is that transpose from then on."""

    def _init_extra(self) -> None:
        if self.d_out != self.d_in:
            raise UserError(
                f"sae=tied cannot be a transcoder from d_in={self.d_in} to d_out={self.d_out}: its decoder is "
                "the encoder's transpose, so both sides need the same size; choose another sae architecture."
            )
        if self.cfg.k > self.d_sae:
            raise UserError(f"sae.k={self.cfg.k} must be <= d_sae={self.d_sae}.")

    @property
    def W_dec_FD(self) -> Tensor:  # noqa: N802 (the project's shape-suffix naming)
        return self.W_enc_DF.t()

    @property
    def unit_norm_decoder(self) -> bool:
        return self.cfg.sparsity_penalty == "l1"

    def _fold_factors(self, s_in: float, s_out: float) -> tuple[float, float]:
        """The one matrix serves both sides: W' = W * s_in * g and the pre-activation scale times g with
        g = 1 / sqrt(s_in * s_out) give acts' = g * acts and y' = s_in g^2 acts W^T = acts W^T / s_out
        (g = 1/s and W unchanged when s_in == s_out)."""
        if s_in == s_out:
            return 1.0, 1.0 / s_out
        g = 1.0 / (s_in * s_out) ** 0.5
        return s_in * g, g

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Remove the gradient component along each (unit-norm) row, i.e. along each column of W_enc."""
        if not self.unit_norm_decoder or self.W_enc_DF.grad is None:
            return
        W_DF, grad_DF = self.W_enc_DF, self.W_enc_DF.grad
        grad_DF.addcmul_((grad_DF * W_DF).sum(dim=0, keepdim=True), W_DF, value=-1.0)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self.unit_norm_decoder:
            self.W_enc_DF.div_(self.W_enc_DF.norm(dim=0, keepdim=True).clamp_min(1e-12))

    def encode(self, x_BD: Tensor) -> Tensor:
        pre_BF = self.pre_acts(x_BD)
        if self.cfg.k > 0:
            top = pre_BF.topk(self.cfg.k, dim=1, sorted=False)
            return torch.zeros_like(pre_BF).scatter(1, top.indices, top.values.relu())
        return pre_BF.relu()

    # the loss is ReLU's, written through this class's own encode/decode and decoder norms
    training_forward = ReLUSAE.training_forward
