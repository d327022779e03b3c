"""Schema of `sae-harvest` (ConfigStore name `harvest_schema`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from sae_pipeline.data.store import store_dtype
from sae_pipeline.errors import UserError

from .advanced import HarvestAdvanced
from .common import DataConfig, HookConfig, ModelConfig, PathsConfig


@dataclass
class HarvestConfig:
    context_size: int = 128  # tokens per context, BOS included
    prepend_bos: bool = True  # start every context with BOS (never stored)
    batch_size: int = 32  # contexts per forward pass
    n_tokens: int = 200_000  # activation rows to collect per hook point
    shard_size: int = 65_536  # rows per shard (rounded up to whole forward batches)
    dtype: str = "float32"  # store dtype: float32 | float16 | bfloat16
    seed: int = 0  # document order, held-out documents and within-shard row shuffle
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    out_dir: str = "${paths.stores}/${model.id}/${data.id}"  # one store folder per hook under here
    overwrite: bool = False  # replace an existing store with different settings
    # A harvest split into parts (processes, SLURM array tasks): part i of N writes shards i, i+N, ...
    # under <store>/part-00i-of-00N/; the last part to finish merges them into one manifest.
    # Under torchrun, RANK and WORLD_SIZE choose the part (leave both keys at their defaults).
    parts: int = 1  # how many parts the harvest is split into
    part: int = 0  # which part this process writes (0 .. parts-1)
    merge: bool = False  # only merge the finished parts' manifests into the store manifest
    # bounded disk: at most this many shards on disk; a shard is deleted once every registered consumer
    # (a sae-train train.stream=true run) has read it, and the harvest pauses while N are unread (0 = keep all)
    keep_shards: int = 0
    consumers: int = 1  # with keep_shards: no shard is deleted before this many consumers have registered
    # early exit, the writer's queue, debug switches (schema/advanced.py; --help folds it)
    advanced: HarvestAdvanced = field(default_factory=HarvestAdvanced)


@dataclass
class HarvestJob:
    paths: PathsConfig = field(default_factory=PathsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    hook: HookConfig = field(default_factory=HookConfig)
    harvest: HarvestConfig = field(default_factory=HarvestConfig)


def check_harvest_config(h) -> None:
    """Raise a UserError naming the first bad key of `harvest`."""
    store_dtype(h.dtype)
    for key in ("context_size", "batch_size", "n_tokens", "shard_size"):
        if int(h[key]) < 1:
            raise UserError(f"harvest.{key}={h[key]} must be a positive integer")
    if int(h.parts) < 1 or not 0 <= int(h.part) < int(h.parts):
        raise UserError(f"harvest.part={h.part} must be between 0 and harvest.parts-1={int(h.parts) - 1}")
    if h.merge and int(h.parts) < 2:
        raise UserError(
            "harvest.merge=true merges the parts of a split harvest; set harvest.parts to their number"
        )
    if int(h.keep_shards) < 0 or int(h.consumers) < 1:
        raise UserError(
            f"harvest.keep_shards={h.keep_shards} must be 0 or more and harvest.consumers={h.consumers} positive"
        )
    if int(h.keep_shards) and int(h.parts) > 1:
        raise UserError(
            "harvest.keep_shards (bounded disk) works with one harvest process; drop harvest.parts"
        )
    if h.context_size < 2 and h.prepend_bos:
        raise UserError(f"harvest.context_size={h.context_size} leaves no room for text after BOS")
