"""Typed schemas of `sae-features` and `sae-steer` (ConfigStore names `features_schema`, `steer_schema`).

OmegaConf 2.3 rejects Literal/Union, so choices are `str` fields checked in `check_*`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from sae_pipeline.config import PathsConfig
from sae_pipeline.errors import UserError

STEER_MODES = ("add", "clamp", "ablate")


@dataclass
class FeaturesConfig:
    n_tokens: int = 32_768  # valid (non-BOS) tokens of the store's held-out text to scan, in one pass
    top_k: int = 20  # top-activating contexts kept per latent (ranked by the context's peak activation)
    window_before: int = 12  # tokens shown before the peak token
    window_after: int = 4  # tokens shown after the peak token
    n_weak: int = 8  # weaker examples per latent, one per quantile band of a uniform sample of its firings
    reservoir: int = 64  # size of that uniform sample of firing positions per latent
    n_logit_tokens: int = 10  # promoted and suppressed output tokens per latent
    n_bins: int = 32  # activation histogram bins (linear, exact counts; range <= 2x the max)
    batch_size: int = 8  # contexts per forward pass
    max_latents: int = 0  # browse only the first N latents (0 = all); ignored when `latents` is set
    latents: list[int] = field(
        default_factory=list
    )  # explicit latent ids to browse (empty = see max_latents)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0  # seeds the uniform sample behind the weak examples
    out_dir: Optional[str] = None  # null: <run>/features


@dataclass
class FeaturesJob:
    sae_path: str = MISSING  # a run folder or its sae/ folder
    paths: PathsConfig = field(default_factory=PathsConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)


@dataclass
class SteerConfig:
    prompts: list[str] = field(default_factory=lambda: ["To be, or not to be, that is the question:"])
    latents: list[int] = field(default_factory=lambda: [0])  # latent ids, each steered on its own
    # add: coefficient of the direction added at every position (see unit_direction);
    # clamp: the activation value the latent is forced to; ablate: unused (the value is 0).
    scales: list[float] = field(default_factory=lambda: [4.0, 8.0])
    mode: str = "add"  # add | clamp | ablate
    unit_direction: bool = True  # add: scale x W_dec[f]/||W_dec[f]|| (true) or scale x W_dec[f] (false)
    skip_bos: bool = True  # leave the BOS position untouched (its activation is usually an outlier)
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy; > 0 samples, with the same seed for baseline and steered
    seed: int = 0
    n_next_tokens: int = 5  # top next-token predictions recorded after the prompt, baseline vs steered
    device: str = "auto"
    out_dir: Optional[str] = None  # null: <run>/steer


@dataclass
class SteerJob:
    sae_path: str = MISSING  # a run folder or its sae/ folder
    paths: PathsConfig = field(default_factory=PathsConfig)
    steer: SteerConfig = field(default_factory=SteerConfig)


def register_features_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="features_schema", node=FeaturesJob)
    cs.store(name="steer_schema", node=SteerJob)


def check_features_config(f) -> None:
    """Raise a UserError naming the first bad key of `features`."""
    for key in ("n_tokens", "top_k", "batch_size", "n_bins", "reservoir"):
        if int(f[key]) < 1:
            raise UserError(f"features.{key} must be >= 1, got {f[key]}.")
    for key in ("window_before", "window_after", "n_weak", "n_logit_tokens", "max_latents"):
        if int(f[key]) < 0:
            raise UserError(f"features.{key} must be >= 0, got {f[key]}.")


def check_steer_config(s) -> None:
    """Raise a UserError naming the first bad key of `steer`."""
    if s.mode not in STEER_MODES:
        raise UserError(f"steer.mode must be one of {', '.join(STEER_MODES)}, got {s.mode!r}.")
    if not s.prompts:
        raise UserError("steer.prompts is empty; give at least one prompt.")
    if not s.latents:
        raise UserError("steer.latents is empty; give at least one latent id.")
    if s.mode != "ablate" and not s.scales:
        raise UserError(f"steer.scales is empty; steer.mode={s.mode} needs at least one value.")
    if s.max_new_tokens < 1:
        raise UserError(f"steer.max_new_tokens must be >= 1, got {s.max_new_tokens}.")
    if not s.temperature >= 0:
        raise UserError(f"steer.temperature must be >= 0 (0 = greedy), got {s.temperature}.")
    if s.n_next_tokens < 0:
        raise UserError(f"steer.n_next_tokens must be >= 0, got {s.n_next_tokens}.")
