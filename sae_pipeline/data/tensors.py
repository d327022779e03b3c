"""A tensor dataset for `data=tensors`: examples in a safetensors file, split into harvest and held-out parts.

The file holds `inputs` [N, ...] (any dtype the model takes) and optionally `labels` [N] (integer class
ids); no other name. The held-out examples (what sae-eval scores on) are those of `data.eval_path` when it
is set, else a `data.eval_fraction` of `data.path` chosen by a permutation seeded with `harvest.seed`; the
split is a pure function of (data config, seed), so sae-eval recomputes it from the store's manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sae_pipeline.config_access import cfg_value
from sae_pipeline.errors import UserError

NAMES = ("inputs", "labels")


@dataclass
class Examples:
    inputs: Tensor  # [N, ...]
    labels: Tensor | None  # [N] int64, or None
    index: Tensor  # [N] each example's index in its file (the store's context id for harvested ones)


def read_examples(path: str | Path, key: str) -> Examples:
    """The file's examples, its names and shapes checked (UserError naming the file and the tensor)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{key}={path}: no such file")
    try:
        tensors = load_file(str(path))
    except SafetensorError as err:
        raise UserError(f"{key}={path} is not a safetensors file ({err})") from None
    extra = sorted(set(tensors) - set(NAMES))
    if "inputs" not in tensors or extra:
        raise UserError(
            f"{key}={path} must hold tensors named 'inputs' and optionally 'labels'; "
            f"it holds {', '.join(sorted(tensors)) or 'none'}"
        )
    inputs, labels = tensors["inputs"], tensors.get("labels")
    if inputs.ndim < 1 or inputs.shape[0] == 0:
        raise UserError(
            f"{key}={path}: 'inputs' has shape {list(inputs.shape)}; it needs [N, ...] with N >= 1"
        )
    if labels is not None:
        if labels.shape != (inputs.shape[0],) or labels.is_floating_point() or labels.is_complex():
            raise UserError(
                f"{key}={path}: 'labels' must be integer class ids of shape [{inputs.shape[0]}], "
                f"got {labels.dtype} {list(labels.shape)}"
            )
        labels = labels.long()
    return Examples(inputs, labels, torch.arange(inputs.shape[0]))


def _subset(ex: Examples, idx: Tensor) -> Examples:
    return Examples(ex.inputs[idx], None if ex.labels is None else ex.labels[idx], ex.index[idx])


def split(data_cfg: Any, seed: int) -> tuple[Examples, Examples, dict]:
    """(harvest examples, held-out examples, a description for the manifest)."""
    path = cfg_value(data_cfg, "path")
    if not path:
        raise UserError("data=tensors needs data.path=<file.safetensors> with 'inputs' (and 'labels')")
    train = read_examples(path, "data.path")
    eval_path = cfg_value(data_cfg, "eval_path")
    if eval_path:
        held = read_examples(eval_path, "data.eval_path")
        if held.inputs.shape[1:] != train.inputs.shape[1:] or (held.labels is None) != (train.labels is None):
            raise UserError(
                f"data.eval_path={eval_path} must hold the same names and example shape as data.path={path}: "
                f"inputs {list(held.inputs.shape)} vs {list(train.inputs.shape)}"
            )
        desc = {"eval_path": str(eval_path), "n_eval": int(held.inputs.shape[0])}
        return train, held, desc
    frac = float(cfg_value(data_cfg, "eval_fraction", 0.2))
    n = train.inputs.shape[0]
    n_eval = round(frac * n)
    if not 0.0 <= frac < 1.0 or n - n_eval < 1:
        raise UserError(
            f"data.eval_fraction={frac} must be in [0, 1) and leave examples to harvest ({n} in {path})"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    held_idx, keep_idx = perm[:n_eval].sort().values, perm[n_eval:].sort().values
    desc = {"eval_fraction": frac, "n_eval": int(n_eval), "seed": int(seed)}
    return _subset(train, keep_idx), _subset(train, held_idx), desc


def heldout_examples(manifest: dict, n_max: int) -> Examples:
    """The first n_max held-out examples of the store's dataset (recomputed from its config and seed)."""
    data = manifest.get("dataset", {}).get("config") or {}
    _, held, _ = split(data, int(manifest.get("seed", 0)))
    if held.inputs.shape[0] == 0:
        raise UserError(
            f"the store's data holds no held-out example (data.eval_fraction={cfg_value(data, 'eval_fraction')}); "
            "harvest again with data.eval_fraction > 0 or data.eval_path"
        )
    return _subset(held, torch.arange(min(int(n_max), held.inputs.shape[0])))
