"""Schema of `sae-verify` (ConfigStore name `verify_schema`)."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING


@dataclass
class VerifyJob:
    path: str = MISSING  # a store, a run, or any folder holding stores and runs
