"""Schema of `sae-connect` (ConfigStore name `connect_schema`) and its checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

from sae_pipeline.errors import UserError
from sae_pipeline.interpret.connectors import ConnectorConfig

from .common import PathsConfig


@dataclass
class ConnectConfig(ConnectorConfig):
    """The connector's training settings (interpret/connectors.py) plus where rows come from and go to."""

    batch_size: int = 4096  # rows per Adam step (0: all rows at once)
    n_rows: int = 100_000  # matched (context, position) rows read from the two stores (0: all)
    val_fraction: float = 0.1  # rows held out for the reported metrics
    # init=e2wd1: a safetensors file with `weight` [d_in of sae_out, d_in of sae_in] (+ optional `bias`),
    # the layer between the two hook points (L2 = ReLU(L1 W^T + b))
    layer_weights: Optional[str] = None
    out: Optional[str] = None  # output folder; null: <paths.root>/connect/<sae_in run>__<sae_out run>
    overwrite: bool = False  # replace an existing output folder's files
    device: str = "auto"  # auto | cpu | cuda | cuda:N


@dataclass
class ConnectJob:
    sae_in: str = MISSING  # run folder of the SAE on the earlier hook point (F1)
    sae_out: str = MISSING  # run folder of the SAE on the later hook point (F2), same contexts
    paths: PathsConfig = field(default_factory=PathsConfig)
    connect: ConnectConfig = field(default_factory=ConnectConfig)


def check_connect_config(cfg) -> None:
    """Raise a UserError naming the first bad key."""
    c = cfg.connect
    if c.n_rows < 0:
        raise UserError(f"connect.n_rows must be >= 0 (0 = every matched row), got {c.n_rows}.")
    if not 0.0 < c.val_fraction < 1.0:
        raise UserError(f"connect.val_fraction must be between 0 and 1, got {c.val_fraction}.")
    if c.init == "e2wd1" and not c.layer_weights:
        raise UserError("connect.init=e2wd1 needs connect.layer_weights=<file.safetensors> (weight, bias).")
