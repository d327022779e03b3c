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
from .registry import register


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


def _active_mask(z_BF: Tensor, theta_F: Tensor) -> Tensor:
    """H(z - theta) as 0/1 in z's dtype (a float mask: comparisons into a float buffer and float products are
    several times faster on CPU than bool masks, which `z * bool_mask` first converts to a float copy)."""
    return torch.gt(z_BF, theta_F, out=torch.empty_like(z_BF))


def _near_mask(z_BF: Tensor, theta_F: Tensor, eps: float) -> Tensor:
    """rect((z - theta) / eps) = 1[|z - theta| < eps / 2] as 0/1 in a new float buffer (three in-place passes)."""
    near_BF = torch.sub(z_BF, theta_F).abs_()
    return torch.lt(near_BF, eps / 2, out=near_BF)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z_BF: Tensor, theta_F: Tensor, bandwidth: float) -> Tensor:
        active_BF = _active_mask(z_BF, theta_F)
        ctx.save_for_backward(z_BF, theta_F, active_BF)
        ctx.bandwidth = bandwidth
        return active_BF * z_BF

    @staticmethod
    def backward(ctx, grad_BF: Tensor):
        z_BF, theta_F, active_BF = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = grad_theta = None
        if ctx.needs_input_grad[0]:
            grad_z = grad_BF * active_BF
        if ctx.needs_input_grad[1]:
            near_BF = _near_mask(z_BF, theta_F, eps).mul_(grad_BF)
            grad_theta = -(theta_F / eps) * near_BF.sum(0)
        return grad_z, grad_theta, None


class _StepL0(torch.autograd.Function):
    """sum over F of H(z - theta), mean over B; gradient only to theta."""

    @staticmethod
    def forward(ctx, z_BF: Tensor, theta_F: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z_BF, theta_F)
        ctx.bandwidth = bandwidth
        return _active_mask(z_BF, theta_F).sum() / z_BF.shape[0]

    @staticmethod
    def backward(ctx, grad: Tensor):
        z_BF, theta_F = ctx.saved_tensors
        eps = ctx.bandwidth
        near_count_F = _near_mask(z_BF, theta_F, eps).sum(0)
        grad_theta = (-grad / (eps * z_BF.shape[0])) * near_count_F
        return None, grad_theta, None


def jumprelu(z_BF: Tensor, theta_F: Tensor, bandwidth: float) -> Tensor:
    return _JumpReLU.apply(z_BF, theta_F, bandwidth)


def step_l0(z_BF: Tensor, theta_F: Tensor, bandwidth: float) -> Tensor:
    return _StepL0.apply(z_BF, theta_F, bandwidth)


class _JumpReLUDecodeL0(torch.autograd.Function):
    """Training step fused: (x_hat, l0, acts) from the pre-activations z with ONE mask pass shared by all three.

    x_hat = (z * H(z - theta)) @ W_dec + b_dec, l0 = sum H(z - theta) / B, acts = z * H(z - theta) (no grad).
    Gradients are exactly those of `decode(jumprelu(z))` + `step_l0(z)`; the backward owns its B x F buffers, so
    it works in place: 2 mm + ~8 elementwise passes and 2 B x F allocations (autograd through the separate
    pieces needed ~15 passes and ~9 allocations, and each fresh 75 MB CPU buffer costs page faults).
    Matmuls in the backward run in the dtype the forward product ran in (bf16 under autocast, as autograd would).
    """

    @staticmethod
    def forward(ctx, z_BF, theta_F, W_dec_FD, b_dec_D, bandwidth: float):
        active_BF = _active_mask(z_BF, theta_F)
        l0 = active_BF.sum() / z_BF.shape[0]
        acts_BF = active_BF * z_BF
        x_hat_BD = torch.addmm(b_dec_D, acts_BF, W_dec_FD)
        ctx.save_for_backward(z_BF, theta_F, W_dec_FD, active_BF, acts_BF)
        ctx.bandwidth, ctx.mm_dtype = bandwidth, x_hat_BD.dtype
        ctx.mark_non_differentiable(acts_BF)
        return x_hat_BD, l0, acts_BF

    @staticmethod
    def backward(ctx, grad_BD, grad_l0, _grad_acts):
        z_BF, theta_F, W_dec_FD, active_BF, acts_BF = ctx.saved_tensors
        eps, n_rows = ctx.bandwidth, z_BF.shape[0]
        grad_z = grad_theta = grad_W = grad_b = None
        dt = ctx.mm_dtype
        g_BD = grad_BD.to(dt) if grad_BD is not None else None
        if g_BD is not None and ctx.needs_input_grad[2]:
            grad_W = acts_BF.t().to(dt) @ g_BD
        if g_BD is not None and ctx.needs_input_grad[3]:
            grad_b = grad_BD.sum(0)
        need_z, need_theta = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g_acts_BF = g_BD @ W_dec_FD.to(dt).t() if g_BD is not None and (need_z or need_theta) else None
        if need_theta:
            near_BF = _near_mask(z_BF, theta_F, eps)
            grad_theta = torch.zeros_like(theta_F)
            if grad_l0 is not None:  # d l0 / d theta = -(1/eps) rect / B
                grad_theta.add_(near_BF.sum(0), alpha=-1.0 / (eps * n_rows)).mul_(grad_l0)
            if g_acts_BF is not None:  # d acts / d theta = -(theta/eps) rect
                grad_theta.addcmul_(near_BF.mul_(g_acts_BF).sum(0), theta_F, value=-1.0 / eps)
        if need_z and g_acts_BF is not None:
            grad_z = g_acts_BF.mul_(active_BF)
        return grad_z, grad_theta, grad_W, grad_b, None


@register
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
        self,
        x_BD: Tensor,
        sparsity_scale: float = 1.0,
        dead_mask_F: Tensor | None = None,
        target_BD: Tensor | None = None,
    ) -> TrainOutput:
        y_BD = self._target(x_BD, target_BD)
        # The threshold's straight-through gradient counts pre-activations within bandwidth/2 of theta. bf16
        # spaces values near |z| ~ 1 by 2**-8..2**-7, wider than the default bandwidth (0.001), so a bf16 z
        # gives theta a gradient unrelated to the float32 one (measured: 140% relative error). Under autocast
        # the encoder therefore stays float32; the decoder product inside _JumpReLUDecodeL0 still autocasts.
        with torch.autocast(x_BD.device.type, enabled=False):
            z_BF = self.pre_acts(x_BD.float())
        theta_F = self.threshold_F
        x_hat_BD, l0, acts_BF = _JumpReLUDecodeL0.apply(
            z_BF, theta_F, self.W_dec_FD, self.b_dec_D, self.cfg.bandwidth
        )
        x_hat_BD = self._with_skip(x_BD, x_hat_BD)
        mse = self.mse(x_hat_BD, y_BD)
        loss = mse + (self.cfg.l0_coefficient * sparsity_scale) * l0
        return TrainOutput(
            loss=loss,
            parts={"mse": mse.detach(), "l0_penalty": l0.detach()},
            acts_BF=acts_BF.detach(),
            x_hat_BD=x_hat_BD.detach(),
        )
