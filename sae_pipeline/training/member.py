"""One SAE being trained: its module, optimizer, running statistics, RNG stream and log sink."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from sae_pipeline.errors import UserError
from sae_pipeline.sae import build_sae
from sae_pipeline.training import checkpoint
from sae_pipeline.training.resample import check_resample, resample_dead, resample_due
from sae_pipeline.training.runlog import RunLogger
from sae_pipeline.training.schedule import resolve_lr
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
        self, name: str, run_dir: Path, sae_cfg, d_in: int, tcfg, device, input_scale: float, dist=None,
        target=None,
    ):  # fmt: skip
        self.name, self.run_dir, self.sae_cfg, self.input_scale = name, run_dir, sae_cfg, input_scale
        # a transcoder's target (training/transcoder.py's TranscoderTarget: d_out, scale, what to record), else None
        self.target = target
        check_resample(tcfg, sae_cfg.arch, transcoder=target is not None)
        torch.manual_seed(tcfg.seed)  # every member starts from the RNG state a separate run has
        d_out = target.d_out if target is not None else None
        sae = build_sae(sae_cfg, d_in, seed=tcfg.seed, d_out=d_out)
        # peak learning rate: train.lr, or the width's default times the architecture's scale
        self.lr = resolve_lr(tcfg.lr, sae.d_sae, type(sae).default_lr_scale)
        self.sae = self._place(sae).to(device)
        self.params = [p for p in self.sae.parameters() if p.requires_grad]
        adv = tcfg.advanced
        self.opt = _adam(self.params, self.lr, (adv.adam_beta1, adv.adam_beta2), adv.adam_eps)
        self.dist = dist  # training.distributed.Distributed of a data-parallel job, else None
        if dist is not None and dist.active:
            self.sae.collective = dist  # batch-wide top-k and AuxK normaliser over all ranks
        # train.dead_tokens, or the SAE's own default (a K-sparse SAE's follows d_sae / k)
        self.dead_tokens = sae.default_dead_tokens() if tcfg.dead_tokens is None else int(tcfg.dead_tokens)
        self.stats = LatentStats(self.sae.d_sae, self.dead_tokens, device, dist)
        self.rng = checkpoint.rng_state()[0]
        self.logger: RunLogger | None = None
        self.resumed_from: Path | None = None  # the checkpoint this run resumed from
        self._bad_step = self._bad_loss = None  # first non-finite step (device tensors), see _note_finite
        self.checkpoint_root = run_dir  # where its checkpoints/ live (a latent shard: its own folder)

    # ---- what a latent-sharded member (training/latent_shards.py) does differently ----------------
    min_keep = 1  # the fewest checkpoints pruning keeps

    def _place(self, sae):
        """The module this rank trains, from the whole SAE built on the CPU."""
        return sae

    def _clip(self, max_norm: float) -> torch.Tensor:
        """Clip the gradients to a global L2 norm of max_norm; returns the norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(self.params, max_norm)

    def checkpoints(self) -> dict:
        """{step name: checkpoint folder} of the complete checkpoints this member can resume from."""
        return {p.name: p for p in checkpoint.list_checkpoints(self.checkpoint_root)}

    def for_evaluation(self):
        """The member holding the whole SAE, on the rank that validates and saves (itself here)."""
        return self

    def train_step(self, x_BD, step: int, lr: float, sparsity_scale: float, tcfg, autocast) -> None:
        checkpoint.set_rng_state(self.rng, {})
        for group in self.opt.param_groups:
            group["lr"] = lr
        ys_BD, out_scale = None, self.input_scale
        if self.target is not None:  # a transcoder's batch: input and target rows side by side
            x_BD, ys_BD, out_scale = self.target.split_scaled(x_BD, self.sae.d_in)
        xs_BD = x_BD * self.input_scale if self.input_scale != 1.0 else x_BD
        with autocast():
            out = self.sae.training_forward(
                xs_BD, sparsity_scale=sparsity_scale, dead_mask_F=self.stats.dead_mask_F(), target_BD=ys_BD
            )
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        check = out.loss.detach().float()
        if self.dist is not None:  # mean gradient (and loss) over ranks, before clipping: ranks stay equal
            check = self.dist.average_grads(self.params, check)
        self.sae.before_optimizer_step()
        if tcfg.max_grad_norm > 0:
            check = check + self._clip(tcfg.max_grad_norm)
        self._note_finite(check, out.loss, step)
        self.opt.step()
        self.sae.after_optimizer_step()
        sparse, x_hat_BD = out.sparse, out.x_hat_BD
        acts_BF = None if sparse is not None else out.acts_BF  # a sparse code is never made dense here
        if (acts_BF is None and sparse is None) or x_hat_BD is None:
            with torch.no_grad():
                acts_BF, sparse = self.sae.encode(xs_BD), None
                x_hat_BD = self.sae.decode_from(acts_BF, xs_BD)
        ref_BD = xs_BD if ys_BD is None else ys_BD
        self.stats.update(ref_BD, x_hat_BD, acts_BF, out.loss, out.parts, out_scale, sparse)
        if resample_due(step, tcfg):
            self._resample(xs_BD, step, tcfg.seed)
        self.rng = checkpoint.rng_state()[0]

    def _resample(self, xs_BD, step: int, seed: int) -> None:
        """training/resample.py: new directions for the dead latents (rank 0's, on every rank)."""
        dead = resample_dead(self.sae, self.opt, xs_BD, self.stats.dead_mask_F(), seed * 1_000_003 + step)
        self.stats.since_fired_F[dead] = 0
        if self.dist is not None and self.dist.active:
            self.dist.broadcast_module(self.sae)
        if self.logger is not None and dead.numel():
            self.logger.event(step + 1, f"resampled {dead.numel()} dead latents")

    def _note_finite(self, check, loss, step: int) -> None:
        """Remember, on the device, the first step whose loss or gradient norm was not finite.

        Reading it back costs a host sync, so the trainer does it (`check_finite`) at every log line, before
        every checkpoint and before the final save: a non-finite step is never written to disk and always
        stops the run with the step it happened at, without a sync per step."""
        bad = ~torch.isfinite(check)
        if self._bad_step is None:
            self._bad_step = torch.full((), -1, dtype=torch.long, device=check.device)
            self._bad_loss = torch.zeros((), device=check.device)
        first = bad & (self._bad_step < 0)
        self._bad_step = torch.where(first, step + 1, self._bad_step)
        self._bad_loss = torch.where(first, loss.detach().float(), self._bad_loss)

    def check_finite(self) -> None:
        """Raise UserError if a step since the start had a non-finite loss or gradient (one host sync)."""
        if self._bad_step is None or int(self._bad_step) < 0:
            return
        last = checkpoint.latest(self.checkpoint_root)
        kept = f"the last checkpoint {last} is kept" if last else "no checkpoint had been written yet"
        if last is not None and last == self.resumed_from:  # nothing saved since the resume
            kept += (
                "; this run resumed from it, so it may be damaged: move it aside and resume again "
                "to continue from the checkpoint before it"
            )
        raise UserError(
            f"the loss of {self.name or 'the SAE'} became {float(self._bad_loss):g} (or its gradient non-finite) at "
            f"step {int(self._bad_step)}, so training stopped; {kept} (lower train.lr or check the store for inf/nan "
            "activations)"
        )

    def folded(self):
        """A copy that takes raw activations (the input scale folded into the weights)."""
        sae = copy.deepcopy(self.sae).float()
        if self.target is not None:
            sae.fold_input_scale(self.input_scale, self.target.scale)
        elif self.input_scale != 1.0:
            sae.fold_input_scale(self.input_scale)
        return sae
