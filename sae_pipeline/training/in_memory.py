"""Train one SAE on activations already in memory (small models, notebooks, the digits example).

    sae, metrics = fit_sae(x_ND, ReLUConfig(expansion_factor=4, l1_coefficient=1.0), steps=2000)

The same pieces the store-based trainer uses: the input scale (mean norm sqrt(d_in)), `init_from_data`,
the architecture's `training_forward`, the decoder-norm steps around Adam, a linear sparsity warm-up, and
the scale folded in at the end, so the returned SAE takes and returns raw activations.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae_pipeline.errors import UserError
from sae_pipeline.sae import SAE, SAEConfig, build_sae, input_scale_factor


def fit_sae(
    x_ND: Tensor,
    cfg: SAEConfig,
    steps: int = 2000,
    lr: float = 1e-3,
    batch_size: int = 256,
    sparsity_warmup_steps: int = 0,
    seed: int = 0,
) -> tuple[SAE, dict]:
    """(sae in eval mode with the input scale folded in, {"mse", "fvu", "l0"} on x_ND)."""
    if x_ND.ndim != 2 or x_ND.shape[0] == 0:
        raise UserError(f"fit_sae needs a non-empty [N, d_in] tensor, got shape {list(x_ND.shape)}.")
    if steps < 1 or batch_size < 1:
        raise UserError(f"fit_sae needs steps >= 1 and batch_size >= 1, got {steps} and {batch_size}.")
    x_ND = x_ND.float()
    torch.manual_seed(seed)
    sae = build_sae(cfg, x_ND.shape[1], seed=seed)
    s = input_scale_factor(x_ND)
    xs_ND = x_ND * s
    sae.init_from_data(xs_ND)
    params = [p for p in sae.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n = xs_ND.shape[0]
    for step in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
        warm = min(1.0, (step + 1) / sparsity_warmup_steps) if sparsity_warmup_steps > 0 else 1.0
        for group in opt.param_groups:  # linear decay over the last fifth, as the store trainer's default
            group["lr"] = lr * min(1.0, 5.0 * (steps - step) / steps)
        out = sae.training_forward(xs_ND[idx], sparsity_scale=warm)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step()
    sae.fold_input_scale(s)
    sae.eval().requires_grad_(False)
    with torch.no_grad():
        acts_NF = sae.encode(x_ND)
        err = (sae.decode(acts_NF) - x_ND).pow(2).sum()
        total = (x_ND - x_ND.mean(0)).pow(2).sum()
        metrics = {
            "mse": float(err / n),
            "fvu": float(err / total) if total > 0 else float("nan"),
            "l0": float((acts_NF > 0).sum(1).float().mean()),
            "input_scale": s,
        }
    return sae, metrics
