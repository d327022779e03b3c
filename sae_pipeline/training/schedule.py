"""Learning-rate and sparsity schedules: pure functions of the step, so a resume needs no scheduler state.

Learning rate: linear warm-up from 0 over `lr_warmup_steps`, constant `lr`, then linear decay to 0 over
the final `lr_decay_fraction` of the steps. The sparsity coefficient warms up linearly from 0 to its full
value over `sparsity_warmup_steps` (the `sparsity_scale` handed to the SAE).
"""

from __future__ import annotations


def lr_at(step: int, total_steps: int, cfg) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    scale = 1.0
    if cfg.lr_warmup_steps > 0:
        scale = min(scale, (step + 1) / cfg.lr_warmup_steps)
    decay_steps = int(cfg.lr_decay_fraction * total_steps)
    if decay_steps > 0:
        scale = min(scale, (total_steps - step) / decay_steps)
    return cfg.lr * max(scale, 0.0)


def sparsity_scale_at(step: int, cfg) -> float:
    if cfg.sparsity_warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / cfg.sparsity_warmup_steps)
