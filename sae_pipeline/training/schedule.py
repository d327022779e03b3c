"""Learning-rate and sparsity schedules: pure functions of the step, so a resume needs no scheduler state.

Learning rate (`train.lr`, or `default_lr(d_sae, the architecture's default_lr_scale)` when it is not
given): linear warm-up from 0 over `lr_warmup_steps` but at most a tenth of the steps (scripts/bench_quality.py:
a 146-step run with the default 100 warm-up steps ends at FVU 0.179, with 14 at 0.164), constant `lr`, then
linear decay to 0 over the final `lr_decay_fraction` of the steps. The sparsity coefficient warms up linearly from 0 to its full
value over `sparsity_warmup_steps` (the `sparsity_scale` handed to the SAE).
"""

from __future__ import annotations

import math


def default_lr(d_sae: int, scale: float = 1.0) -> float:
    """The peak learning rate when `train.lr` is not given: scale * 2e-4 / sqrt(d_sae / 2**14), the scaling
    law Gao et al. (2024, "Scaling and evaluating sparse autoencoders") fit for TopK SAEs (smaller for wider
    dictionaries: 2e-4 at 16,384 latents, 3.77e-4 at 8 x 576) times the architecture's `default_lr_scale`
    (TopK's is measured by scripts/bench_quality.py: a one-pass run wants a larger step than the law's fit)."""
    return scale * 2e-4 / math.sqrt(d_sae / 2**14)


def resolve_lr(lr: float | None, d_sae: int, scale: float = 1.0) -> float:
    """`train.lr` if given, else `default_lr(d_sae, scale)`."""
    return float(lr) if lr is not None else default_lr(d_sae, scale)


def lr_at(step: int, total_steps: int, cfg, base: float | None = None) -> float:
    """Learning rate for optimizer step `step` (0-based): the schedule times `base` (default `cfg.lr`)."""
    scale = 1.0
    # at most a tenth of the run: a short run is not all warm-up
    warmup = min(cfg.lr_warmup_steps, max(1, total_steps // 10))
    if warmup > 0:
        scale = min(scale, (step + 1) / warmup)
    decay_steps = int(cfg.lr_decay_fraction * total_steps)
    if decay_steps > 0:
        scale = min(scale, (total_steps - step) / decay_steps)
    return (cfg.lr if base is None else base) * max(scale, 0.0)


def sparsity_scale_at(step: int, cfg) -> float:
    if cfg.sparsity_warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / cfg.sparsity_warmup_steps)
