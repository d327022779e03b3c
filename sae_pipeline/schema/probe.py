"""Schema of `sae-probe` (ConfigStore name `probe_schema`) and its checks.

The task is chosen with the `probe_task` group (conf/probe_task/*.yaml, package `probe`), e.g.
`sae-probe sae_path=... probe_task=speaker`; every key below can also be set directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from sae_pipeline.errors import UserError, check_choice, check_known_keys
from sae_pipeline.interpret.probe_tasks import TASKS

from .common import LOGGER_MODES, LoggerConfig, PathsConfig


@dataclass
class ProbeConfig:
    task: str = "genre"  # genre | play | speaker | files (see sae_pipeline/interpret/probe_tasks.py)
    # play: the plays to tell apart (empty: the store's held-out plays); each is cut into n_sections parts
    plays: list[str] = field(default_factory=list)
    n_sections: int = 4
    # files: a table with one text and one label per row; group_column keeps rows together in the split
    data_files: Optional[Any] = None
    text_column: str = "text"
    label_column: str = "label"
    group_column: Optional[str] = None
    context_size: Optional[int] = None  # tokens per context, BOS included (null: the store's)
    contexts_per_doc: int = 8  # evenly spaced contexts taken from each document (section, row)
    test_fraction: float = 0.3  # of the documents of each class, held out for probe-test
    max_examples: int = 4000  # token tasks: labelled tokens sampled per split (0 = all)
    ks: list[int] = field(default_factory=lambda: [1, 2, 5, 10, 20, 50])  # k of the k-sparse probes
    Cs: list[float] = field(default_factory=lambda: [1e-3, 1e-2, 1e-1, 1.0, 10.0])  # inverse L2 strengths
    cv_folds: int = 3  # folds of the training split (documents kept together) that choose C
    n_bootstrap: int = 500  # resamples of the test split for the 95% intervals
    batch_size: int = 8  # contexts per forward pass
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0  # document split, token sample, CV folds and bootstrap
    out_dir: Optional[str] = None  # null: <run>/probe/<task>


@dataclass
class ProbeJob:
    sae_path: str = MISSING  # a run folder, an SAE folder, or a multirun folder holding many runs
    paths: PathsConfig = field(default_factory=PathsConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


def check_probe_config(cfg) -> None:
    """Raise a UserError naming the first bad key."""
    p = cfg.probe
    check_choice("probe.task", p.task, TASKS)
    for key in ("contexts_per_doc", "cv_folds", "n_bootstrap", "batch_size", "n_sections"):
        if int(p[key]) < 1:
            raise UserError(f"probe.{key} must be >= 1, got {p[key]}.")
    if not 0.0 < float(p.test_fraction) < 1.0:
        raise UserError(f"probe.test_fraction must be between 0 and 1, got {p.test_fraction}.")
    if not p.ks or min(int(k) for k in p.ks) < 1:
        raise UserError(f"probe.ks must be a non-empty list of k >= 1, got {list(p.ks)}.")
    if not p.Cs or min(float(c) for c in p.Cs) <= 0:
        raise UserError(f"probe.Cs must be a non-empty list of positive numbers, got {list(p.Cs)}.")
    if p.context_size is not None and int(p.context_size) < 2:
        raise UserError(f"probe.context_size must be >= 2, got {p.context_size}.")
    check_choice("logger.mode", cfg.logger.mode, LOGGER_MODES)


def probe_task_names() -> list[str]:
    """The presets of the probe_task group (conf/probe_task/*.yaml)."""
    folder = resources.files("sae_pipeline.conf") / "probe_task"
    return sorted(f.name[: -len(".yaml")] for f in folder.iterdir() if f.name.endswith(".yaml"))


def probe_task_config(task: str, overrides: Any = None) -> DictConfig:
    """sae-probe's `probe` config for one preset task plus overrides, as `probe_task=<task>` composes it
    (sae-eval's eval.probe_tasks); checked like sae-probe's own."""
    names = probe_task_names()
    if task not in names:
        raise UserError(f"unknown probe task {task!r}; the tasks are {', '.join(names)}.")
    preset = OmegaConf.create(
        (resources.files("sae_pipeline.conf") / "probe_task" / f"{task}.yaml").read_text()
    )
    cfg = OmegaConf.merge(OmegaConf.structured(ProbeConfig), preset)
    if overrides is not None:
        user = OmegaConf.create(overrides) if not OmegaConf.is_config(overrides) else overrides
        if not OmegaConf.is_dict(user):
            raise UserError(f"eval.probe must be a mapping of sae-probe settings, got {overrides!r}.")
        check_known_keys(dict(user), ProbeConfig, "eval.probe")
        cfg = OmegaConf.merge(cfg, user)
    check_probe_config(OmegaConf.create({"probe": cfg, "logger": {"mode": LOGGER_MODES[0]}}))
    return cfg
