"""One SAE being trained: its module, optimizer, running statistics, RNG stream and log sink."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from sae_pipeline.errors import UserError
from sae_pipeline.sae import build_sae
from sae_pipeline.training import checkpoint
from sae_pipeline.training.runlog import RunLogger
from sae_pipeline.training.stats import LatentStats


def _adam(params, lr: float, betas, eps: float) -> torch.optim.Adam:
    """Adam with its fused kernel where this torch build has one (same maths, fewer passes)."""
    try:
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, foreach=True)


class Member:
    """One SAE being trained: its model, optimizer, statistics, RNG stream and log sinks."""

    def __init__(
        self, name: str, run_dir: Path, sae_cfg, d_in: int, tcfg, device, input_scale: float, dist=None
    ):
        self.name, self.run_dir, self.sae_cfg, self.input_scale = name, run_dir, sae_cfg, input_scale
        torch.manual_seed(tcfg.seed)  # every member starts from the RNG state a separate run has
        self.sae = build_sae(sae_cfg, d_in, seed=tcfg.seed).to(device)
        self.params = [p for p in self.sae.parameters() if p.requires_grad]
        betas = (tcfg.adam_beta1, tcfg.adam_beta2)
        self.opt = _adam(self.params, tcfg.lr, betas, tcfg.adam_eps)
        self.dist = dist  # training.distributed.Distributed of a data-parallel job, else None
        if dist is not None and dist.active:
            self.sae.collective = dist  # batch-wide top-k and AuxK normaliser over all ranks
        self.stats = LatentStats(self.sae.d_sae, tcfg.dead_tokens, device, dist)
        self.rng = checkpoint.rng_state()[0]
        self.logger: RunLogger | None = None
        self.resumed_from: Path | None = None  # the checkpoint this run resumed from

    def train_step(self, x_BD, step: int, lr: float, sparsity_scale: float, tcfg, autocast) -> None:
        checkpoint.set_rng_state(self.rng, {})
        for group in self.opt.param_groups:
            group["lr"] = lr
        xs_BD = x_BD * self.input_scale if self.input_scale != 1.0 else x_BD
        with autocast():
            out = self.sae.training_forward(
                xs_BD, sparsity_scale=sparsity_scale, dead_mask_F=self.stats.dead_mask_F()
            )
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        check = out.loss.detach().float()
        if self.dist is not None:  # mean gradient (and loss) over ranks, before clipping: ranks stay equal
            check = self.dist.average_grads(self.params, check)
        self.sae.before_optimizer_step()
        if tcfg.max_grad_norm > 0:
            check = check + torch.nn.utils.clip_grad_norm_(self.params, tcfg.max_grad_norm)
        if not torch.isfinite(check).item():
            last = checkpoint.latest(self.run_dir)
            kept = f"the last checkpoint {last} is kept" if last else "no checkpoint had been written yet"
            if last is not None and last == self.resumed_from:  # nothing saved since the resume
                kept += (
                    "; this run resumed from it, so it may be damaged: move it aside and resume again "
                    "to continue from the checkpoint before it"
                )
            raise UserError(
                f"the loss of {self.name or 'the SAE'} became {float(out.loss.detach()):g} (or its gradient non-finite) at step "
                f"{step + 1}, so training stopped; {kept} (lower train.lr or check the store for inf/nan activations)"
            )
        self.opt.step()
        self.sae.after_optimizer_step()
        acts_BF, x_hat_BD = out.acts_BF, out.x_hat_BD
        if acts_BF is None or x_hat_BD is None:
            with torch.no_grad():
                acts_BF = self.sae.encode(xs_BD)
                x_hat_BD = self.sae.decode(acts_BF)
        self.stats.update(xs_BD, x_hat_BD, acts_BF, out.loss, out.parts, self.input_scale)
        self.rng = checkpoint.rng_state()[0]

    def folded(self):
        """A copy that takes raw activations (the input scale folded into the weights)."""
        sae = copy.deepcopy(self.sae).float()
        if self.input_scale != 1.0:
            sae.fold_input_scale(self.input_scale)
        return sae
