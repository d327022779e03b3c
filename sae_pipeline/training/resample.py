"""Resampling dead latents (Anthropic, "Towards Monosemanticity", 2023) for the L1 path (`sae=relu`).

    sae-train sae=relu train.resample_every=50 store=...     # at steps 50, 100, ... up to half the run

Every `train.resample_every` steps during the first half of a run (0 = off), each latent the trainer counts
as dead (not fired for `train.dead_tokens` tokens) gets a new direction u: a row of the current batch drawn
with probability proportional to the square of its squared reconstruction error, centred on b_dec and
normalised. Then

    W_dec[f] = u * r_dec            r_dec: mean norm of the live decoder rows (1 with a unit-norm decoder)
    W_enc[:, f] = u * 0.2 * r_enc   r_enc: mean norm of the live encoder columns
    b_enc[f] = 0

and Adam's moments of exactly those entries are zeroed, so a resampled latent starts from its new direction
alone. The draw is seeded by (train.seed, step): a resumed run resamples the same way without saved state.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae_pipeline.errors import UserError

RESAMPLABLE = ("relu",)  # architectures whose parameters are exactly W_enc, b_enc, W_dec, b_dec
ENCODER_SCALE = 0.2


def check_resample(tcfg, arch: str, transcoder: bool = False) -> None:
    if tcfg.resample_every > 0 and transcoder:  # the error that picks the new directions is the target's
        raise UserError(
            f"train.resample_every={tcfg.resample_every} resamples SAEs only, not a transcoder "
            "(train.target_store is set); set train.resample_every=0"
        )
    if tcfg.resample_every > 0 and arch not in RESAMPLABLE:
        raise UserError(
            f"train.resample_every={tcfg.resample_every} resamples dead latents of {', '.join(RESAMPLABLE)} SAEs "
            f"only, not sae.arch={arch!r} (TopK-family SAEs have AuxK); set train.resample_every=0"
        )


def resample_due(step: int, tcfg) -> bool:
    """Whether resampling follows optimizer step `step` (0-based): every resample_every steps, first half."""
    every, total = tcfg.resample_every, max(1, tcfg.total_tokens // tcfg.batch_size)
    return every > 0 and (step + 1) % every == 0 and 2 * (step + 1) <= total


def _zero_moments(opt: torch.optim.Optimizer, param: Tensor, index) -> None:
    state = opt.state.get(param, {})
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key][index] = 0


@torch.no_grad()
def resample_dead(sae, opt: torch.optim.Optimizer, x_BD: Tensor, dead_F: Tensor, seed: int) -> Tensor:
    """Give every latent marked in the boolean dead_F a new direction from x_BD; returns their indices."""
    dead = dead_F.nonzero().squeeze(1)
    if dead.numel() == 0:
        return dead
    x_BD = x_BD.float()
    err_B = (sae(x_BD).float() - x_BD).pow(2).sum(1)
    weights_B = err_B.pow(2).cpu()
    if not bool(weights_B.sum() > 0):  # a perfect reconstruction: any row will do
        weights_B = torch.ones_like(weights_B)
    gen = torch.Generator().manual_seed(seed)
    rows = torch.multinomial(weights_B, dead.numel(), replacement=True, generator=gen).to(x_BD.device)
    dir_ND = x_BD[rows] - sae.b_dec_D.float()
    u_ND = dir_ND / dir_ND.norm(dim=1, keepdim=True).clamp_min(1e-12)
    alive = ~dead_F
    r_dec = sae.W_dec_FD[alive].norm(dim=1).mean() if bool(alive.any()) else torch.tensor(1.0)
    r_enc = sae.W_enc_DF[:, alive].norm(dim=0).mean() if bool(alive.any()) else torch.tensor(1.0)
    sae.W_dec_FD[dead] = (u_ND * r_dec).to(sae.W_dec_FD.dtype)
    sae.W_enc_DF[:, dead] = (u_ND * (ENCODER_SCALE * r_enc)).t().to(sae.W_enc_DF.dtype)
    sae.b_enc_F[dead] = 0
    _zero_moments(opt, sae.W_dec_FD, dead)
    _zero_moments(opt, sae.W_enc_DF, (slice(None), dead))
    _zero_moments(opt, sae.b_enc_F, dead)
    return dead
