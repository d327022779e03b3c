"""Helpers of the fault suite: damage a file, run a stage in a forked child and SIGKILL it from here.

A forked child (the test process already imported torch and the package) starts in milliseconds,
where a fresh `python -m sae_pipeline.<stage>` takes seconds: that is what lets dozens of kills run
in CI's budget. `kill_at` pauses the child at a named point (sae_pipeline.faults) and kills it there;
`kill_after` kills it after a random delay.

The child computes at the parent's thread count, which must be 1: results are bit-identical only at one
thread count, and a forked child cannot use more (GNU OpenMP, which torch uses, hangs in the fork of a
process that ran threads: a child at 2 threads never finished a 512 x 512 matmul here). So the fault tests
run at one thread, parent included (tests/faults/conftest.py).
"""

from __future__ import annotations

import contextlib
import io
import logging
import multiprocessing
import os
import random
import signal
import sys
import time
from pathlib import Path

from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig

from sae_pipeline.schema.help import stage_module


def flip_bytes(path: Path, rng: random.Random, n: int = 8, lo: int = 0, hi: int | None = None) -> int:
    """XOR n consecutive bytes at a random offset in [lo, hi) with non-zero values; returns the offset."""
    data = bytearray(path.read_bytes())
    hi = len(data) - n if hi is None else min(hi, len(data) - n)
    at = rng.randrange(lo, max(hi, lo + 1))
    for i in range(at, min(at + n, len(data))):
        data[i] ^= rng.randrange(1, 256)
    path.write_bytes(bytes(data))
    return at


def truncate(path: Path, rng: random.Random) -> int:
    size = path.stat().st_size
    keep = rng.randrange(0, size)
    os.truncate(path, keep)
    return keep


def _child(fn, args, env, threads: int) -> None:
    try:
        os.environ.update(env)
        import torch

        torch.set_num_threads(threads)  # the parent's (1): results are bit-identical only at one thread count
        with (
            open(os.devnull, "w") as null,
            contextlib.redirect_stdout(null),
            contextlib.redirect_stderr(null),
        ):
            fn(*args)
    except BaseException:  # noqa: BLE001 - the child's outcome is its exit code
        os._exit(1)
    os._exit(0)


def _start(fn, args, env) -> multiprocessing.Process:
    import torch

    if torch.get_num_threads() != 1:
        raise RuntimeError(
            "a forked child computes on one thread only (GNU OpenMP hangs in a fork of a process that used "
            "threads), and it must compute at this process's thread count: set torch.set_num_threads(1) here "
            "(tests/faults/conftest.py does for every fault test)"
        )
    ctx = multiprocessing.get_context("fork")
    proc = ctx.Process(target=_child, args=(fn, args, env, torch.get_num_threads()), daemon=True)
    proc.start()
    return proc


def kill_at(point: str, fn, *args, tmp: Path, torn: bool = False, timeout: float = 1800) -> bool:
    """Run fn(*args) in a child paused at `point` ("name:n"); SIGKILL it there. False if it never got there.

    The wait ends when the child reaches the point or exits; `timeout` only stops a hung child (it is long
    enough for the slowest loaded machine: a deadline must never turn slowness into a failure)."""
    mark = tmp / f"fault-mark-{time.monotonic_ns()}"
    env = {"SAE_PIPELINE_FAULT": point, "SAE_PIPELINE_FAULT_MARK": str(mark)}
    env["SAE_PIPELINE_FAULT_TORN"] = "1" if torn else "0"
    proc = _start(fn, args, env)
    deadline = time.monotonic() + timeout
    while not mark.exists() and proc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    reached = mark.exists()
    if proc.is_alive():
        os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    return reached


def kill_after(delay_s: float, fn, *args) -> bool:
    """Run fn(*args) in a child and SIGKILL it after delay_s; True if it was still running then."""
    proc = _start(fn, args, {})
    proc.join(delay_s)
    alive = proc.is_alive()
    if alive:
        os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    return alive


def invoke(stage: str, args: list[str]) -> tuple[int, str]:
    """The real command line `python -m sae_pipeline.<stage> <args>`, run in this process: (exit code, stderr)."""
    import importlib

    module = importlib.import_module(stage_module(stage))
    err, out = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = [f"sae_pipeline/{stage}.py", *args]
    code = 0
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            module.main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:  # noqa: BLE001 - an escaped exception is what the table counts as a traceback
        import traceback

        err.write(traceback.format_exc())
        code = 1
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None  # else a later in-process run() sees this job's Hydra config
        for handler in logging.root.handlers[:]:  # Hydra's <run dir>/<stage>.log stays open otherwise
            if isinstance(handler, logging.FileHandler):
                handler.close()
                logging.root.removeHandler(handler)
    return code, err.getvalue()
