"""The numbers a training run logs and the dead-latent bookkeeping behind AuxK, against values worked
out by hand or forced by construction (not read back from the code under test)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sae_pipeline import layout
from sae_pipeline.sae import CONFIG_CLASSES, build_sae
from sae_pipeline.train import run
from sae_pipeline.training.stats import LatentStats
from sae_pipeline.training.trainer import StopRequested
from tests.helpers import cfg_for, make_store


def test_logged_mse_fvu_l0_by_hand():
    """x = [[10, 0], [12, 2]], x_hat = [[10, 1], [12, 2]]: squared errors [1, 0]; centred variance
    (1 + 1) + (1 + 1) = 4, so FVU = 1/4 (without centring it would be 1/248); trained on x*s with
    s = 2, so the raw-unit MSE is mean([1, 0]) / s^2 = 0.125; L0 = (1 + 2) / 2."""
    stats = LatentStats(d_sae=3, dead_tokens=100, device=torch.device("cpu"))
    x_BD = torch.tensor([[10.0, 0.0], [12.0, 2.0]])
    x_hat_BD = torch.tensor([[10.0, 1.0], [12.0, 2.0]])
    acts_BF = torch.tensor([[0.0, 3.0, 0.0], [1.0, 2.0, 0.0]])
    stats.update(x_BD, x_hat_BD, acts_BF, torch.tensor(7.0), {"mse": torch.tensor(0.5)}, input_scale=2.0)
    stats.update(x_BD, x_BD, acts_BF, torch.tensor(3.0), {"mse": torch.tensor(0.0)}, input_scale=2.0)
    out = stats.summary()
    assert out["fvu"] == pytest.approx((0.25 + 0.0) / 2)
    assert out["mse"] == pytest.approx((0.125 + 0.0) / 2)
    assert out["l0"] == pytest.approx(1.5)
    assert out["loss"] == pytest.approx(5.0) and out["loss/mse"] == pytest.approx(0.25)
    assert out["dense_latents"] == 2  # latents 0 and 1 fire on 50% and 100% of the 4 tokens (> 10%)


def test_dead_counter_counts_tokens_and_resets_when_a_latent_fires():
    stats = LatentStats(d_sae=3, dead_tokens=4, device=torch.device("cpu"))
    x_BD = torch.zeros(2, 2)
    only_0 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    stats.update(x_BD, x_BD, only_0, torch.tensor(0.0), {}, 1.0)
    assert stats.since_fired_F.tolist() == [0, 2, 2] and not stats.dead_mask_F().any()
    stats.update(x_BD, x_BD, only_0, torch.tensor(0.0), {}, 1.0)
    assert stats.dead_mask_F().tolist() == [False, True, True]  # 4 tokens without firing
    stats.update(x_BD, x_BD, torch.tensor([[0.0, 0.0, 5.0], [0.0, 0.0, 0.0]]), torch.tensor(0.0), {}, 1.0)
    assert stats.since_fired_F.tolist() == [2, 6, 0] and stats.dead_mask_F().tolist() == [False, True, False]


@pytest.mark.parametrize("flat", [False, True])
def test_sparse_code_gives_the_hand_counted_l0_firing_and_dead_latents(flat):
    """The same activations as the hand example, given as a sparse code (K=2 per row, one padded zero;
    or BatchTopK's flat entries with their rows): L0 = (1 + 2) / 2, latents 0 and 1 fire on 1 and 2 of
    the 2 rows, latent 2 never fires; the padded (value 0) entry on latent 2 must not count."""
    from sae_pipeline.sae.base import SparseCode

    stats = LatentStats(d_sae=3, dead_tokens=4, device=torch.device("cpu"))
    x_BD = torch.tensor([[10.0, 0.0], [12.0, 2.0]])
    if flat:
        code = SparseCode(
            torch.tensor([1, 2, 0, 1]), torch.tensor([3.0, 0.0, 1.0, 2.0]), 3, 2, torch.tensor([0, 0, 1, 1])
        )
    else:
        code = SparseCode(torch.tensor([[1, 2], [0, 1]]), torch.tensor([[3.0, 0.0], [1.0, 2.0]]), 3, 2)
    stats.update(x_BD, x_BD, None, torch.tensor(1.0), {}, 1.0, sparse=code)
    assert stats.fired_F.tolist() == [1, 2, 0]
    assert stats.since_fired_F.tolist() == [0, 0, 2]
    stats.update(x_BD, x_BD, None, torch.tensor(1.0), {}, 1.0, sparse=code)
    assert stats.dead_mask_F().tolist() == [False, False, True]
    out = stats.summary()
    assert out["l0"] == pytest.approx(1.5) and out["dead_latents"] == 1 and out["dense_latents"] == 2
    assert code.dense().tolist() == [[0.0, 3.0, 0.0], [1.0, 2.0, 0.0]]


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_auxk_gradient_reaches_only_dead_latents(arch):
    """The AuxK term reconstructs the residual of the main reconstruction with dead latents only: its
    gradient must reach the dead latents' decoder rows and nothing of the live ones (the main
    reconstruction is a constant inside it)."""
    torch.manual_seed(0)
    sae = build_sae(CONFIG_CLASSES[arch](d_sae=32, k=2, aux_k=4, normalize_input=False), d_in=8, seed=0)
    x_BD = torch.randn(16, 8)
    dead_F = torch.zeros(32, dtype=torch.bool)
    dead_F[16:] = True

    def grads(coefficient: float) -> tuple[torch.Tensor, torch.Tensor]:
        sae.cfg.aux_k_coefficient = coefficient
        sae.zero_grad()
        sae.training_forward(x_BD, dead_mask_F=dead_F).loss.backward()
        return sae.W_dec_FD.grad.clone(), sae.W_enc_DF.grad.t().clone()  # both [F, D]: a row per latent

    for aux_FD, what in zip(
        (a - b for a, b in zip(grads(1.0), grads(0.0), strict=True)), ("decoder", "encoder"), strict=True
    ):
        assert float(aux_FD[:16].abs().max()) == 0.0, f"AuxK moved live latents' {what}"
        assert float(aux_FD[16:].abs().sum()) > 0.0, f"no AuxK gradient reached the dead latents' {what}"


def test_dead_latents_and_their_counters_survive_a_resume(tmp_path):
    """k=1 of 256 latents on 64-row batches leaves >= 192 latents silent each step, so with
    dead_tokens=128 latents die after two steps and AuxK trains them: a resume that lost the counters
    would train differently from the uninterrupted run."""
    store = make_store(tmp_path / "s", n_contexts=64, d_in=16, tag_rows=False)
    sae = [
        "sae=topk",
        "sae.k=1",
        "sae.d_sae=256",
        "sae.aux_k=8",
        "train.dead_tokens=128",
        "train.val_every=0",
    ]
    run(cfg_for(store, tmp_path / "a", *sae))
    with pytest.raises(StopRequested):
        run(cfg_for(store, tmp_path / "b", *sae, "train.advanced.stop_after_steps=41"))
    run(cfg_for(store, tmp_path / "b", *sae, "train.resume=true"))
    log = [json.loads(ln) for ln in (tmp_path / "a" / layout.TRAIN_LOG).read_text().splitlines()]
    assert all(r["dead_latents"] > 0 for r in log if "dead_latents" in r and r["step"] >= 8)
    a = load_file(str(tmp_path / "a" / layout.FINAL_SAE / layout.SAE_WEIGHTS))
    b = load_file(str(tmp_path / "b" / layout.FINAL_SAE / layout.SAE_WEIGHTS))
    for name in a:
        assert torch.equal(a[name], b[name]), name
