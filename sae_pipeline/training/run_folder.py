"""A training run's folder: refusing to clobber a run, what resuming one requires, and what it records."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

from sae_pipeline import faults, layout, locks
from sae_pipeline.data.remote import is_url
from sae_pipeline.data.store import ActivationStore
from sae_pipeline.errors import UserError
from sae_pipeline.files import publish_dir
from sae_pipeline.integrity.manifest import store_matches_record, store_record
from sae_pipeline.sae import save_sae


def provenance(store: ActivationStore) -> dict:
    """What trained an SAE: the store, its manifest hash, hook and model (recorded in every config.json)."""
    return {
        "store": store.location if is_url(store.location) else str(store.folder.resolve()),
        **store_record("store", store.manifest, store.following),
        "hook": store.hook_name,
        "model": store.manifest.get("model"),
    }


def lock_folders(stack: contextlib.ExitStack, folders: list[Path]) -> contextlib.ExitStack:
    """Lock each folder into `stack` (a second sae-train on one of them is refused, naming this one)."""
    for folder in folders:
        stack.enter_context(locks.FolderLock(folder, "the run folder", "choose another train.run_dir"))
    return stack


def prepare_run_dir(run_dir: Path, tcfg) -> bool:
    """True when this run continues one found in run_dir; refuses to clobber a run by accident."""
    has_run = (run_dir / layout.CONFIG).exists()
    if has_run and tcfg.resume:
        return True
    if has_run and not tcfg.overwrite:
        raise UserError(
            f"the run folder {run_dir} already holds a run; pass train.resume=true to continue it, "
            "train.overwrite=true to replace it, or choose another train.run_dir"
        )
    if has_run:  # overwrite: keep Hydra's own files, remove the previous run
        for entry in run_dir.iterdir():
            if entry.name != ".hydra" and not entry.name.endswith(".log") and not locks.is_lock_file(entry):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    return False


def check_resumable(member_dir: Path, record: dict, store: ActivationStore) -> dict:
    """The run's recorded config.json, once checked against what this resume would train."""
    old = json.loads((member_dir / layout.CONFIG).read_text())
    if old.get("d_in") != store.d_in:
        raise UserError(
            f"the run {member_dir} was trained on d_in={old.get('d_in')} but the store {store.folder} has "
            f"d_in={store.d_in}; resume it with its own store or start a new run"
        )
    if old.get("sae") != record["sae"]:
        raise UserError(
            f"the run {member_dir} was started with other sae settings {old.get('sae')}; resume with the same ones"
        )
    if not store_matches_record(old, "store", store.manifest, store.following):
        raise UserError(
            f"the store {store.folder} changed since the run {member_dir} started (its manifest hash differs)"
        )
    return old


def save_final(member, store: ActivationStore) -> Path:
    """<run>/sae/: the SAE in raw activation units, written beside and renamed when complete."""
    out = member.run_dir / layout.FINAL_SAE
    tmp = layout.tmp_name(out)
    shutil.rmtree(tmp, ignore_errors=True)
    save_sae(
        member.folded().cpu(),
        tmp,
        extra={
            **provenance(store),
            "input_scale_folded": member.input_scale,
            **(member.target.record() if member.target is not None else {}),
        },
    )
    faults.point("final")  # tests/faults kill the final save here (a no-op otherwise)
    publish_dir(tmp, out, replace=True)
    return out
