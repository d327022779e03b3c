"""A training checkpoint's checksums and values (the folder training/checkpoint.py writes).

state.json lists the sha256 of sae.safetensors and state.safetensors and carries its own seal
(`state_sha256`); a checkpoint written before checksums existed is checked for values only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from sae_pipeline import layout

from .seal import file_problem, seal_matches

STATE_SEAL = "state_sha256"  # state.json's checksum of itself


def checkpoint_problem(ckpt: Path) -> str | None:
    """One sentence when the checkpoint's files do not match their checksums or hold non-finite
    values, else None."""
    try:
        state = json.loads((ckpt / layout.TRAIN_META).read_text())
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        return f"its {layout.TRAIN_META} is unreadable ({err})"
    if not seal_matches(state, STATE_SEAL):
        return f"its {layout.TRAIN_META} does not match its {STATE_SEAL}"
    for name in (layout.SAE_WEIGHTS, layout.TRAIN_STATE):
        why = file_problem(ckpt, name, state)
        if why == "missing":
            return f"its {name} is missing"
        if why:
            return f"its {name} does not match the sha256 recorded in {layout.TRAIN_META}"
        try:
            tensors = load_file(str(ckpt / name))
        except (OSError, SafetensorError) as err:
            return f"its {name} is unreadable ({err})"
        bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            return f"its {name} holds non-finite values in {bad[0]}"
    return None
