"""Progress that shows in logs as well as on terminals.

On a terminal this is a tqdm bar. Where stderr is not a terminal (SLURM, nohup, CI, a pipe) a bar
would print nothing useful, so a plain line goes out every `every_s` seconds instead:
    harvest: 120,000/200,000 tok (60.0%) | 1,210 tok/s | elapsed 1m39s | ETA 1m06s
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable


def duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class LogProgress:
    """tqdm's update/close, printing a line at a steady interval (and once when complete)."""

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str = "tok",
        initial: int = 0,
        every_s: float = 30.0,
        stream=None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total, self.desc, self.unit, self.every_s = int(total), desc, unit, every_s
        self.stream, self.clock = stream or sys.stderr, clock
        self.initial = self.done = int(initial)
        self.start = self.last = clock()
        self.printed = -1  # `done` at the last printed line

    def line(self) -> str:
        elapsed = self.clock() - self.start
        rate = (self.done - self.initial) / elapsed if elapsed > 0 else 0.0
        share = f" ({100 * self.done / self.total:.1f}%)" if self.total else ""
        eta = duration((self.total - self.done) / rate) if rate > 0 and self.total else "?"
        return (
            f"{self.desc}: {self.done:,}/{self.total:,} {self.unit}{share} | {rate:,.0f} {self.unit}/s | "
            f"elapsed {duration(elapsed)} | ETA {eta}"
        )

    def update(self, n: int = 1) -> None:
        self.done += int(n)
        now = self.clock()
        if now - self.last >= self.every_s:
            self.last = now
            self._print()

    def close(self) -> None:
        """The final line when the work completed (an error's own message stays the last word)."""
        if self.done >= self.total and self.printed != self.done:
            self._print()

    def _print(self) -> None:
        self.printed = self.done
        print(self.line(), file=self.stream, flush=True)


def progress(total: int, desc: str, unit: str = "tok", initial: int = 0):
    """A tqdm bar on a terminal, else LogProgress (interval: $SAE_PIPELINE_PROGRESS_S, default 30 s)."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, unit=unit, unit_scale=True, desc=desc)
    every_s = float(os.environ.get("SAE_PIPELINE_PROGRESS_S", "30"))
    return LogProgress(total, desc, unit, initial=initial, every_s=every_s)
