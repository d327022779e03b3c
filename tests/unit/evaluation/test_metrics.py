"""Metric functions against values worked out by hand on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from sae_pipeline.evaluation import metrics as M

# Two tokens in D=2. mean(x) = (2, 1); sum ||x - mean||^2 = (1 + 1) + (1 + 1) = 4.
X = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
# Errors x - x_hat: (1, 0) and (0, -1) -> squared errors 1 and 1, total 2.
X_HAT = torch.tensor([[0.0, 0.0], [3.0, 3.0]])


def test_mse_fvu_explained_variance_by_hand():
    assert M.mse_per_token(X, X_HAT) == pytest.approx(1.0)  # (1 + 1) / 2 tokens
    assert M.mse_per_element(X, X_HAT) == pytest.approx(0.5)  # / D = 2
    assert M.total_variance(X) == pytest.approx(4.0)
    assert M.fvu(X, X_HAT) == pytest.approx(2.0 / 4.0)
    # residuals r = (1, 0), (0, -1); mean(r) = (0.5, -0.5); sum ||r - mean(r)||^2 = 4 * 0.25 = 1.
    assert M.explained_variance(X, X_HAT) == pytest.approx(1.0 - 1.0 / 4.0)
    # a reconstruction off by a constant has FVU > 0 but explained variance 1
    shifted = X + torch.tensor([1.0, -2.0])
    assert M.explained_variance(X, shifted) == pytest.approx(1.0)
    assert M.fvu(X, shifted) == pytest.approx(2 * 5 / 4)
    assert M.fvu(X, X) == 0.0


def test_cosine_and_norm_ratio_by_hand():
    x = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
    x_hat = torch.tensor([[3.0, 4.0], [0.0, 5.0], [0.0, -1.0]])
    # cosines 1, 0, -1; norm ratios 5/5, 5/1, 1/2
    assert M.cosine_per_token(x, x_hat).tolist() == pytest.approx([1.0, 0.0, -1.0])
    assert M.norm_ratio_per_token(x, x_hat).tolist() == pytest.approx([1.0, 5.0, 0.5])
    # a zero reconstruction has cosine 0 (not nan) and norm ratio 0
    zero = torch.zeros_like(x)
    assert M.cosine_per_token(x, zero).tolist() == [0.0, 0.0, 0.0]
    assert M.norm_ratio_per_token(x, zero).tolist() == [0.0, 0.0, 0.0]


def test_l0_dead_dense_by_hand():
    # 10 tokens, 4 latents: latent 0 fires on every token, 1 on one token, 2 never, 3 on 2 tokens.
    acts = torch.zeros(10, 4)
    acts[:, 0] = 1.0
    acts[3, 1] = 0.5
    acts[[0, 7], 3] = -2.0  # negative values are non-zero too
    l0 = M.l0_per_token(acts)
    assert l0.tolist() == [2, 1, 1, 2, 1, 1, 1, 2, 1, 1]
    counts = (acts != 0).sum(0)
    s = M.latent_summary(counts, n_tokens=10, dense_threshold=0.1)
    assert s["dead"] == 1 and s["dead_frac"] == 0.25
    # densities 1.0, 0.1, 0, 0.2: "more than 10%" -> latents 0 and 3 (0.1 is not dense)
    assert s["dense"] == 2 and s["dense_frac"] == 0.5
    hist = M.log10_density_histogram(counts, n_tokens=10, bins=4)
    assert hist["dead"] == 1 and sum(hist["counts"]) == 3
    assert hist["edges"][0] == pytest.approx(-1.0) and hist["edges"][-1] == 0.0
    dist = M.l0_distribution(l0)
    assert dist["mean"] == pytest.approx(13 / 10)
    assert dist["quantiles"]["p50"] == 1.0 and dist["max"] == 2.0
    assert sum(dist["hist_counts"]) == 10


def test_streaming_stats_match_whole_tensor_functions():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=gen) * 3 + 10  # a large mean: the variance must not cancel badly
    x_hat = x + 0.5 * torch.randn(50, 6, generator=gen)
    acts = torch.relu(torch.randn(50, 8, generator=gen))
    stats = M.ActivationStats(d_sae=8)
    for i in range(0, 50, 7):  # uneven batches
        stats.update(x[i : i + 7], x_hat[i : i + 7], acts[i : i + 7])
    out = stats.compute()
    assert out["n_tokens"] == 50
    assert out["fvu"] == pytest.approx(M.fvu(x, x_hat), rel=1e-9)
    assert out["explained_variance"] == pytest.approx(M.explained_variance(x, x_hat), rel=1e-9)
    assert out["mse_per_token"] == pytest.approx(M.mse_per_token(x, x_hat), rel=1e-9)
    assert out["cosine"] == pytest.approx(M.cosine_per_token(x, x_hat).mean().item(), rel=1e-9)
    assert out["norm_ratio"] == pytest.approx(M.norm_ratio_per_token(x, x_hat).mean().item(), rel=1e-9)
    assert out["l0"] == pytest.approx((acts > 0).sum().item() / 50)
    assert stats.mean_activation().tolist() == pytest.approx(x.mean(0).tolist(), rel=1e-6)
    assert out["latents"]["dead"] == int(((acts > 0).sum(0) == 0).sum())


def test_only_pairs_of_valid_positions_are_scored():
    mask = torch.tensor([[False, True, True, False], [True, True, True, True]])  # BOS, 2 tokens, padding
    # the prediction at t of token t+1 counts only when both are valid: row 0 only at t=1, row 1 everywhere
    assert M.scored_positions(mask).tolist() == [[False, True, False], [True, True, True]]


def test_kl_and_loss_recovered():
    p = torch.tensor([[0.5, 0.5]])
    q = torch.tensor([[0.25, 0.75]])
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert M.kl_divergence(p.log(), q.log()).item() == pytest.approx(expected)
    assert M.kl_divergence(p.log(), p.log()).item() == 0.0
    assert M.loss_recovered(ce_clean=2.0, ce_sae=2.5, ce_ablated=4.0) == pytest.approx(0.75)
    assert M.loss_recovered(2.0, 2.0, 4.0) == 1.0 and M.loss_recovered(2.0, 4.0, 4.0) == 0.0
    assert math.isnan(M.loss_recovered(2.0, 2.5, 2.0))
