"""Counts the fault suite measures; printed at the end of the pytest run (conftest) and written to
$SAE_FAULTS_REPORT as JSON when that variable is set."""

from __future__ import annotations

from collections import Counter

COUNTS: Counter = Counter()


def record(kind: str, n: int = 1) -> None:
    """Kinds: kill_trials, resumed_identical (after a kill), damage_trials, damage_detected,
    fallback_resumed_identical (resumed past a damaged checkpoint), invocations, invocations_one_line,
    tracebacks, disk_full_trials, disk_full_resumed."""
    COUNTS[kind] += n
