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
from .registry import register


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


class _GatedDecode(torch.autograd.Function):
    """From h = (x @ W_enc) and per-latent vectors, the gated training quantities with a hand-written backward:

        gate = ReLU(h + bias_gate), acts = 1[gate > 0] * ReLU(h * scale + bias_mag)
        x_hat = acts @ W_dec + b_dec,  x_gate = gate @ W_dec + b_dec (frozen decoder),  gate_sum = sum(gate)
    (acts is returned too, without gradient). The aux reconstruction x_gate sends gradient only to the gate
    (one B x D @ D x F product); W_dec and b_dec get gradient from x_hat alone. Masks are 0/1 floats (the signs
    of gate and acts, which are >= 0), and the backward works in place on the two B x F buffers it owns.
    Matmuls in the backward run in the activations' dtype (what autograd does under autocast).
    """

    @staticmethod
    def forward(ctx, h_BF, bias_gate_F, scale_F, bias_mag_F, W_dec_FD, b_dec_D):
        gate_BF = torch.add(h_BF, bias_gate_F).relu_()
        gate_on_BF = torch.sign(gate_BF)
        acts_BF = torch.addcmul(bias_mag_F, h_BF, scale_F).relu_().mul_(gate_on_BF)
        x_hat_BD = torch.addmm(b_dec_D, acts_BF, W_dec_FD)
        x_gate_BD = torch.addmm(b_dec_D, gate_BF, W_dec_FD)
        gate_sum = gate_BF.sum()
        ctx.save_for_backward(h_BF, scale_F, W_dec_FD, gate_on_BF, acts_BF)
        ctx.mark_non_differentiable(acts_BF)
        return x_hat_BD, x_gate_BD, gate_sum, acts_BF

    @staticmethod
    def backward(ctx, grad_hat_BD, grad_gate_BD, grad_sum, _grad_acts):
        h_BF, scale_F, W_dec_FD, gate_on_BF, acts_BF = ctx.saved_tensors
        dt = acts_BF.dtype
        W_t_DF = W_dec_FD.to(dt).t()
        g_h = g_bias_gate = g_scale = g_bias_mag = g_W = g_b = None
        # magnitude path: d x_hat / d pi_mag = W_dec^T on entries where acts > 0 (gate open and pi_mag > 0)
        g_mag_BF = None
        if grad_hat_BD is not None:
            g_BD = grad_hat_BD.to(dt)
            if ctx.needs_input_grad[4]:
                g_W = acts_BF.t() @ g_BD
            if ctx.needs_input_grad[5]:
                g_b = grad_hat_BD.sum(0)
            g_mag_BF = (g_BD @ W_t_DF).mul_(torch.sign(acts_BF))
            if ctx.needs_input_grad[3]:
                g_bias_mag = g_mag_BF.sum(0)
            if ctx.needs_input_grad[2]:
                g_scale = (g_mag_BF * h_BF).sum(0)
        # gate path: aux reconstruction through the frozen decoder + the L1 (d sum(gate) / d gate = 1)
        g_gate_BF = None
        if grad_gate_BD is not None:
            g_gate_BF = grad_gate_BD.to(dt) @ W_t_DF
            if grad_sum is not None:
                g_gate_BF.add_(grad_sum)
        elif grad_sum is not None:
            g_gate_BF = torch.zeros_like(acts_BF).add_(grad_sum)
        if g_gate_BF is not None:
            g_gate_BF.mul_(gate_on_BF)
            if ctx.needs_input_grad[1]:
                g_bias_gate = g_gate_BF.sum(0)
        if ctx.needs_input_grad[0]:
            if g_gate_BF is None:
                g_h = g_mag_BF * scale_F if g_mag_BF is not None else None
            elif g_mag_BF is None:
                g_h = g_gate_BF
            else:
                g_h = g_gate_BF.addcmul_(g_mag_BF, scale_F)
        return g_h, g_bias_gate, g_scale, g_bias_mag, g_W, g_b


@register
class GatedSAE(SAE):
    config_class = GatedConfig
    cfg: GatedConfig

    def _init_extra(self) -> None:
        self.r_mag_F = nn.Parameter(torch.zeros(self.d_sae))
        self.b_mag_F = nn.Parameter(torch.zeros(self.d_sae))  # the gate bias is b_enc_F

    def _fold_extra(self, inv: float) -> None:
        self.b_mag_F.mul_(inv)

    def _paths(self, x_BD: Tensor) -> tuple[Tensor, Tensor]:
        h_BF = x_BD @ self.W_enc_DF
        shift_F = self._enc_shift_F()  # (x - b_dec) @ W = x @ W - b_dec @ W
        scale_F = self.r_mag_F.exp()
        pi_gate_BF = h_BF + (self.b_enc_F - shift_F)
        pi_mag_BF = torch.addcmul(self.b_mag_F - shift_F * scale_F, h_BF, scale_F)
        return pi_gate_BF, pi_mag_BF

    def encode(self, x_BD: Tensor) -> Tensor:
        pi_gate_BF, pi_mag_BF = self._paths(x_BD)
        return torch.where(pi_gate_BF > 0, pi_mag_BF.relu(), 0.0)

    def training_forward(
        self,
        x_BD: Tensor,
        sparsity_scale: float = 1.0,
        dead_mask_F: Tensor | None = None,
        target_BD: Tensor | None = None,
    ) -> TrainOutput:
        y_BD = self._target(x_BD, target_BD)
        h_BF = x_BD @ self.W_enc_DF
        shift_F = self._enc_shift_F()  # (x - b_dec) @ W = x @ W - b_dec @ W
        scale_F = self.r_mag_F.exp()
        x_hat_BD, x_gate_BD, gate_sum, acts_BF = _GatedDecode.apply(
            h_BF,
            self.b_enc_F - shift_F,
            scale_F,
            self.b_mag_F - shift_F * scale_F,
            self.W_dec_FD,
            self.b_dec_D,
        )
        if self.W_skip_DO is not None:  # the aux path's decoder is frozen: so is its skip term
            skip_BD = (x_BD @ self.W_skip_DO).to(x_hat_BD.dtype)
            x_hat_BD, x_gate_BD = x_hat_BD + skip_BD, x_gate_BD + skip_BD.detach()
        mse = self.mse(x_hat_BD, y_BD)
        l1 = gate_sum / x_BD.shape[0]
        aux = self.mse(x_gate_BD, y_BD)
        loss = mse + (self.cfg.l1_coefficient * sparsity_scale) * l1 + aux
        return TrainOutput(
            loss=loss,
            parts={"mse": mse.detach(), "l1": l1.detach(), "aux_gated": aux.detach()},
            acts_BF=acts_BF.detach(),
            x_hat_BD=x_hat_BD.detach(),
        )
