"""Schema of `sae-eval` (ConfigStore name `eval_schema`) and its checks.

OmegaConf 2.3 rejects Literal/Union, so choices are `str` fields checked in `check_eval_config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf

from sae_pipeline.errors import UserError, check_choice, check_known_keys

from .advanced import EvalAdvanced
from .common import LOGGER_MODES, DataConfig, LoggerConfig, PathsConfig
from .probe import probe_task_config
from .source import SourceConfig

DATA_SPLITS = ("eval", "train")
ABSORPTION_METHODS = ("saebench", "mean_difference")  # evaluation/absorption.py


@dataclass
class EvalConfig:
    n_tokens: int = 16_384  # valid (non-BOS) tokens of held-out text to score each SAE on
    batch_size: int = 8  # contexts per forward pass
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # Text override: a DataConfig-like dict, e.g. eval.data={name:json,data_files:/x.jsonl}. When null the
    # store's held-out documents (which harvest never saw) are used, packed exactly like harvest packed.
    data: Optional[Any] = None
    data_split: str = "eval"  # with eval.data: "eval" = its held-out documents, "train" = the rest
    context_size: Optional[int] = None  # with eval.data: tokens per context (null: the store's)
    seed: int = 0  # with eval.data: which documents are held out
    skip_existing: bool = False  # keep a run's metrics.json when it was made with the same settings
    sweep: bool = True  # write the sweep table and Pareto plots when several runs are evaluated
    # Feature absorption on the first-letter task (evaluation/absorption.py): single-token words of the
    # model's own vocabulary in a few-shot "<word> has the first letter:" prompt.
    absorption: bool = False
    absorption_method: str = "saebench"  # saebench: its probes and L1-probe latent ranking | mean_difference
    absorption_words: int = 1500  # words sampled (seeded) from the vocabulary; 20% of them are probe-test
    absorption_examples: int = 10  # solved examples before each word in its prompt (SAEBench: 10)
    absorption_min_words: int = 1  # probe-true-positive test words a letter needs to be scored (SAEBench: 1)
    # Sparse probing (sae-probe's tasks: genre, play, speaker, files) run inside the evaluation
    probe_tasks: list[str] = field(default_factory=list)
    probe: Optional[Any] = None  # sae-probe settings for every task, e.g. eval.probe={n_bootstrap:100}
    # reuse_prefix, a speed-up that leaves the numbers unchanged (schema/advanced.py; --help folds it)
    advanced: EvalAdvanced = field(default_factory=EvalAdvanced)


@dataclass
class EvalJob:
    sae_path: str = (
        MISSING  # a run folder, an SAE folder, a multirun folder, a SAELens folder or a .safetensors file
    )
    paths: PathsConfig = field(default_factory=PathsConfig)
    source: SourceConfig = field(default_factory=SourceConfig)  # an SAE not trained here
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # the trainer's group: logger=wandb|none


def check_eval_config(cfg) -> None:
    """Raise a UserError naming the first bad key."""
    e = cfg.eval
    if e.n_tokens < 1:
        raise UserError(f"eval.n_tokens must be >= 1, got {e.n_tokens}.")
    if e.batch_size < 1:
        raise UserError(f"eval.batch_size must be >= 1, got {e.batch_size}.")
    check_choice("eval.data_split", e.data_split, DATA_SPLITS)
    check_choice("eval.absorption_method", e.absorption_method, ABSORPTION_METHODS)
    if e.absorption and e.absorption_words < 26:
        raise UserError(
            f"eval.absorption_words must be >= 26 (one per letter at least), got {e.absorption_words}."
        )
    if e.absorption_examples < 0 or e.absorption_min_words < 1:
        raise UserError(
            "eval.absorption_examples must be >= 0 and eval.absorption_min_words >= 1, got "
            f"{e.absorption_examples} and {e.absorption_min_words}."
        )
    for task in e.probe_tasks:
        probe_task_config(task, e.probe)  # an unknown task or setting is named before any model loads
    if e.context_size is not None and e.context_size < 2:
        raise UserError(f"eval.context_size must be >= 2, got {e.context_size}.")
    check_choice("logger.mode", cfg.logger.mode, LOGGER_MODES)


def eval_data_config(data: Any) -> dict:
    """Validate an eval.data override against DataConfig's keys and fill in its defaults."""
    if data is None:
        raise ValueError("no eval.data given")
    user = OmegaConf.create(data) if not OmegaConf.is_config(data) else data
    if not OmegaConf.is_dict(user):
        raise UserError(f"eval.data must be a mapping of dataset keys (name, data_files, ...), got {data!r}.")
    check_known_keys(dict(user), DataConfig, "eval.data")
    merged = OmegaConf.merge(OmegaConf.structured(DataConfig), user)
    return OmegaConf.to_container(merged, resolve=True)  # type: ignore[return-value]
