"""Test-wide settings: nothing reaches a model or dataset hub, W&B stays offline and quiet, and every
process a test starts computes with this process's thread count.

Results are bit-identical only at one thread count (README, Reliability): a test that compares the weights
of a subprocess or forked child with a run in this process must give both the same count. The count is
torch's default for the machine and OMP_NUM_THREADS (MKL caps it at the physical cores: OMP_NUM_THREADS=3 gives
2 on a 2-core machine). It is set once here, so MKL and OpenMP agree for the whole session, and exported as
OMP_NUM_THREADS and MKL_NUM_THREADS, so a `python -m sae_pipeline.<stage>` started by a test gets the same
count (tests/test_train.py checks the count the subprocess recorded). The fault suite's forked children can
only use one thread, so tests/faults run at one thread, parent included (tests/faults/harness.py)."""

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

THREADS = torch.get_num_threads()
torch.set_num_threads(THREADS)
os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(THREADS)
