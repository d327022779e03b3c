"""Schemas of the config groups several stages share: paths, model, data, hook, logger.

A typo in a key or a wrong type fails at start-up naming the key. Types are limited to what
OmegaConf 2.3 accepts (no Literal/Union): choices are `str` fields checked in code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

LOGGER_MODES = ("auto", "offline", "online")


@dataclass
class PathsConfig:
    root: str = "${oc.env:SAE_PIPELINE_ROOT,runs}"  # everything the pipeline writes lives under here
    stores: str = "${paths.root}/stores"  # activation stores
    train: str = "${paths.root}/train"  # SAE run folders (single runs)
    sweeps: str = "${paths.root}/sweeps"  # multirun folders


@dataclass
class ModelConfig:
    name: str = "embedded:smollm2"  # hub id, local folder, or embedded:smollm2 (offline default)
    id: str = "${sae_id:${.name},${.gguf_file}}"  # folder name; default derived from name (schema/ids.py)
    gguf_file: Optional[str] = None  # a GGUF file inside `name` (folder or hub repo)
    revision: Optional[str] = None  # hub revision (branch, tag or commit)
    dtype: str = "float32"  # float32 | float16 | bfloat16 | auto (bfloat16 on CUDA, float32 on CPU)
    trust_remote_code: bool = False
    kind: str = "auto"  # auto (from the config's architectures) | causal_lm | masked_lm (ESM-2, BERT-style) | torch_module
    # kind=torch_module (model=torch_module): any nn.Module, see model/torch_module.py
    factory: Optional[str] = None  # pkg.module:function or path/to/file.py:function, called with no argument
    factory_path: Optional[str] = None  # a folder put first on sys.path for that import (cwd always is)
    weights: Optional[str] = None  # a safetensors state dict loaded strictly into the factory's module


@dataclass
class DataConfig:
    name: str = "embedded:shakespeare"  # hub dataset, local folder, embedded:shakespeare, or files (data_files by suffix)
    id: str = "${sae_id:${.name},${.data_files},${.config_name}}"  # folder name; default derived from name
    data_files: Optional[Any] = None  # file or list of files for a builder name
    config_name: Optional[str] = None  # dataset configuration (subset)
    split: str = "train"
    text_column: str = "text"
    title_column: Optional[str] = "title"  # names held-out documents in the manifest when present
    eval_split: Optional[str] = None  # a separate evaluation split; when null, documents are held out
    eval_documents: int = 3  # whole documents held out of harvest for evaluation (when eval_split is null)
    streaming: bool = False  # stream a large hub dataset instead of downloading it whole
    txt_unit: str = "file"  # .txt data_files: a whole file is one document (file) or each line is (line)
    # data=tensors (a torch_module model): a safetensors file with `inputs` [N, ...] and optional `labels` [N]
    path: Optional[str] = None
    eval_path: Optional[str] = None  # held-out examples in a second file of the same names; when null ...
    eval_fraction: float = 0.2  # ... this fraction of `path` (seeded by harvest.seed) is held out instead


@dataclass
class HookConfig:
    layer: int = 9  # block index of the named points
    points: list[str] = field(default_factory=lambda: ["resid_post"])  # resid_pre|resid_post|mlp_out|attn_out
    # extra full names, e.g. module:model.layers.3.mlp.act_fn:output
    names: list[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    wandb: bool = True  # logger=none turns it off; train_log.jsonl is always written
    project: str = "sae_pipeline"
    entity: Optional[str] = None
    mode: str = "auto"  # auto (online only with WANDB_API_KEY) | offline | online
    group: Optional[str] = None  # W&B group; default: the multirun sweep folder name
    name: Optional[str] = None  # W&B run name; default: <arch>-<hook>-<overrides> (sae-train)
    tags: list[str] = field(default_factory=list)
    log_artifact: bool = True  # the final SAE as a W&B `model` artifact (sae-train)


def to_container(cfg: DictConfig) -> dict:
    """A plain, fully resolved dict (for manifests, config.json and W&B)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)  # type: ignore[return-value]
