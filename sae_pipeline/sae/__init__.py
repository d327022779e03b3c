"""SAE architectures behind one registry: one file per architecture, shared parts in `base.py`.

    from sae_pipeline.sae import CONFIG_CLASSES, build_sae
    sae = build_sae(CONFIG_CLASSES["topk"](k=32), d_in=576, seed=0)

base.py      config base, module base, init from data, decoder-norm constraint, input-scale folding
relu.py  topk.py  batchtopk.py  jumprelu.py  gated.py  matryoshka.py  tied.py   one per architecture
kernels.py   sparse autograd kernels (gathered encode, embedding-bag decode) for the K-sparse archs
native.py    the C top-k (native.c, built on first use): torch.topk's answer bit for bit, faster
registry.py  arch name -> class (`@register`), build_sae
sharded.py   one latent shard of an SAE: its training step when the latents are split over ranks
batch_reduce.py  batch-wide quantities of a step whose batch is split over data-parallel ranks
saving.py    our SAE folder on disk (sae.safetensors + config.json): save_sae / load_sae_folder
formats.py   other formats: SAELens folders (write_saelens / read_saelens), bare safetensors files;
             read_sae(path) reads any of them (our run folder, our sae/ folder, SAELens, bare file)
"""

from __future__ import annotations

from . import batchtopk, gated, jumprelu, matryoshka, relu, tied, topk  # noqa: F401  (each registers its class)
from .base import SAE, SAEConfig, TrainOutput, geometric_median, input_scale_factor, scale_for_mean_norm
from .batchtopk import BatchTopKConfig, BatchTopKSAE
from .formats import read_sae, read_saelens, write_saelens
from .gated import GatedConfig, GatedSAE
from .jumprelu import JumpReLUConfig, JumpReLUSAE
from .matryoshka import MatryoshkaConfig, MatryoshkaSAE
from .registry import SAE_CLASSES, build_sae, config_class, config_classes
from .relu import ReLUConfig, ReLUSAE
from .saving import load_sae_folder, save_sae
from .tied import TiedConfig, TiedSAE
from .topk import TopKConfig, TopKSAE

CONFIG_CLASSES = config_classes()  # arch name -> config dataclass
ARCHITECTURES: tuple[str, ...] = tuple(SAE_CLASSES)

__all__ = [
    "ARCHITECTURES",
    "CONFIG_CLASSES",
    "SAE",
    "SAE_CLASSES",
    "SAEConfig",
    "TrainOutput",
    "BatchTopKConfig",
    "BatchTopKSAE",
    "GatedConfig",
    "GatedSAE",
    "JumpReLUConfig",
    "JumpReLUSAE",
    "MatryoshkaConfig",
    "MatryoshkaSAE",
    "ReLUConfig",
    "ReLUSAE",
    "TiedConfig",
    "TiedSAE",
    "TopKConfig",
    "TopKSAE",
    "build_sae",
    "config_class",
    "config_classes",
    "geometric_median",
    "input_scale_factor",
    "load_sae_folder",
    "read_sae",
    "read_saelens",
    "save_sae",
    "scale_for_mean_norm",
    "write_saelens",
]
