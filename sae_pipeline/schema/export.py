"""Schema of `sae-export` (ConfigStore name `export_schema`) and its checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

from sae_pipeline.errors import check_choice

from .common import PathsConfig

EXPORT_FORMATS = ("saelens",)


@dataclass
class ExportConfig:
    format: str = (
        "saelens"  # saelens: cfg.json + sae_weights.safetensors (sae_lens 5.x keys, loaded by 6.x too)
    )
    out: Optional[str] = None  # output folder; null: <run>/export/<format>
    # cfg.json's model_name; null: the model the SAE was trained on (its hub id or folder). SAELens's
    # from_pretrained loads models by TransformerLens name, e.g. gpt2-small: set it here when they differ.
    model_name: Optional[str] = None
    neuronpedia_id: Optional[str] = None  # e.g. gpt2-small/8-res-jb, when the SAE is on Neuronpedia
    overwrite: bool = False  # replace an existing export folder's files


@dataclass
class ExportJob:
    sae_path: str = MISSING  # a run folder, an SAE folder, a SAELens folder or a bare .safetensors file
    paths: PathsConfig = field(default_factory=PathsConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


def check_export_config(cfg) -> None:
    """Raise a UserError naming the first bad key."""
    check_choice("export.format", cfg.export.format, EXPORT_FORMATS)
