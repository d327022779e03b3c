"""Named pause points for the fault-injection suite (tests/faults): nothing happens unless asked.

With SAE_PIPELINE_FAULT=<name>:<n> in the environment, the n-th call of `point(<name>)` (counting
from 1) writes the file named by SAE_PIPELINE_FAULT_MARK and then waits, so that the test's parent
process can SIGKILL it exactly there (inside a shard, manifest or checkpoint write, or the final
save), or, once the file SAE_PIPELINE_FAULT_GO names exists, let it go on (tests/unit/test_locks.py holds
a writer there while a second one is refused). With SAE_PIPELINE_FAULT_TORN=1 the half-written file
`path` is first cut to half its size.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

_calls: Counter = Counter()


def point(name: str, path: Path | None = None) -> None:
    spec = os.environ.get("SAE_PIPELINE_FAULT")
    if not spec:
        return
    want, _, nth = spec.rpartition(":")
    if want != name:
        return
    _calls[name] += 1
    if _calls[name] != int(nth):
        return
    if path is not None and os.environ.get("SAE_PIPELINE_FAULT_TORN") == "1" and Path(path).is_file():
        os.truncate(path, Path(path).stat().st_size // 2)
    Path(os.environ["SAE_PIPELINE_FAULT_MARK"]).write_text(name)
    go = os.environ.get("SAE_PIPELINE_FAULT_GO")
    while not (go and Path(go).exists()):  # the parent kills this process, or lets it go on
        time.sleep(0.05)
