"""The architecture registry: `arch` name -> SAE class; each architecture file registers itself."""

from __future__ import annotations

from sae_pipeline.errors import UserError

from .base import SAE, SAEConfig

SAE_CLASSES: dict[str, type[SAE]] = {}


def register(cls: type[SAE]) -> type[SAE]:
    """Class decorator: make `cls` buildable by its config's `arch` name."""
    SAE_CLASSES[cls.config_class.arch] = cls
    return cls


def config_classes() -> dict[str, type[SAEConfig]]:
    """arch name -> config dataclass (e.g. to register Hydra structured-config schemas)."""
    return {name: cls.config_class for name, cls in SAE_CLASSES.items()}


def config_class(arch: str, where: str = "sae.arch") -> type[SAEConfig]:
    if arch not in SAE_CLASSES:
        raise UserError(f"{where}={arch!r} is unknown; choose one of {', '.join(sorted(SAE_CLASSES))}.")
    return SAE_CLASSES[arch].config_class


def build_sae(cfg: SAEConfig, d_in: int, seed: int | None = None, d_out: int | None = None) -> SAE:
    """Instantiate the architecture named by cfg.arch (with d_out: a transcoder predicting d_out-sized rows)."""
    return SAE_CLASSES[config_class(cfg.arch).arch](cfg, d_in, seed=seed, d_out=d_out)
