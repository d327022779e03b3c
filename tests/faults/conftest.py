"""The fault suite's summary line: trials, damage detected, resumes identical, tracebacks."""

from __future__ import annotations

import json
import os

from tests.faults.tally import COUNTS


def pytest_terminal_summary(terminalreporter):
    if not COUNTS:
        return
    terminalreporter.write_line("fault suite: " + ", ".join(f"{k}={v}" for k, v in sorted(COUNTS.items())))
    out = os.environ.get("SAE_FAULTS_REPORT")
    if out:
        with open(out, "w") as f:
            json.dump(dict(COUNTS), f, indent=1, sort_keys=True)
