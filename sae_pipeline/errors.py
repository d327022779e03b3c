"""Errors a user can cause, reported as one clear sentence instead of a traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

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
