"""JumpReLU SAE (Rajamanoharan et al. 2024): JumpReLU_theta(z) = z * H(z - theta), per-latent theta > 0.

theta = exp(log_threshold_F). The loss is MSE + l0_coefficient * mean_B sum_F H(z - theta). The step H has
zero gradient almost everywhere, so both the JumpReLU output and the L0 count use straight-through estimators
with a rectangle kernel of width eps (`bandwidth`), rect(u) = 1 for |u| < 1/2:
    d/dtheta H(z - theta)            ~= -(1/eps)     * rect((z - theta) / eps)
    d/dtheta [z * H(z - theta)]      ~= -(theta/eps) * rect((z - theta) / eps)
    d/dz     [z * H(z - theta)]       =  H(z - theta)             (and d/dz H = 0: L0 only trains theta)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import SAE, SAEConfig, TrainOutput


@dataclass
class JumpReLUConfig(SAEConfig):
    """JumpReLU SAE trained with an L0 penalty through straight-through estimators."""

    arch: str = "jumprelu"
    # Weight of the L0 term: one active latent must save more than this much summed squared error. With
    # inputs normalised to mean norm sqrt(d_in) (total energy ~d_in), a latent of magnitude m saves ~m^2,
    # so 1.0 prices out latents below magnitude ~1 (a small fraction of a typical sqrt(d_in / L0)).
    l0_coefficient: float = 1.0
    bandwidth: float = 0.001  # eps: width of the rectangle kernel of the straight-through estimators
    init_threshold: float = 0.001  # initial theta for every latent

    def validate(self) -> None:
        super().validate()
        self._check_nonnegative("l0_coefficient", self.l0_coefficient)
        self._check_positive("bandwidth", self.bandwidth)
        self._check_positive("init_threshold", self.init_threshold)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z_BF: Tensor, theta_F: Tensor, bandwidth: float) -> Tensor:
        active_BF = z_BF > theta_F
        ctx.save_for_backward(z_BF, theta_F, active_BF)
        ctx.bandwidth = bandwidth
        return z_BF * active_BF

    @staticmethod
    def backward(ctx, grad_BF: Tensor):
        z_BF, theta_F, active_BF = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = grad_theta = None
        if ctx.needs_input_grad[0]:
            grad_z = grad_BF * active_BF
        if ctx.needs_input_grad[1]:
            near_BF = (z_BF - theta_F).abs_() < eps / 2
            grad_theta = -(theta_F / eps) * (grad_BF * near_BF).sum(0)
        return grad_z, grad_theta, None


class _StepL0(torch.autograd.Function):
    """sum over F of H(z - theta), mean over B; gradient only to theta."""

    @staticmethod
    def forward(ctx, z_BF: Tensor, theta_F: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z_BF, theta_F)
        ctx.bandwidth = bandwidth
        return (z_BF > theta_F).sum(dtype=z_BF.dtype) / z_BF.shape[0]

    @staticmethod
    def backward(ctx, grad: Tensor):
        z_BF, theta_F = ctx.saved_tensors
        eps = ctx.bandwidth
        near_count_F = ((z_BF - theta_F).abs_() < eps / 2).sum(0, dtype=z_BF.dtype)
        grad_theta = (-grad / (eps * z_BF.shape[0])) * near_count_F
        return None, grad_theta, None


def jumprelu(z_BF: Tensor, theta_F: Tensor, bandwidth: float) -> Tensor:
    return _JumpReLU.apply(z_BF, theta_F, bandwidth)


def step_l0(z_BF: Tensor, theta_F: Tensor, bandwidth: float) -> Tensor:
    return _StepL0.apply(z_BF, theta_F, bandwidth)


class JumpReLUSAE(SAE):
    config_class = JumpReLUConfig
    cfg: JumpReLUConfig

    def _init_extra(self) -> None:
        self.log_threshold_F = nn.Parameter(torch.full((self.d_sae,), math.log(self.cfg.init_threshold)))

    @property
    def threshold_F(self) -> Tensor:
        return self.log_threshold_F.exp()

    def _fold_extra(self, inv: float) -> None:
        self.log_threshold_F.add_(math.log(inv))

    def encode(self, x_BD: Tensor) -> Tensor:
        return jumprelu(self.pre_acts(x_BD), self.threshold_F, self.cfg.bandwidth)

    def training_forward(
        self, x_BD: Tensor, sparsity_scale: float = 1.0, dead_mask_F: Tensor | None = None
    ) -> TrainOutput:
        z_BF = self.pre_acts(x_BD)
        theta_F = self.threshold_F
        acts_BF = jumprelu(z_BF, theta_F, self.cfg.bandwidth)
        x_hat_BD = self.decode(acts_BF)
        mse = self.mse(x_hat_BD, x_BD)
        l0 = step_l0(z_BF, theta_F, self.cfg.bandwidth)
        loss = mse + (self.cfg.l0_coefficient * sparsity_scale) * l0
        return TrainOutput(
            loss=loss,
            parts={"mse": mse.detach(), "l0_penalty": l0.detach()},
            acts_BF=acts_BF.detach(),
            x_hat_BD=x_hat_BD.detach(),
        )
