"""Schema of `sae-steer` (ConfigStore name `steer_schema`) and its checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

from sae_pipeline.errors import UserError, check_choice

from .common import PathsConfig
from .source import SourceConfig

STEER_MODES = ("add", "clamp", "ablate")


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
    sae_path: str = MISSING  # a run folder, its sae/ folder, a SAELens folder or a .safetensors file
    paths: PathsConfig = field(default_factory=PathsConfig)
    source: SourceConfig = field(default_factory=SourceConfig)  # an SAE not trained here
    steer: SteerConfig = field(default_factory=SteerConfig)


def check_steer_config(s) -> None:
    """Raise a UserError naming the first bad key of `steer`."""
    check_choice("steer.mode", s.mode, STEER_MODES)
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
