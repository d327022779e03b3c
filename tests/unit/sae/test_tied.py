"""Tied SAE: one weight matrix (decoder = encoder transpose), its gradients, TopK selection, free row norms."""

from __future__ import annotations

import pytest
import torch

from sae_pipeline.sae import ReLUConfig, TiedConfig, build_sae

D, F_ = 16, 48


def make(**kw):
    sae = build_sae(TiedConfig(d_sae=F_, **kw), D, seed=0)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        sae.b_dec_D.copy_(0.1 * torch.randn(D, generator=g))
        sae.b_enc_F.copy_(0.1 * torch.randn(F_, generator=g))
    return sae


def data(n: int = 32) -> torch.Tensor:
    return 2.0 * torch.randn(n, D, generator=torch.Generator().manual_seed(0))


def test_one_weight_matrix_and_the_decoder_is_its_transpose():
    sae = make()
    assert [n for n, _ in sae.named_parameters()] == ["W_enc_DF", "b_enc_F", "b_dec_D"]
    assert set(sae.state_dict()) == {"W_enc_DF", "b_enc_F", "b_dec_D"}
    assert sae.W_dec_FD.data_ptr() == sae.W_enc_DF.data_ptr()  # a view, not a copy
    torch.testing.assert_close(sae.W_dec_FD, sae.W_enc_DF.t())
    torch.testing.assert_close(sae.W_dec_FD.norm(dim=1), torch.ones(F_))  # rows start at unit norm
    x = data()
    with torch.no_grad():
        acts = ((x - sae.b_dec_D) @ sae.W_enc_DF + sae.b_enc_F).relu()
        torch.testing.assert_close(sae(x), acts @ sae.W_enc_DF.t() + sae.b_dec_D)


@pytest.mark.parametrize("penalty", ["l1", "l1_decoder_norm"])
def test_gradient_is_the_sum_of_the_untied_encoder_and_decoder_gradients(penalty):
    """d/dW of L(W, W^T) = dL/dW_enc + (dL/dW_dec)^T at W_dec = W^T (the chain rule for a shared weight)."""
    tied = make(l1_coefficient=0.7, sparsity_penalty=penalty)
    untied = build_sae(ReLUConfig(d_sae=F_, l1_coefficient=0.7, sparsity_penalty=penalty), D)
    with torch.no_grad():
        tied.W_enc_DF.mul_(torch.linspace(0.5, 1.5, F_))  # rows of different norms
        for name in ("W_enc_DF", "b_enc_F", "b_dec_D"):
            getattr(untied, name).copy_(getattr(tied, name))
        untied.W_dec_FD.copy_(tied.W_enc_DF.t())
    x = data()
    out_t, out_u = tied.training_forward(x), untied.training_forward(x)
    torch.testing.assert_close(out_t.loss, out_u.loss)
    out_t.loss.backward()
    out_u.loss.backward()
    torch.testing.assert_close(tied.W_enc_DF.grad, untied.W_enc_DF.grad + untied.W_dec_FD.grad.t())
    torch.testing.assert_close(tied.b_dec_D.grad, untied.b_dec_D.grad)
    torch.testing.assert_close(tied.b_enc_F.grad, untied.b_enc_F.grad)


def test_topk_keeps_each_rows_k_largest():
    sae = make(k=3, l1_coefficient=0.0)
    x = data()
    with torch.no_grad():
        pre = (x - sae.b_dec_D) @ sae.W_enc_DF + sae.b_enc_F
        top = pre.topk(3, dim=1)
        expected = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
        torch.testing.assert_close(sae.encode(x), expected)
    out = sae.training_forward(x)
    torch.testing.assert_close(out.loss, out.parts["mse"])  # no L1 term at l1_coefficient=0
    assert ((out.acts_BF > 0).sum(1) <= 3).all()


def test_row_norms_are_left_free_and_the_decoder_stays_tied_through_an_optimizer_step():
    sae = make()  # default sparsity_penalty=l1_decoder_norm
    opt = torch.optim.Adam(sae.parameters(), lr=0.05)
    out = sae.training_forward(data())
    out.loss.backward()
    grad = sae.W_enc_DF.grad.clone()
    sae.before_optimizer_step()
    assert torch.equal(sae.W_enc_DF.grad, grad)  # no projection of the (shared) gradient
    opt.step()
    stepped = sae.W_enc_DF.detach().clone()
    sae.after_optimizer_step()
    assert torch.equal(sae.W_enc_DF.detach(), stepped)  # no renormalisation
    assert (sae.W_dec_FD.norm(dim=1) - 1).abs().max() > 1e-3
    assert torch.equal(sae.W_dec_FD, sae.W_enc_DF.t())


def test_plain_l1_keeps_rows_at_unit_norm():
    sae = make(sparsity_penalty="l1")
    opt = torch.optim.SGD(sae.parameters(), lr=0.5)
    sae.training_forward(data()).loss.backward()
    sae.before_optimizer_step()
    parallel_F = (sae.W_enc_DF.grad * sae.W_enc_DF).sum(0)  # component along each row (= W_enc column)
    grad_max = sae.W_enc_DF.grad.abs().max()
    assert grad_max > 1e-3 and parallel_F.abs().max() < 1e-6 * grad_max
    opt.step()
    assert (sae.W_dec_FD.norm(dim=1) - 1).abs().max() > 1e-4  # the step alone leaves the sphere
    sae.after_optimizer_step()
    torch.testing.assert_close(sae.W_dec_FD.norm(dim=1), torch.ones(F_))
