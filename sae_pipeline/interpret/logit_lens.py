"""Logit lens of decoder rows: which output tokens a latent's direction promotes and suppresses.

W_U @ (g * W_dec[f]), where g is the final norm's scale (the norm's centring and division by the RMS are
left out: a direction has no meaningful norm statistics, so this is the usual direct-logit approximation:
it ranks tokens by how adding the row would move their logits).
"""

from __future__ import annotations

import torch
from torch import Tensor

_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_norm", "norm_f")


def final_norm_scale(model) -> Tensor | None:
    """The final norm's elementwise scale g (None when the model has no recognisable final norm)."""
    base = getattr(model, "base_model", model)
    for name in _FINAL_NORM_NAMES:
        norm = getattr(base, name, None)
        weight = getattr(norm, "weight", None)
        if isinstance(weight, Tensor):
            g = weight.detach().float()
            # Gemma-style RMSNorm multiplies by (1 + weight)
            return g + 1.0 if "gemma" in type(norm).__name__.lower() else g
    return None


def logit_effects(model, W_dec_FD: Tensor) -> Tensor | None:
    """[F, V] direct effect of each decoder row on the logits: W_U @ (g * W_dec[f]); None if D mismatches."""
    head = model.get_output_embeddings()
    if head is None or head.weight.shape[1] != W_dec_FD.shape[1]:
        return None  # e.g. an MLP-internal hook: its rows do not live in the residual stream
    W_U_VD = head.weight.detach().float()
    dirs_FD = W_dec_FD.detach().float().to(W_U_VD.device)
    g = final_norm_scale(model)
    if g is not None:
        dirs_FD = dirs_FD * g.to(W_U_VD.device)
    return dirs_FD @ W_U_VD.T


def top_logit_tokens(model, W_dec_FD: Tensor, n: int, chunk: int = 256):
    """(promoted ids, values, suppressed ids, values), each [F, n] strongest first; None if no logit lens.

    Computed in chunks of latents so a large dictionary never materialises the full [F, vocab] matrix."""
    if n == 0 or logit_effects(model, W_dec_FD[:1]) is None:
        return None
    parts = []
    for start in range(0, W_dec_FD.shape[0], chunk):
        eff_FV = logit_effects(model, W_dec_FD[start : start + chunk])
        m = min(n, eff_FV.shape[1])
        up, down = eff_FV.topk(m, dim=1), eff_FV.topk(m, dim=1, largest=False)
        parts.append((up.indices, up.values, down.indices, down.values))
    return tuple(torch.cat(p).cpu() for p in zip(*parts, strict=True))
