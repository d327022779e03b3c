"""SAE architectures behind one registry.

from sae_pipeline.sae import CONFIG_CLASSES, build_sae, load_sae, save_sae
sae = build_sae(CONFIG_CLASSES["topk"](k=32), d_in=576, seed=0)
"""

from __future__ import annotations

from .base import (
    CONFIG_FILENAME,
    SAE,
    SAE_CLASSES,
    WEIGHTS_FILENAME,
    SAEConfig,
    TrainOutput,
    build_sae,
    geometric_median,
    input_scale_factor,
    load_sae,
    save_sae,
)
from .batchtopk import BatchTopKConfig, BatchTopKSAE
from .gated import GatedConfig, GatedSAE
from .jumprelu import JumpReLUConfig, JumpReLUSAE
from .relu import ReLUConfig, ReLUSAE
from .topk import TopKConfig, TopKSAE

for _cls in (ReLUSAE, TopKSAE, BatchTopKSAE, JumpReLUSAE, GatedSAE):
    SAE_CLASSES[_cls.config_class.arch] = _cls

# arch name -> config dataclass (e.g. to register Hydra structured-config schemas).
CONFIG_CLASSES: dict[str, type[SAEConfig]] = {name: cls.config_class for name, cls in SAE_CLASSES.items()}
ARCHITECTURES: tuple[str, ...] = tuple(CONFIG_CLASSES)

__all__ = [
    "ARCHITECTURES",
    "CONFIG_CLASSES",
    "CONFIG_FILENAME",
    "SAE",
    "SAEConfig",
    "TrainOutput",
    "WEIGHTS_FILENAME",
    "BatchTopKConfig",
    "BatchTopKSAE",
    "GatedConfig",
    "GatedSAE",
    "JumpReLUConfig",
    "JumpReLUSAE",
    "ReLUConfig",
    "ReLUSAE",
    "TopKConfig",
    "TopKSAE",
    "build_sae",
    "geometric_median",
    "input_scale_factor",
    "load_sae",
    "save_sae",
]
