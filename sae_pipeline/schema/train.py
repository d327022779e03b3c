"""Schema of `sae-train` (ConfigStore name `train_schema`; one `sae/base_<arch>` schema per architecture,
which conf/sae/<arch>.yaml names in its defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from .advanced import TrainAdvanced
from .common import LoggerConfig, PathsConfig


@dataclass
class TrainConfig:
    # --- data ---
    total_tokens: int = 2_000_000  # token budget; may span several passes over the store
    batch_size: int = 4096  # activation rows per optimizer step
    val_tokens: int = 8192  # rows of whole contexts (last shard) held out for validation; 0 = none
    # train on a store while sae-harvest writes it: one pass, windows of `advanced.stream_window_shards`
    # consecutive shards shuffled together (order fixed by shard sequence + seed, never timing; data/stream.py)
    stream: bool = False
    # a transcoder: the store of the hook whose activations the SAE predicts from `store`'s (same harvest)
    target_store: Optional[str] = None
    # --- optimisation ---
    # peak learning rate; None: s * 2e-4 / sqrt(d_sae / 2**14) for each SAE (Gao et al. 2024's fit for TopK),
    # s the architecture's default_lr_scale (4 for the TopK family, measured at one pass; 1 for the others)
    lr: Optional[float] = None
    lr_warmup_steps: int = 100  # linear warm-up from 0, over at most a tenth of the run's steps
    lr_decay_fraction: float = 0.2  # linear decay to 0 over this final fraction of the steps
    sparsity_warmup_steps: int = 200  # sparsity coefficient ramps 0 -> full over these steps
    max_grad_norm: float = 1.0  # gradient clipping (global L2 norm); 0 = off
    # a latent is dead (logged; AuxK and resampling act on it) when it has not fired for this many tokens;
    # None: each SAE's default_dead_tokens(), 500,000 or, for the K-sparse family, 32 x d_sae / k (sae/topk.py)
    dead_tokens: Optional[int] = None
    resample_every: int = 0  # sae=relu: resample dead latents every N steps in the first half (0 = off)
    seed: int = 0  # SAE init, data order, RNG
    device: str = "auto"  # auto (CUDA + bf16 autocast + TF32 when available, else CPU float32) | cpu | cuda:N
    # bf16 autocast of the training forward (float32 master weights and Adam state in every mode):
    # auto = on for CUDA, off on the CPU | bf16 = on for any device (CPU: tests/debugging, slow) | off
    autocast: str = "auto"
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
    allow_changes: bool = False  # let a resume change training settings (recorded in config.json `changes`)
    # Sweep group: one list entry per SAE, each a dict of sae overrides, e.g.
    # train.group=[{l1_coefficient:1e-4},{l1_coefficient:3e-4}] ; an entry may carry `name`.
    group: list[Any] = field(default_factory=list)
    # --- SAEs wider than one device ---
    # split every SAE's latents over this many ranks (training/latent_shards.py); the processes form
    # (processes / latent_shards) data-parallel replicas x latent_shards; topk, batchtopk and relu
    latent_shards: int = 1
    # reader internals, Adam's constants, the init sample, debug switches (schema/advanced.py; --help folds it)
    advanced: TrainAdvanced = field(default_factory=TrainAdvanced)


@dataclass
class TrainJob:
    paths: PathsConfig = field(default_factory=PathsConfig)
    store: str = MISSING  # activation store folder (its manifest gives model, hook and d_in)
    sae: Any = MISSING  # chosen with sae=<arch>; schema sae/base_<arch>
    train: TrainConfig = field(default_factory=TrainConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
