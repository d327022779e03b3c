"""Schema of `sae-features` (ConfigStore name `features_schema`) and its checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

from sae_pipeline.errors import UserError

from .advanced import FeaturesAdvanced
from .common import PathsConfig
from .source import SourceConfig


@dataclass
class FeaturesConfig:
    n_tokens: int = 32_768  # valid (non-BOS) tokens of the store's held-out text to scan, in one pass
    top_k: int = 20  # top-activating contexts kept per latent (ranked by the context's peak activation)
    window_before: int = 12  # tokens shown before the peak token
    window_after: int = 4  # tokens shown after the peak token
    n_weak: int = 8  # weaker examples per latent, one per quantile band of a uniform sample of its firings
    n_silent: int = 8  # contexts where the latent never fires, sampled per latent (sae-explain's negatives)
    n_logit_tokens: int = 10  # promoted and suppressed output tokens per latent
    n_bins: int = 32  # activation histogram bins (linear, exact counts; range <= 2x the max)
    batch_size: int = 8  # contexts per forward pass
    max_latents: int = 0  # browse only the first N latents (0 = all); ignored when `latents` is set
    # explicit latent ids to browse (empty = see max_latents)
    latents: list[int] = field(default_factory=list)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0  # seeds the uniform sample behind the weak examples
    out_dir: Optional[str] = None  # null: <run>/features
    # the size of the weak examples' sample (schema/advanced.py; --help folds it)
    advanced: FeaturesAdvanced = field(default_factory=FeaturesAdvanced)


@dataclass
class FeaturesJob:
    sae_path: str = MISSING  # a run folder, its sae/ folder, a SAELens folder or a .safetensors file
    paths: PathsConfig = field(default_factory=PathsConfig)
    source: SourceConfig = field(default_factory=SourceConfig)  # an SAE not trained here
    features: FeaturesConfig = field(default_factory=FeaturesConfig)


def check_features_config(f) -> None:
    """Raise a UserError naming the first bad key of `features`."""
    for key in ("n_tokens", "top_k", "batch_size", "n_bins"):
        if int(f[key]) < 1:
            raise UserError(f"features.{key} must be >= 1, got {f[key]}.")
    if int(f.advanced.reservoir) < 1:
        raise UserError(f"features.advanced.reservoir must be >= 1, got {f.advanced.reservoir}.")
    for key in ("window_before", "window_after", "n_weak", "n_logit_tokens", "max_latents", "n_silent"):
        if int(f[key]) < 0:
            raise UserError(f"features.{key} must be >= 0, got {f[key]}.")
