"""SAEBench's probe training as written here (evaluation/letter_probes.py): the objective it minimises, the
zero weights it leaves on unused inputs, the L1 probe's ranking and its batch rule."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from sae_pipeline.evaluation.letter_probes import GROUND_TRUTH, L1_PROBE, adam_probes, l1_ranking


def test_probes_reach_the_class_weighted_logistic_optimum():
    """Two input values, so each one-vs-rest probe's optimum is closed-form: a group whose rows are
    positive with rate q gets logit log(pw q / (1 - q)), pw = negatives / positives of the class (the
    class weighting); w and b follow from the two groups' logits (x = +1 and x = -1)."""
    x_N1 = torch.tensor([[1.0]] * 60 + [[-1.0]] * 40)
    label_N = np.array([1] * 45 + [0] * 15 + [1] * 10 + [0] * 30)
    # full batch, no weight decay, long enough to converge; the real schedules are SAEBench's constants
    t = replace(GROUND_TRUTH, batch_size=100, epochs=3000, lr=0.05, end_lr=1e-5, weight_decay=0.0)
    W_C1, b_C = adam_probes(x_N1, label_N, 2, t, seed=0)
    for c in (0, 1):
        y = label_N == c
        pw = (~y).sum() / y.sum()
        logit = [math.log(pw * q / (1 - q)) for q in (y[:60].mean(), y[60:].mean())]
        # Adam's last steps are about end_lr long, so the iterate ends within a few end_lr of the optimum
        assert float(W_C1[c, 0]) == pytest.approx((logit[0] - logit[1]) / 2, abs=5 * t.end_lr)
        assert float(b_C[c]) == pytest.approx((logit[0] + logit[1]) / 2, abs=5 * t.end_lr)


def test_l1_probe_ranks_the_latent_that_carries_the_letter_first():
    """Latent 0 fires exactly on letter 0's words, latent 1 at random, latent 2 never: the L1 probe of
    letter 0 weighs latent 0 highest, and latent 2, never seen non-zero, keeps exactly zero weight (the
    zero start; the planted absorption test relies on it for the dense probe)."""
    g = torch.Generator().manual_seed(0)
    label_N = np.arange(300) % 3
    z_N3 = torch.zeros(300, 3)
    z_N3[:, 0] = torch.from_numpy(label_N == 0).float() * 2.0
    z_N3[:, 1] = (torch.rand(300, generator=g) < 0.5).float()
    W_C3, _ = adam_probes(z_N3, label_N, 3, l1_ranking(len(z_N3)), seed=0)
    assert int(W_C3[0].argmax()) == 0 and float(W_C3[0, 0]) > 0
    assert float(W_C3[1, 0]) < 0 and float(W_C3[2, 0]) < 0  # latent 0 speaks against the other letters
    assert torch.equal(W_C3[:, 2], torch.zeros(3))


@pytest.mark.parametrize(("rows", "batch"), [(1, 1), (1_000, 100), (38_000, 3_800), (100_000, 4_096)])
def test_l1_probe_batch_gives_a_full_vocabularys_steps(rows, batch):
    t = l1_ranking(rows)
    assert t.batch_size == batch and t.l1 == L1_PROBE.l1 and t.epochs == L1_PROBE.epochs


def test_sparse_latents_are_the_dense_ones_in_any_chunking():
    """encode_sparse keeps exactly the SAE's firing latents, whatever the chunk size its memory budget picks,
    and adam_probes gives the same probes from them as from the dense matrix (batches are made dense)."""
    from sae_pipeline.evaluation.absorption import encode_sparse
    from sae_pipeline.sae import CONFIG_CLASSES, build_sae

    sae = build_sae(CONFIG_CLASSES["topk"](d_sae=64, k=4), 8, seed=0).eval()
    x_ND = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense_NF = sae.encode(x_ND).float().numpy()
    one = encode_sparse(sae, x_ND)
    three = encode_sparse(sae, x_ND, budget_bytes=4 * 64 * 3)  # chunks of 3 rows
    assert np.array_equal(one.toarray(), dense_NF) and np.array_equal(three.toarray(), dense_NF)
    assert one.nnz == int((dense_NF != 0).sum()) <= 50 * 4
    label_N = np.arange(50) % 3
    t = replace(L1_PROBE, batch_size=8, epochs=3)
    W_sparse, b_sparse = adam_probes(one, label_N, 3, t, 0)
    W_dense, b_dense = adam_probes(torch.from_numpy(dense_NF), label_N, 3, t, 0)
    assert torch.equal(W_sparse, W_dense) and torch.equal(b_sparse, b_dense)
