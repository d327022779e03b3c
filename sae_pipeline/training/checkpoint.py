"""Training checkpoints without pickles: safetensors for tensors, JSON for everything else.

    <run>/checkpoints/step-000000123/
        sae.safetensors     SAE parameters and buffers (training units: input scale not folded)
        state.safetensors   optimizer moments ("opt.<param>.<key>") and extra tensors ("x.<name>":
                            RNG states as uint8, dead-latent counters, ...)
        state.json          step, tokens, reader position, optimizer hyper-parameters, anything JSON-able,
                            the sha256 of both safetensors files and of itself (`state_sha256`)

A checkpoint is written into `step-....tmp/` and renamed when complete, so a run killed while
saving keeps its previous checkpoint; `latest()` ignores unfinished folders. integrity/checkpoint.py
checks a checkpoint's checksums and values; a resume starts from the newest intact checkpoint
(`newest_intact`), moving a damaged one aside to `step-....damaged/`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from sae_pipeline import faults, layout
from sae_pipeline.errors import UserError
from sae_pipeline.files import publish_dir, save_tensors
from sae_pipeline.integrity.checkpoint import STATE_SEAL, checkpoint_problem
from sae_pipeline.integrity.seal import FILES, file_checksums, seal

FAULT = "checkpoint"  # tests/faults pause a save here (see sae_pipeline.faults)


def rng_state() -> tuple[dict, dict]:
    """(tensors, json) holding every RNG the trainer can touch."""
    tensors = {"rng_torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng_cuda_{i}"] = s
    version, state, gauss = random.getstate()
    return tensors, {"python_random": [version, list(state), gauss]}


def set_rng_state(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["rng_torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    if "python_random" in meta:
        version, state, gauss = meta["python_random"]
        random.setstate((version, tuple(state), gauss))


def _optimizer_split(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"opt.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_join(tensors: dict, meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save(
    run_dir: Path,
    step: int,
    sae: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: dict,
    extra_tensors: dict[str, torch.Tensor],
) -> Path:
    """Write the checkpoint of `step` atomically; returns its folder."""
    final = layout.checkpoint_dir(run_dir, step)
    tmp = layout.tmp_name(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_tensors(tmp / layout.SAE_WEIGHTS, sae.state_dict())
        opt_tensors, opt_meta = _optimizer_split(optimizer)
        save_tensors(
            tmp / layout.TRAIN_STATE, {**opt_tensors, **{f"x.{k}": v for k, v in extra_tensors.items()}}
        )
        checksums = file_checksums(tmp, (layout.SAE_WEIGHTS, layout.TRAIN_STATE))
        state = {**meta, "step": step, "optimizer": opt_meta, FILES: checksums}
        seal(state, STATE_SEAL)
        (tmp / layout.TRAIN_META).write_text(json.dumps(state, indent=1))
        faults.point(FAULT)
        publish_dir(tmp, final, replace=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # frees the space a full disk needs back
        raise
    return final


def newest_intact(found: list[dict[str, Path]], names: list[str]) -> str:
    """The newest checkpoint name (of `names`, oldest first) intact in every member's folders `found`.

    A damaged checkpoint is named, moved aside to `<name>.damaged` and the next older one tried."""
    for name in reversed(names):
        damaged = [(f[name], why) for f in found if (why := checkpoint_problem(f[name]))]
        if not damaged:
            return name
        for ckpt, why in damaged:
            aside = ckpt.with_name(ckpt.name + ".damaged")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(ckpt, aside)
            print(
                f"warning: the checkpoint {ckpt} is damaged ({why}); it was moved to {aside.name} and "
                "the run resumes from the newest intact checkpoint",
                file=sys.stderr,
                flush=True,
            )
    raise UserError(
        f"no intact checkpoint is left in {found[0][names[0]].parent} (each damaged one was moved to "
        "step-*.damaged); start the run again with train.overwrite=true"
    )


def load(ckpt: Path, sae: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Restore SAE and optimizer in place; returns (meta, extra tensors)."""
    why = checkpoint_problem(ckpt)
    if why:
        raise UserError(f"the checkpoint {ckpt} is damaged: {why}")
    try:
        weights = load_file(str(ckpt / layout.SAE_WEIGHTS))
        tensors = load_file(str(ckpt / layout.TRAIN_STATE))
        meta = json.loads((ckpt / layout.TRAIN_META).read_text())
    except (OSError, SafetensorError, ValueError) as err:
        raise UserError(f"the checkpoint {ckpt} is unreadable ({err})") from None
    expected = sae.state_dict()
    for name, ref in expected.items():
        got = weights.get(name)
        if got is None or got.shape != ref.shape:
            shape = None if got is None else tuple(got.shape)
            raise UserError(
                f"the checkpoint {ckpt} holds {name} of shape {shape} but this run's SAE needs {tuple(ref.shape)} "
                "(a different d_in or dictionary size)"
            )
    device = next(sae.parameters()).device
    sae.load_state_dict({k: v.to(device) for k, v in weights.items()})
    opt_tensors = {k: v.to(device) for k, v in tensors.items() if k.startswith("opt.")}
    opt_state = _optimizer_join(opt_tensors, meta["optimizer"])
    for state in opt_state["state"].values():  # Adam keeps `step` on the CPU unless capturable
        if "step" in state and torch.is_tensor(state["step"]):
            state["step"] = state["step"].cpu()
    optimizer.load_state_dict(opt_state)
    extra = {k[2:]: v for k, v in tensors.items() if k.startswith("x.")}
    return meta, extra


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = Path(run_dir) / layout.CHECKPOINTS
    if not folder.is_dir():
        return []
    done = [
        p for p in folder.iterdir() if p.is_dir() and "." not in p.name and (p / layout.TRAIN_META).exists()
    ]
    return sorted(done, key=lambda p: p.name)


def latest(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def prune(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (and leftovers of interrupted saves)."""
    found = list_checkpoints(run_dir)
    for old in found[: max(len(found) - max(keep, 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in (Path(run_dir) / layout.CHECKPOINTS).glob("*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
