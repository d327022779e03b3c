"""An SAE folder on disk: `sae.safetensors` (every parameter and buffer) + `config.json` (arch, sizes, settings)."""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from sae_pipeline import layout
from sae_pipeline.errors import UserError
from sae_pipeline.files import save_tensors_atomic, write_json_atomic
from sae_pipeline.integrity.seal import FILES, file_checksums, file_problem

from .base import SAE
from .registry import SAE_CLASSES, build_sae


def save_sae(sae: SAE, folder: Path | str, extra: dict[str, Any] | None = None) -> None:
    """Write `sae.safetensors` (all parameters and buffers) and `config.json` into folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors_atomic(folder / layout.SAE_WEIGHTS, sae.state_dict())
    meta = {
        "arch": sae.cfg.arch,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        **({"d_out": sae.d_out, "transcoder": True} if sae.transcoder else {}),
        "sae": asdict(sae.cfg),
        **(extra or {}),
        FILES: file_checksums(folder, [layout.SAE_WEIGHTS]),
    }
    write_json_atomic(folder / layout.CONFIG, meta)


def load_sae_folder(folder: Path | str, map_location: str | torch.device = "cpu") -> SAE:
    """Rebuild an SAE from `config.json` and `sae.safetensors` in folder."""
    folder = Path(folder)
    cfg_path, weights_path = folder / layout.CONFIG, folder / layout.SAE_WEIGHTS
    if not cfg_path.is_file():
        raise UserError(f"SAE config file {cfg_path} does not exist.")
    if not weights_path.is_file():
        raise UserError(f"SAE weights file {weights_path} does not exist.")
    try:
        meta = json.loads(cfg_path.read_text())
        arch, d_in, d_sae, cfg_dict = meta["arch"], int(meta["d_in"]), int(meta["d_sae"]), dict(meta["sae"])
        d_out = int(meta["d_out"]) if meta.get("transcoder") else None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise UserError(
            f"SAE config file {cfg_path} is corrupt or lacks arch/d_in/d_sae/sae ({err})."
        ) from None
    if arch not in SAE_CLASSES:
        raise UserError(f"SAE config file {cfg_path} names unknown arch {arch!r}.")
    cfg_cls = SAE_CLASSES[arch].config_class
    known = {f.name for f in fields(cfg_cls)}
    unknown = sorted(set(cfg_dict) - known)
    if unknown:
        raise UserError(f"SAE config file {cfg_path} has unknown sae keys {unknown} for arch {arch!r}.")
    cfg = cfg_cls(**cfg_dict)
    sae = build_sae(cfg, d_in, d_out=d_out)
    if sae.d_sae != d_sae:
        raise UserError(
            f"SAE config file {cfg_path} says d_sae={d_sae} but its sae settings give {sae.d_sae}."
        )
    if file_problem(folder, layout.SAE_WEIGHTS, meta):
        raise UserError(f"SAE weights file {weights_path} is damaged: its sha256 does not match {cfg_path}.")
    try:
        tensors = load_file(str(weights_path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"SAE weights file {weights_path} is corrupt ({err}).") from None
    expected = sae.state_dict()
    if set(tensors) != set(expected):
        raise UserError(
            f"SAE weights file {weights_path} has tensors {sorted(tensors)}, expected {sorted(expected)}."
        )
    for name, ref in expected.items():
        if tensors[name].shape != ref.shape:
            raise UserError(
                f"SAE weights file {weights_path}: tensor {name} has shape {list(tensors[name].shape)}, "
                f"expected {list(ref.shape)}."
            )
    sae.load_state_dict(tensors, strict=True)
    return sae.to(map_location)
