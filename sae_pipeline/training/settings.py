"""What `train` settings may be: checked before anything runs, and held fixed across a resume.

    check_train_config(cfg.train)             # one sentence naming the first bad key
    changes = resume_changes(old_record, config, run, allowed)  # {"train.lr": [0.01, 0.001]}, or refused

A resume that changes a setting which shapes the trained SAE is refused with the list of
differences, unless train.allow_changes=true: then the change is appended, with its step, to the
`changes` list of the run's config.json (so the record of how the first steps were trained stays).
"""

from __future__ import annotations

import math

from omegaconf import OmegaConf

from sae_pipeline.errors import UserError
from sae_pipeline.schema.advanced import nest_advanced

# keys that do not change the SAE a run trains (logging, evaluation, checkpoints, the folder, debug)
FREE_TO_CHANGE = {
    "advanced.prefetch", "log_every", "val_every", "eval_every", "eval_tokens", "eval_batch_size",
    "checkpoint_every_tokens", "keep_checkpoints", "run_dir", "resume", "overwrite", "allow_changes",
    "advanced.stop_after_steps", "device", "group", "advanced.stream_wait_s",
    "latent_shards",  # the same SAE up to float order; a resume must keep it (training/latent_shards.py)
}  # fmt: skip

_POSITIVE = ("batch_size", "dead_tokens", "log_every", "eval_tokens", "eval_batch_size", "keep_checkpoints")
_ADVANCED_POSITIVE = (
    "buffer_rows",
    "chunk_rows",
    "prefetch",
    "read_threads",
    "init_tokens",
    "stream_window_shards",
)
_POSITIVE += tuple(f"advanced.{key}" for key in _ADVANCED_POSITIVE)
_NON_NEGATIVE = ("val_tokens", "lr_warmup_steps", "sparsity_warmup_steps", "val_every", "eval_every")
_NON_NEGATIVE += ("checkpoint_every_tokens", "resample_every")


def check_train_config(t) -> None:
    """Raise a UserError naming the first bad key of `train`."""
    for key in _POSITIVE:
        if key == "dead_tokens" and t[key] is None:  # the SAE's own default (sae.default_dead_tokens)
            continue
        if OmegaConf.select(t, key) < 1:
            raise UserError(f"train.{key}={OmegaConf.select(t, key)} must be a positive integer")
    for key in _NON_NEGATIVE:
        if t[key] < 0:
            raise UserError(f"train.{key}={t[key]} must be 0 or more")
    if t.total_tokens < t.batch_size:
        raise UserError(
            f"train.total_tokens={t.total_tokens} is less than one batch (train.batch_size={t.batch_size}); "
            "nothing would be trained"
        )
    for key in ("lr", "advanced.adam_eps"):
        value = OmegaConf.select(t, key)
        if key == "lr" and value is None:  # the default that follows the dictionary width
            continue
        if not (math.isfinite(value) and value > 0):
            raise UserError(f"train.{key}={value} must be a positive finite number")
    for key in ("advanced.adam_beta1", "advanced.adam_beta2"):
        if not 0 <= OmegaConf.select(t, key) < 1:
            raise UserError(f"train.{key}={OmegaConf.select(t, key)} must be in [0, 1)")
    if not 0 <= t.lr_decay_fraction <= 1:
        raise UserError(f"train.lr_decay_fraction={t.lr_decay_fraction} must be in [0, 1]")
    if not (math.isfinite(t.max_grad_norm) and t.max_grad_norm >= 0):
        raise UserError(f"train.max_grad_norm={t.max_grad_norm} must be a finite number >= 0 (0 = off)")
    a = t.advanced
    if not a.stream_wait_s > 0:
        raise UserError(
            f"train.advanced.stream_wait_s={a.stream_wait_s} must be a positive number of seconds"
        )
    if a.stop_after_steps is not None and a.stop_after_steps < 1:
        raise UserError(
            f"train.advanced.stop_after_steps={a.stop_after_steps} must be a positive integer or null"
        )


def _flat(train: dict) -> dict:
    """`train` settings as {key: value} with the `advanced` node's keys as `advanced.<key>`; a record written
    before keys moved under `advanced` (an older run folder) reads as if written today."""
    train = nest_advanced("train", train)
    flat = {k: v for k, v in train.items() if k != "advanced"}
    flat.update({f"advanced.{k}": v for k, v in (train.get("advanced") or {}).items()})
    return flat


def _differences(old: dict, new: dict) -> dict[str, list]:
    """Training settings that differ between the recorded config and this one: {key: [old, new]}."""
    old_t, new_t = _flat(old.get("train") or {}), _flat(new.get("train") or {})
    return {
        f"train.{k}": [old_t.get(k), new_t.get(k)]
        for k in sorted(set(old_t) | set(new_t))
        if k not in FREE_TO_CHANGE and old_t.get(k) != new_t.get(k)
    }


def resume_changes(old_record: dict, new_config: dict, run, allowed: bool) -> dict[str, list]:
    """The training settings a resume changes; refused (one sentence listing them) unless allowed."""
    if not old_record.get("config"):  # a fresh run (or a record from before configs were kept)
        return {}
    changes = _differences(old_record["config"], new_config)
    if changes and not allowed:
        listed = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())
        raise UserError(
            f"resuming the run {run} would change its training settings ({listed}); resume with the "
            "values it was started with, or pass train.allow_changes=true to record the change in its config.json"
        )
    return changes


def change_history(old_record: dict, changes: dict, step: int) -> list[dict]:
    """The run's `changes` list with this resume's changes (and the step they start at) appended."""
    return list(old_record.get("changes") or []) + ([{"step": step, **changes}] if changes else [])
