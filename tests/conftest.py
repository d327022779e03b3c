"""Test-wide settings: nothing reaches a model or dataset hub, W&B stays offline and quiet, and every
process a test starts computes with this process's thread count.

Results are bit-identical only at one thread count (README, Reliability): a test that compares the weights
of a subprocess or forked child with a run in this process must give both the same count. The count is
torch's default for the machine and OMP_NUM_THREADS (MKL caps it at the physical cores: OMP_NUM_THREADS=3 gives
2 on a 2-core machine). It is set once here, so MKL and OpenMP agree for the whole session, and exported as
OMP_NUM_THREADS and MKL_NUM_THREADS, so a `python -m sae_pipeline.<stage>` started by a test gets the same
count (tests/cli/test_train.py checks the count the subprocess recorded). The fault suite's forked children can
only use one thread, so tests/faults run at one thread, parent included (tests/faults/harness.py)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

THREADS = torch.get_num_threads()
torch.set_num_threads(THREADS)
os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(THREADS)


@pytest.fixture(scope="module", autouse=True)
def _thread_count_per_module():
    """Every module starts at THREADS (a module may pin another count in its own fixture, set up after this)."""
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def _thread_count_kept():
    """A test that leaves another thread count behind breaks every later comparison with a subprocess (which
    gets OMP_NUM_THREADS): CI once saw 3 unrelated tests fail that way. Name the test that did it, and undo it."""
    before = torch.get_num_threads()
    yield
    after = torch.get_num_threads()
    if after != before:
        torch.set_num_threads(before)
        pytest.fail(
            f"this test left the thread count at {after} (it was {before}): restore it", pytrace=False
        )
