"""The loss of a masked language model (ESM-2, BERT-style) on evaluation tokens.

A causal LM is scored on next-token prediction. A masked LM is scored the way it was trained: a fixed,
seeded `MASK_FRACTION` of the valid tokens of each context (at least one) is replaced by the mask token,
and the cross-entropy of the original tokens at those positions is the loss. The choice depends only on
the tokens' shape and the seed, so clean, zero-ablated, mean-ablated and SAE-spliced forwards (and every
SAE of a sweep) are scored on the same masked inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae_pipeline.errors import UserError

MASK_FRACTION = 0.15
MASK_SEED = 0


def is_masked_lm(model) -> bool:
    return type(model).__name__.endswith("ForMaskedLM")


def mask_tokens(
    model, input_ids_NT: Tensor, valid_NT: Tensor, seed: int = MASK_SEED
) -> tuple[Tensor, Tensor]:
    """(masked input ids [N, T], scored positions [N, T] bool): the chosen valid tokens become the mask token."""
    mask_id = getattr(model.config, "mask_token_id", None)
    if mask_id is None:
        raise UserError(f"{type(model).__name__} is a masked LM but its config has no mask_token_id.")
    valid_NT = valid_NT.bool().cpu()
    r_NT = torch.rand(input_ids_NT.shape, generator=torch.Generator().manual_seed(seed))
    r_NT[~valid_NT] = 2.0
    score_NT = (r_NT < MASK_FRACTION) & valid_NT
    rows = torch.nonzero(valid_NT.any(1)).squeeze(1)
    score_NT[rows, r_NT[rows].argmin(1)] = True  # at least one scored token per context
    return input_ids_NT.masked_fill(score_NT.to(input_ids_NT.device), int(mask_id)), score_NT


def masked_logprobs(logits_BTV: Tensor, target_BT: Tensor, score_BT: Tensor) -> tuple[Tensor, Tensor]:
    """Log-probabilities at the masked positions and the original tokens there."""
    sel = score_BT.to(logits_BTV.device)
    return torch.log_softmax(logits_BTV[sel].float(), dim=-1), target_BT.to(logits_BTV.device)[sel]
