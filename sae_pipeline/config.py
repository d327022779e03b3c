"""Typed schemas of every config group, registered with Hydra's ConfigStore.

A typo in a key or a wrong type fails at start-up naming the key. Types are limited to what
OmegaConf 2.3 accepts (no Literal/Union): choices are `str` fields checked in code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).parent / "conf"


@dataclass
class PathsConfig:
    root: str = "runs"  # everything the pipeline writes lives under here
    stores: str = "${paths.root}/stores"  # activation stores
    train: str = "${paths.root}/train"  # SAE run folders (single runs)
    sweeps: str = "${paths.root}/sweeps"  # multirun folders


@dataclass
class ModelConfig:
    name: str = "embedded:smollm2"  # hub id, local folder, or embedded:smollm2 (offline default)
    id: str = "smollm2-135m"  # short name used in folder names
    gguf_file: Optional[str] = None  # a GGUF file inside `name` (folder or hub repo)
    revision: Optional[str] = None  # hub revision (branch, tag or commit)
    dtype: str = "float32"  # float32 | float16 | bfloat16 | auto (bfloat16 on CUDA, float32 on CPU)
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    name: str = "embedded:shakespeare"  # hub dataset, builder (json/text/parquet/csv), local folder or embedded:shakespeare
    id: str = "shakespeare"  # short name used in folder names
    data_files: Optional[Any] = None  # file or list of files for a builder name
    config_name: Optional[str] = None  # dataset configuration (subset)
    split: str = "train"
    text_column: str = "text"
    title_column: Optional[str] = "title"  # names held-out documents in the manifest when present
    eval_split: Optional[str] = None  # a separate evaluation split; when null, documents are held out
    eval_documents: int = 3  # whole documents held out of harvest for evaluation (when eval_split is null)
    streaming: bool = False  # stream a large hub dataset instead of downloading it whole


@dataclass
class HookConfig:
    layer: int = 9  # block index of the named points
    points: list[str] = field(default_factory=lambda: ["resid_post"])  # resid_pre|resid_post|mlp_out|attn_out
    names: list[str] = field(
        default_factory=list
    )  # extra full names, e.g. module:model.layers.3.mlp.act_fn:output


@dataclass
class HarvestConfig:
    context_size: int = 128  # tokens per context, BOS included
    prepend_bos: bool = True  # start every context with BOS (never stored)
    batch_size: int = 32  # contexts per forward pass
    n_tokens: int = 200_000  # activation rows to collect per hook point
    shard_size: int = 65_536  # rows per shard (rounded up to whole forward batches)
    dtype: str = "float32"  # store dtype: float32 | float16 | bfloat16
    seed: int = 0  # document order, held-out documents and within-shard row shuffle
    early_exit: bool = True  # stop the forward after the deepest hook
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    out_dir: str = "${paths.stores}/${model.id}/${data.id}"  # one store folder per hook under here
    overwrite: bool = False  # replace an existing store with different settings
    writer_queue: int = 2  # shards buffered for the background writer


@dataclass
class HarvestJob:
    paths: PathsConfig = field(default_factory=PathsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    hook: HookConfig = field(default_factory=HookConfig)
    harvest: HarvestConfig = field(default_factory=HarvestConfig)


def register_configs() -> None:
    """Register every stage's schema; group YAML files pick theirs up through `defaults`."""
    from sae_pipeline import eval_config, features_config, train_config  # they import this module

    ConfigStore.instance().store(name="harvest_schema", node=HarvestJob)
    train_config.register_train_configs()
    eval_config.register_eval_configs()
    features_config.register_features_configs()


def to_container(cfg: DictConfig) -> dict:
    """A plain, fully resolved dict (for manifests, config.json and W&B)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)  # type: ignore[return-value]


def compose(config_name: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose a stage's config without the command line (notebooks, tests, benchmarks).

    Example: `harvest.run(compose("harvest", ["hook.layer=3"]))`.
    `hydra:` interpolations are not available this way; every stage has a plain default for them.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    register_configs()
    with initialize_config_module("sae_pipeline.conf", version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides or []))
