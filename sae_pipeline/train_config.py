"""Typed schemas of `sae-train` (registered with Hydra's ConfigStore).

    train_schema            the top-level TrainJob: paths, store, sae, train, logger
    sae/base_<arch>         one schema per SAE architecture (sae_pipeline.sae.CONFIG_CLASSES);
                            conf/sae/<arch>.yaml starts with `defaults: [base_<arch>, _self_]`

Learning-rate schedule (a pure function of the step, so resuming needs no scheduler state):
linear warm-up from 0 over `lr_warmup_steps`, constant `lr`, then linear decay to 0 over the
final `lr_decay_fraction` of the steps. The sparsity coefficient warms up linearly from 0 to its
full value over `sparsity_warmup_steps` (the `sparsity_scale` handed to the SAE).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from sae_pipeline.config import PathsConfig
from sae_pipeline.errors import UserError


@dataclass
class TrainConfig:
    # --- data ---
    total_tokens: int = 2_000_000  # token budget; may span several passes over the store
    batch_size: int = 4096  # activation rows per optimizer step
    buffer_rows: int = 65_536  # shuffle buffer (rows); bounds the reader's memory
    chunk_rows: int = 4096  # contiguous rows read at a time from one shard
    prefetch: int = 1  # shuffle buffers prepared ahead by the background reader thread
    val_tokens: int = 8192  # rows of whole contexts (last shard) held out for validation; 0 = none
    init_tokens: int = 16_384  # data sample for b_dec init (and the input scale without norm stats)
    # --- optimisation ---
    lr: float = 3e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    lr_warmup_steps: int = 100  # linear warm-up from 0
    lr_decay_fraction: float = 0.2  # linear decay to 0 over this final fraction of the steps
    sparsity_warmup_steps: int = 200  # sparsity coefficient ramps 0 -> full over these steps
    max_grad_norm: float = 1.0  # gradient clipping (global L2 norm); 0 = off
    dead_tokens: int = 500_000  # a latent is dead when it has not fired for this many tokens
    seed: int = 0  # SAE init, data order, RNG
    device: str = "auto"  # auto (CUDA + bf16 autocast + TF32 when available, else CPU float32) | cpu | cuda:N
    # --- logging / evaluation ---
    log_every: int = 10  # steps between log lines (train_log.jsonl + W&B)
    val_every: int = 100  # steps between validation MSE/FVU/L0 on the held-out rows; 0 = off
    eval_every: int = 500  # steps between loss recovered / KL through the model; 0 = off
    eval_tokens: int = 4096  # held-out text tokens for loss recovered
    eval_batch_size: int = 8  # contexts per model forward in loss recovered
    # --- checkpoints / run folder ---
    checkpoint_every_tokens: int = 1_000_000  # 0 = only the final checkpoint
    keep_checkpoints: int = 2  # keep the last N checkpoints
    run_dir: Optional[str] = None  # default: Hydra's output dir (train.yaml's hydra.run.dir)
    resume: bool = False  # continue the run in run_dir from its last checkpoint
    overwrite: bool = False  # replace a run folder that already holds a run
    # Sweep group: one list entry per SAE, each a dict of sae overrides, e.g.
    # train.group=[{l1_coefficient:1e-4},{l1_coefficient:3e-4}] ; an entry may carry `name`.
    group: list[Any] = field(default_factory=list)
    stop_after_steps: Optional[int] = None  # debug: stop as if killed after this step


@dataclass
class LoggerConfig:
    wandb: bool = True  # logger=none turns it off; train_log.jsonl is always written
    project: str = "sae_pipeline"
    entity: Optional[str] = None
    mode: str = "auto"  # auto (online only with WANDB_API_KEY) | offline | online
    group: Optional[str] = None  # W&B group; default: the multirun sweep folder name
    name: Optional[str] = None  # W&B run name; default: the job's overrides
    tags: list[str] = field(default_factory=list)


@dataclass
class TrainJob:
    paths: PathsConfig = field(default_factory=PathsConfig)
    store: str = MISSING  # activation store folder (its manifest gives model, hook and d_in)
    sae: Any = MISSING  # chosen with sae=<arch>; schema sae/base_<arch>
    train: TrainConfig = field(default_factory=TrainConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


LOGGER_MODES = ("auto", "offline", "online")


def register_train_configs() -> None:
    from sae_pipeline.sae import CONFIG_CLASSES

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainJob)
    for arch, cls in CONFIG_CLASSES.items():
        cs.store(group="sae", name=f"base_{arch}", node=cls)


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    scale = 1.0
    if cfg.lr_warmup_steps > 0:
        scale = min(scale, (step + 1) / cfg.lr_warmup_steps)
    decay_steps = int(cfg.lr_decay_fraction * total_steps)
    if decay_steps > 0:
        scale = min(scale, (total_steps - step) / decay_steps)
    return cfg.lr * max(scale, 0.0)


def sparsity_scale_at(step: int, cfg: TrainConfig) -> float:
    if cfg.sparsity_warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / cfg.sparsity_warmup_steps)


def sae_config(node, store, where: str):
    """The SAE dataclass for a config node or dict; `d_in`, when given, must match the store."""
    from sae_pipeline.sae import CONFIG_CLASSES

    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    arch = data.get("arch")
    if arch not in CONFIG_CLASSES:
        raise UserError(
            f"{where}.arch={arch!r} is unknown; choose one of {', '.join(sorted(CONFIG_CLASSES))}"
        )
    d_in = data.pop("d_in", None)
    if d_in is not None and int(d_in) != store.d_in:
        raise UserError(
            f"{where}.d_in={d_in} does not match the store {store.folder}, whose activations have d_in={store.d_in}"
        )
    known = set(CONFIG_CLASSES[arch].__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"{where} has unknown keys {unknown} for arch {arch!r}; valid keys: {sorted(known)}")
    cfg = CONFIG_CLASSES[arch](**data)
    cfg.validate()
    return cfg


def member_specs(cfg: DictConfig, store) -> list[tuple[str, object]]:
    """[(name, sae config)]: one unnamed member for a plain run, one per train.group entry."""
    from sae_pipeline.sae import CONFIG_CLASSES

    if not cfg.train.group:
        return [("", sae_config(cfg.sae, store, "sae"))]
    base = OmegaConf.to_container(cfg.sae, resolve=True)
    specs = []
    for i, entry in enumerate(cfg.train.group):
        if not isinstance(entry, (dict, DictConfig)):
            raise UserError(
                f"train.group[{i}] must be a dict of sae overrides like {{l1_coefficient: 1e-4}}, got {entry!r}"
            )
        over = dict(OmegaConf.to_container(entry, resolve=True) if isinstance(entry, DictConfig) else entry)
        name = str(over.pop("name", None) or ",".join(f"{k}={v}" for k, v in over.items()) or f"member{i}")
        merged = dict(base)
        if "arch" in over and over["arch"] != base["arch"]:  # another arch: keep only the shared keys
            known = set(CONFIG_CLASSES.get(over["arch"], CONFIG_CLASSES[base["arch"]]).__dataclass_fields__)
            merged = {k: v for k, v in base.items() if k in known}
        merged.update(over)
        specs.append((name.replace("/", "_"), sae_config(merged, store, f"train.group[{i}]")))
    names = [n for n, _ in specs]
    if len(set(names)) != len(names):
        raise UserError(f"train.group has members with the same name {names}; give each a distinct `name`")
    return specs
