"""Measurements taken during training: validation on held-out store rows, and loss recovered.

Validation uses whole contexts of the store that the reader never trains on (val/mse in raw
units summed over D, val/fvu, val/l0). Loss recovered splices the SAE (input scale folded in)
into the store's model on its held-out text with `evaluation.splice.SpliceEvaluator`, the same
code `sae-eval` runs; when the model cannot be loaded this is logged once and skipped.
"""

from __future__ import annotations

import torch

from sae_pipeline.errors import UserError
from sae_pipeline.evaluation import metrics


@torch.no_grad()
def validate(member, val_ND: torch.Tensor, batch_size: int, device) -> dict:
    """A transcoder's rows hold input and target side by side: it is scored on the target, in raw units."""
    s, d_in = member.input_scale, member.sae.d_in
    s_out = member.target.scale if member.target is not None else s
    ref_ND = val_ND[:, d_in:] if member.target is not None else val_ND
    err = l0 = 0.0
    x_hats = []
    for start in range(0, val_ND.shape[0], batch_size):
        x_BD = val_ND[start : start + batch_size, :d_in].to(device)
        acts_BF = member.sae.encode(x_BD * s)
        x_hat_BD = member.sae.decode_from(acts_BF, x_BD * s).float() / s_out
        err += (
            metrics.squared_error_per_token(ref_ND[start : start + batch_size].to(device), x_hat_BD)
            .sum()
            .item()
        )
        l0 += metrics.l0_per_token(acts_BF).sum().item()
        x_hats.append(x_hat_BD.cpu())
    n = val_ND.shape[0]
    return {
        "val/mse": err / n,
        "val/fvu": metrics.fvu(ref_ND, torch.cat(x_hats)),
        "val/l0": l0 / n,
    }


class LossRecovered:
    """Loads the store's model once (lazily) and scores SAEs spliced into it.

    One SpliceEvaluator serves every call, so the SAE-independent baselines (zero and mean
    ablation) are measured once per run, not at every evaluation step."""

    def __init__(self, store, tcfg, device, logger, target=None):
        self.store, self.tcfg, self.device, self.logger = store, tcfg, device, logger
        self.target = target  # a transcoder's target store: its hook is the one spliced
        self.evaluator = None  # a SpliceEvaluator on the held-out tokens, once loaded
        self.disabled = False

    def _load(self, step: int) -> bool:
        if self.evaluator is not None or self.disabled:
            return not self.disabled
        try:
            from sae_pipeline.data import text
            from sae_pipeline.data.tensors import heldout_examples
            from sae_pipeline.evaluation.scorer import store_scorer
            from sae_pipeline.model import loading

            manifest, n = self.store.manifest, self.tcfg.eval_tokens
            model, tokenizer = loading.load_model(manifest["model"], device=self.device)
            self.evaluator = store_scorer(
                model,
                tokenizer,
                self.store.hook_name,
                self.target.hook_name if self.target is not None else None,
                self.tcfg.eval_batch_size,
                lambda: (
                    heldout_examples(manifest, n)
                    if tokenizer is None
                    else text.heldout_contexts(manifest, tokenizer, n)
                ),
                transcoder_refusal="a transcoder on a model=torch_module store has no loss recovered during training yet",
            )
        except (UserError, OSError, ImportError, KeyError, ValueError) as err:
            self.disabled = True
            self.logger.event(
                step, f"loss recovered is skipped: the store's model cannot be loaded ({err})", True
            )
        return not self.disabled

    def __call__(self, member, step: int) -> None:
        if not self._load(step):
            return
        rng = torch.get_rng_state()
        out = self.evaluator.evaluate(member.folded(), activation=False)
        torch.set_rng_state(rng)
        keys = ("ce_clean", "ce_zero", "ce_mean", "ce_sae", "loss_recovered", "ce_increase", "kl")
        member.logger.show(step, {f"eval/{k}": float(out[k]) for k in keys if k in out})
