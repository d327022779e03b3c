"""Errors a user can cause, reported as one clear sentence instead of a traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import fields
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable)


class UserError(Exception):
    """A problem the user can fix (bad config, missing file, wrong shape).

    The message is a single sentence that names the key, file or shape at fault.
    """


def report_user_errors(fn: F) -> F:
    """Wrap a CLI entry point: a UserError prints `error: <sentence>` and exits with status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]


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
