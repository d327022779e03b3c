"""Errors a user can cause, reported as one clear sentence instead of a traceback."""

from __future__ import annotations

import errno
import functools
import os
import re
import sys
from collections.abc import Callable
from dataclasses import fields, is_dataclass
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException
from safetensors import SafetensorError

F = TypeVar("F", bound=Callable)


class UserError(Exception):
    """A problem the user can fix (bad config, missing file, wrong shape).

    The message is a single sentence that names the key, file or shape at fault.
    """


def report_user_errors(fn: F) -> F:
    """Wrap a CLI entry point: a UserError prints `error: <sentence>` and exits with status 2.

    So do the failures a user meets without a bug: a mandatory key left unset, and a file that
    cannot be written or read (a full disk above all; safetensors' own SafetensorError included).
    Every file the pipeline writes is written atomically, so such a failure loses nothing written
    before it and the same command continues from there."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            if args and isinstance(args[0], DictConfig):
                check_schema_keys(args[0])
            return fn(*args, **kwargs)
        except UserError as err:
            message = str(err)
        except MissingMandatoryValue as err:
            message = f"{err.full_key} is not set; pass {err.full_key}=<value>"
        except OmegaConfBaseException as err:  # a key deleted with ~key, an interpolation that fails
            message = _config_sentence(err)
        except (OSError, SafetensorError) as err:
            message = _io_sentence(err)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)

    return wrapper  # type: ignore[return-value]


def report_config_errors(main: F) -> F:
    """Wrap a stage's `@hydra.main` entry point: an override Hydra cannot compose (unknown key, wrong
    type, missing config group option, bad syntax) is one line and exit code 2, like a UserError.

    Hydra is asked to raise instead of printing its own multi-line report (HYDRA_FULL_ERROR) only for
    this call; anything else that escapes is re-raised unchanged (a bug: its traceback is wanted)."""
    from hydra.errors import HydraException

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        before = os.environ.get("HYDRA_FULL_ERROR")
        os.environ["HYDRA_FULL_ERROR"] = "1"
        try:
            return main(*args, **kwargs)
        except (HydraException, OmegaConfBaseException) as err:
            print(f"error: {_config_sentence(err)}", file=sys.stderr)
            sys.exit(2)
        finally:
            if before is None:
                os.environ.pop("HYDRA_FULL_ERROR", None)
            else:
                os.environ["HYDRA_FULL_ERROR"] = before

    return wrapper  # type: ignore[return-value]


def check_schema_keys(cfg: DictConfig, where: str = "") -> None:
    """Refuse a key the schema does not know, which only `+key=value` (or `++`) can add: Hydra accepts it
    silently and the run would start with every setting at its default."""
    kind = OmegaConf.get_type(cfg)
    if is_dataclass(kind):
        known = {f.name for f in fields(kind)}
        for key in cfg:
            if key not in known:
                name = f"{where}.{key}" if where else key
                _refuse_moved_key(name, cfg[key])
                raise UserError(
                    f"{name} is not a key of {where or 'this command'} (added with +); valid keys: {sorted(known)}"
                )
    for key in cfg:
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_none() and not node._is_missing():
            check_schema_keys(node, f"{where}.{key}" if where else str(key))


def _refuse_moved_key(name: str, value: Any) -> None:
    from sae_pipeline.schema.advanced import moved_sentence

    if sentence := moved_sentence(name, value):
        raise UserError(sentence)


def _config_sentence(err: Exception) -> str:
    """Hydra's multi-line report of a bad override as one sentence (the override or key is named).

    Hydra's advice to append with `+` is dropped (an unknown key is refused either way); a key that another
    option of the group has (`sae.k` with `sae=relu`) names the options that have it instead."""
    text = str(err).split("Config search path:")[0]
    lines = [
        ln.strip()
        for ln in text.splitlines()
        if ln.strip() and not ln.strip().startswith(("See https://", "To append to your config use"))
    ]
    moved = _moved_key_sentence(text + "\n" + str(err.__cause__ or ""))
    if moved:
        return moved
    other = re.search(r"To append to your config use \+(\w+)\.(\w+)=(.*)", text)
    if other and (options := _options_with_key(*other.groups()[:2])):
        group, key, value = other.groups()
        return (
            f"{group}.{key} is not a key of this {group} option but of "
            f"{', '.join(f'{group}={o}' for o in options)}: pass {group}={options[0]} {group}.{key}={value.strip()}"
        )
    if len(lines) > 1 and lines[1].startswith(
        "Available options"
    ):  # a config group option that does not exist
        lines = [lines[0], lines[1] + " " + ", ".join(o for o in lines[2:] if not o.startswith("base_"))]
    if getattr(err, "override", None):
        lines.insert(0, f"the override {err.override!r} cannot be parsed:")
    cause = err.__cause__
    if cause is not None and str(cause).strip():
        lines.append(str(cause).strip().splitlines()[0])
    return " ".join(ln if ln.endswith((".", ":")) else ln + "." for ln in lines[:3]) or type(err).__name__


def _moved_key_sentence(text: str) -> str | None:
    """The sentence for a key that moved under its group's `advanced` node, when `text` (Hydra's report and
    its cause) names one."""
    from sae_pipeline.schema.advanced import moved_sentence

    full = re.search(r"full_key: ([\w.]+)", text) or re.search(r"Could not override '([\w.]+)'", text)
    if full is None:
        return None
    value = re.search(r"To append to your config use \+[\w.]+=(.*)", text)
    where = re.search(r"^In '([^']+)':", text)  # a key written in a config file (an experiment preset)
    return moved_sentence(
        full.group(1), value.group(1).strip() if value else None, where.group(1) + ".yaml" if where else None
    )


def _options_with_key(group: str, key: str) -> list[str]:
    """The options of a config group whose schema (registered as base_<option>) has `key`."""
    from hydra.core.config_store import ConfigStore

    repo = ConfigStore.instance().repo.get(group)
    if not isinstance(repo, dict):
        return []
    return [
        name.removeprefix("base_").removesuffix(".yaml")
        for name, entry in repo.items()
        if name.startswith("base_") and hasattr(entry, "node") and key in entry.node
    ]


def _io_sentence(err: Exception) -> str:
    where = getattr(err, "filename", None)
    what = getattr(err, "strerror", None) or str(err).splitlines()[0]
    full = getattr(err, "errno", None) == errno.ENOSPC or "No space left" in str(err)
    head = "no space left on the device" if full else what
    place = f" at {where}" if where else ""
    advice = "free some space" if full else "fix that"
    return (
        f"{head}{place}; nothing written before it was lost (every write is atomic): "
        f"{advice} and rerun the same command to continue"
    )


def check_choice(key: str, value: Any, choices) -> None:
    """A `str` field that must be one of `choices` (OmegaConf has no Literal)."""
    if value not in choices:
        raise UserError(f"{key}={value!r} is not one of {', '.join(map(str, choices))}")


def check_known_keys(data: dict, schema: type, where: str) -> None:
    """Free-form mappings (eval.data, train.group entries, SAE config files) checked against a dataclass."""
    known = {f.name for f in fields(schema)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"{where} has unknown keys {unknown}; valid keys: {sorted(known)}")
