"""sae-harvest: run a model over text and store activations at hook points as safetensors shards.

    sae-harvest                                   # embedded SmolLM2 on Shakespeare, layer 9 residual
    sae-harvest hook=all hook.layer=3 harvest.n_tokens=1000000
    sae-harvest model.name=EleutherAI/pythia-70m data.name=NeelNanda/pile-10k hook.layer=3
    sae-harvest model=torch_module model.factory=pkg.mod:build model.weights=w.safetensors \
        data=tensors data.path=inputs.safetensors 'hook.names=[module:2]'     # any nn.Module, one row per example

A language model's harvest is data/lm_harvest.py, a torch module's data/tensor_harvest.py. A killed
harvest resumes from its last complete shard when the same command is run again.

Split across processes or SLURM array tasks, each part writes every N-th shard and the last part to
finish merges them into one store with the same rows as one process (data/parts.py):
    torchrun --standalone --nproc_per_node=4 $(which sae-harvest) harvest.n_tokens=10000000
    sae-harvest harvest.parts=4 harvest.part=$SLURM_ARRAY_TASK_ID      # one array task each
    sae-harvest harvest.parts=4 harvest.merge=true                     # merge by hand, if ever needed
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from sae_pipeline.data.lm_harvest import harvest_text
from sae_pipeline.data.tensor_harvest import harvest_tensors
from sae_pipeline.errors import report_config_errors, report_user_errors
from sae_pipeline.model.torch_module import is_torch_module
from sae_pipeline.runtime import resolve_device
from sae_pipeline.schema import register_configs
from sae_pipeline.schema.harvest import check_harvest_config


def run(cfg: DictConfig) -> list[Path]:
    """Harvest every requested hook point into its own store folder; returns the store folders.

    Each folder written (a store, or this part's folder in it) is locked until the harvest ends."""
    with contextlib.ExitStack() as held:
        return _run(cfg, held)


def _run(cfg: DictConfig, held: contextlib.ExitStack) -> list[Path]:
    h = cfg.harvest
    check_harvest_config(h)
    if is_torch_module(cfg.model):  # any nn.Module on a tensor dataset: one row per example
        return harvest_tensors(cfg, resolve_device(h.device), held)
    return harvest_text(cfg, held)


register_configs()


@report_config_errors  # outside hydra.main: an override it cannot compose is one line too
@hydra.main(version_base="1.3", config_path="conf", config_name="harvest")
@report_user_errors  # inside hydra.main, which would otherwise report the error with its own wrapper
def main(cfg: DictConfig) -> None:
    OmegaConf.resolve(cfg)
    run(cfg)


if __name__ == "__main__":
    main()
