"""The fault suite's summary line: trials, damage detected, resumes identical, tracebacks."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.faults.tally import COUNTS


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The harness's forked children compute on one thread (harness.py says why), so this process too: the
    reference, the killed child and the resume at one thread count. Restored after each module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_terminal_summary(terminalreporter):
    if not COUNTS:
        return
    terminalreporter.write_line("fault suite: " + ", ".join(f"{k}={v}" for k, v in sorted(COUNTS.items())))
    out = os.environ.get("SAE_FAULTS_REPORT")
    if out:
        with open(out, "w") as f:
            json.dump(dict(COUNTS), f, indent=1, sort_keys=True)
