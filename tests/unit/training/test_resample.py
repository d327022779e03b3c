"""Resampling dead latents (training/resample.py): exactly the dead latents get new weights, worked out by
hand, and their Adam moments restart; the schedule and the CLI's refusal for other architectures."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from sae_pipeline import layout
from sae_pipeline.errors import UserError
from sae_pipeline.sae import ReLUConfig, build_sae
from sae_pipeline.train import run
from sae_pipeline.training.resample import resample_dead, resample_due
from tests.helpers import cfg_for, make_store, run_cli


def _sae_and_adam():
    """d_in 4, 6 latents; live decoder rows of norm 2 and live encoder columns of norm 5 (set by hand)."""
    sae = build_sae(ReLUConfig(d_sae=6), d_in=4, seed=0)
    with torch.no_grad():
        sae.W_dec_FD.mul_(2.0)  # unit rows -> norm 2
        sae.W_enc_DF.copy_(sae.W_dec_FD.t() * 2.5)  # columns of norm 5
        sae.b_enc_F.fill_(-1.0)
        sae.b_dec_D.zero_()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    x_BD = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    sae.training_forward(x_BD).loss.backward()
    opt.step()  # moments are non-zero everywhere now
    with torch.no_grad():  # undo the step's change of the weights (moments stay), so norms are 2 and 5 again
        sae.W_dec_FD.copy_(sae.W_dec_FD / sae.W_dec_FD.norm(dim=1, keepdim=True) * 2.0)
        sae.W_enc_DF.copy_(sae.W_enc_DF / sae.W_enc_DF.norm(dim=0, keepdim=True) * 5.0)
        sae.b_enc_F.fill_(-1.0)
        sae.b_dec_D.zero_()
    return sae, opt


def test_exactly_the_dead_latents_get_the_hand_computed_weights():
    """One row x = (4, 4, 0, 0), b_dec = (1, 0, 0, 0): every dead latent draws it, u = (0.6, 0.8, 0, 0);
    W_dec[f] = 2 u = (1.2, 1.6, 0, 0), W_enc[:, f] = 0.2 * 5 * u = (0.6, 0.8, 0, 0), b_enc[f] = 0."""
    sae, opt = _sae_and_adam()
    with torch.no_grad():
        sae.b_dec_D[0] = 1.0
    before = {k: v.detach().clone() for k, v in sae.state_dict().items()}
    moments = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in sae.parameters()}
    dead_F = torch.tensor([False, True, False, False, True, False])
    x_BD = torch.tensor([[4.0, 4.0, 0.0, 0.0]])
    got = resample_dead(sae, opt, x_BD, dead_F, seed=0)
    assert got.tolist() == [1, 4]
    for f in (1, 4):
        assert torch.allclose(sae.W_dec_FD[f], torch.tensor([1.2, 1.6, 0.0, 0.0]), atol=1e-6)
        assert torch.allclose(sae.W_enc_DF[:, f], torch.tensor([0.6, 0.8, 0.0, 0.0]), atol=1e-6)
        assert sae.b_enc_F[f].item() == 0.0
    live = [0, 2, 3, 5]
    assert torch.equal(sae.W_dec_FD[live], before["W_dec_FD"][live])
    assert torch.equal(sae.W_enc_DF[:, live], before["W_enc_DF"][:, live])
    assert torch.equal(sae.b_enc_F[live], before["b_enc_F"][live])
    assert torch.equal(sae.b_dec_D, before["b_dec_D"])
    for p, dims in ((sae.W_dec_FD, 0), (sae.W_enc_DF, 1), (sae.b_enc_F, 0)):
        for key in ("exp_avg", "exp_avg_sq"):
            m, old = opt.state[p][key], moments[id(p)][key]
            assert torch.count_nonzero(m.index_select(dims, torch.tensor([1, 4]))) == 0
            kept = torch.tensor(live)
            assert torch.equal(m.index_select(dims, kept), old.index_select(dims, kept))


def test_rows_are_drawn_by_squared_error_and_no_dead_latent_changes_nothing():
    """Two rows: the SAE reconstructs (0, 0, 0, 0) as b_dec = 0 exactly (b_enc = -1 keeps every latent off),
    so its weight is 0 and every draw takes the other row; with nothing dead, nothing moves."""
    sae, opt = _sae_and_adam()
    with torch.no_grad():
        sae.b_enc_F.fill_(-100.0)
    x_BD = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, -2.0, 0.0]])
    got = resample_dead(sae, opt, x_BD, torch.tensor([True] * 3 + [False] * 3), seed=5)
    assert got.tolist() == [0, 1, 2]
    for f in (0, 1, 2):  # u = (0, 0, -1, 0) from the second row, whatever the seed
        assert torch.allclose(sae.W_dec_FD[f] / sae.W_dec_FD[f].norm(), torch.tensor([0.0, 0.0, -1.0, 0.0]))
    state = {k: v.clone() for k, v in sae.state_dict().items()}
    assert resample_dead(sae, opt, x_BD, torch.zeros(6, dtype=torch.bool), seed=5).numel() == 0
    assert all(torch.equal(v, sae.state_dict()[k]) for k, v in state.items())


def test_schedule_every_n_steps_in_the_first_half_only():
    t = SimpleNamespace(resample_every=25, total_tokens=200 * 64, batch_size=64)  # 200 steps
    due = [s + 1 for s in range(200) if resample_due(s, t)]
    assert due == [25, 50, 75, 100]
    assert not any(
        resample_due(s, SimpleNamespace(resample_every=0, total_tokens=6400, batch_size=64))
        for s in range(100)
    )


def test_a_run_resamples_and_other_architectures_are_refused(tmp_path):
    """l1 400 from the first step on a tiny store kills latents after ~45 of 200 steps (dead_tokens 256 =
    4 steps), so the run resamples at some of its due steps 25, 50, 75, 100 and never elsewhere (none in the
    second half); TopK (AuxK's job) is refused in one sentence, exit code 2."""
    store = make_store(tmp_path / "store", n_contexts=16, d_in=16, tag_rows=False)
    over = [
        "sae=relu",
        "sae.d_sae=64",
        "sae.l1_coefficient=400",
        "train.dead_tokens=256",
        "train.resample_every=25",
    ]
    over += ["train.sparsity_warmup_steps=0", "train.total_tokens=12800"]
    run_dir = run(cfg_for(store, tmp_path / "r", *over))
    events = [json.loads(ln) for ln in (run_dir / layout.TRAIN_LOG).read_text().splitlines()]
    steps = [e["step"] for e in events if "resampled" in e.get("event", "")]
    assert steps and set(steps) <= {25, 50, 75, 100}, events
    with pytest.raises(UserError, match="train.resample_every=25 resamples dead latents of relu SAEs only"):
        run(cfg_for(store, tmp_path / "t", "sae=topk", "sae.d_sae=64", "train.resample_every=25"))
    bad = run_cli("train", [f"store={store}", f"train.run_dir={tmp_path / 'c'}", "train=tiny", "logger=none",
                            "sae=topk", "train.resample_every=8"], tmp_path)  # fmt: skip
    assert bad.returncode == 2 and "train.resample_every=8" in bad.stderr, bad.stderr[-2000:]
