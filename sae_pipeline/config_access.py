"""Reading one key of a config group whatever form it comes in, without importing the schemas (which import
the stages' option modules, so data/ and model/ importing them would make an import circle)."""

from __future__ import annotations

from typing import Any


def cfg_value(cfg: Any, key: str, default=None):
    """A key of a config group given as a DictConfig, a plain dict (a manifest's record) or a dataclass."""
    return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
