"""The L1 path's recipe against dead latents (Anthropic's April-2024 update): `sae.init=anthropic` starts the
decoder rows at a small norm with W_enc = W_dec^T and b_enc = 0, and the sparsity penalty weighs each
activation by its decoder row's norm. Expected values are worked out by hand."""

from __future__ import annotations

import json

import pytest
import torch

from sae_pipeline import layout
from sae_pipeline.errors import UserError
from sae_pipeline.sae import ReLUConfig, build_sae
from tests.helpers import make_store, run_cli, weights


def test_anthropic_init_rows_have_the_chosen_norm_and_the_encoder_is_their_transpose():
    for norm in (0.1, 0.3):
        sae = build_sae(ReLUConfig(d_sae=40, init="anthropic", init_decoder_norm=norm), d_in=12, seed=3)
        rows_F = sae.W_dec_FD.detach().norm(dim=1)
        assert torch.allclose(rows_F, torch.full((40,), norm), rtol=1e-6, atol=0)
        assert torch.equal(sae.W_enc_DF.detach(), sae.W_dec_FD.detach().t())  # exactly, not approximately
        assert torch.count_nonzero(sae.b_enc_F) == 0
    unit = build_sae(ReLUConfig(d_sae=40), d_in=12, seed=3)
    assert torch.allclose(unit.W_dec_FD.detach().norm(dim=1), torch.ones(40), rtol=1e-6, atol=0)
    # same directions: only the scale differs between the two inits of one seed
    small = build_sae(ReLUConfig(d_sae=40, init="anthropic"), d_in=12, seed=3)
    assert torch.allclose(small.W_dec_FD.detach() * 10, unit.W_dec_FD.detach(), rtol=1e-5, atol=1e-7)


def test_decoder_norm_weighted_l1_equals_the_hand_computed_value():
    """W_enc = I, b = 0, decoder rows (2, 0) and (0, 0.5): x = (3, 1) gives acts (3, 1), x_hat = (6, 0.5),
    squared error 3^2 + 0.5^2 = 9.25 and penalty 3*2 + 1*0.5 = 6.5; x = (-1, 4) gives acts (0, 4),
    x_hat = (0, 2), error 1 + 4 = 5, penalty 4*0.5 = 2. Means over the 2 rows: mse 7.125, l1 4.25."""
    sae = build_sae(ReLUConfig(d_sae=2, l1_coefficient=0.4, init="anthropic"), d_in=2, seed=0)
    with torch.no_grad():
        sae.W_enc_DF.copy_(torch.eye(2))
        sae.b_enc_F.zero_()
        sae.b_dec_D.zero_()
        sae.W_dec_FD.copy_(torch.tensor([[2.0, 0.0], [0.0, 0.5]]))
    x_BD = torch.tensor([[3.0, 1.0], [-1.0, 4.0]])
    out = sae.training_forward(x_BD, sparsity_scale=0.5)
    assert out.parts["l1"].item() == pytest.approx(4.25, abs=1e-6)
    assert out.parts["mse"].item() == pytest.approx(7.125, abs=1e-6)
    assert out.loss.item() == pytest.approx(7.125 + 0.4 * 0.5 * 4.25, abs=1e-5)


def test_the_decoder_stays_free_so_small_rows_are_not_renormalised():
    sae = build_sae(ReLUConfig(d_sae=16, init="anthropic"), d_in=8, seed=0)
    opt = torch.optim.SGD(sae.parameters(), lr=1e-3)
    x_BD = torch.randn(32, 8, generator=torch.Generator().manual_seed(1)) * 3
    sae.training_forward(x_BD).loss.backward()
    sae.before_optimizer_step()
    opt.step()
    sae.after_optimizer_step()
    rows_F = sae.W_dec_FD.detach().norm(dim=1)
    assert (rows_F - 0.1).abs().max() < 0.05  # still near 0.1, nowhere near the unit norm of a constraint


def test_bad_init_settings_are_one_sentence():
    with pytest.raises(UserError, match="sae.init must be one of unit, anthropic"):
        ReLUConfig(init="xavier").validate()
    with pytest.raises(UserError, match="sae.init=anthropic needs sae.sparsity_penalty=l1_decoder_norm"):
        ReLUConfig(init="anthropic", sparsity_penalty="l1").validate()
    with pytest.raises(UserError, match="sae.init_decoder_norm"):
        ReLUConfig(init="anthropic", init_decoder_norm=0.0).validate()


def test_cli_trains_with_the_init_and_refuses_a_contradiction(tmp_path):
    """64 Adam steps of lr 1e-5 move each weight by at most ~3.2e-5 per step (lr (1-b1)/sqrt(1-b2) early on),
    so a decoder row of d_in 16 moves by at most 64 * 3.2e-5 * 4 = 0.008: the rows end within 0.01 of the
    init's norm (0.1 for anthropic, 1 for unit); weights are saved in raw units with W_dec unchanged."""
    store = make_store(tmp_path / "store", n_contexts=16, d_in=16, tag_rows=False)
    base = [f"store={store}", "train=tiny", "logger=none", "sae=relu", "sae.d_sae=32", "train.lr=1e-5"]
    for init, norm in (("anthropic", 0.1), ("unit", 1.0)):
        run_dir = tmp_path / init
        done = run_cli("train", [*base, f"train.run_dir={run_dir}", f"sae.init={init}"], tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        rows_F = weights(run_dir)["W_dec_FD"].norm(dim=1)
        assert (rows_F - norm).abs().max() < 0.01, (init, rows_F)
        saved = json.loads((run_dir / layout.FINAL_SAE / layout.CONFIG).read_text())
        assert saved["sae"]["init"] == init
    bad = run_cli(
        "train", [*base, f"train.run_dir={tmp_path / 'bad'}", "sae.init=anthropic", "sae.sparsity_penalty=l1"],
        tmp_path,
    )  # fmt: skip
    assert bad.returncode == 2 and "sae.init=anthropic needs" in bad.stderr, bad.stderr[-2000:]
