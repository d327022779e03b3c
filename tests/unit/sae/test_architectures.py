"""Unit tests parametrised over every SAE architecture; expected values come from the definitions."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from sae_pipeline.errors import UserError
from sae_pipeline.sae import (
    ARCHITECTURES,
    CONFIG_CLASSES,
    BatchTopKConfig,
    GatedConfig,
    JumpReLUConfig,
    MatryoshkaConfig,
    ReLUConfig,
    TiedConfig,
    TopKConfig,
    build_sae,
    geometric_median,
    read_sae,
    save_sae,
)
from sae_pipeline.sae.kernels import sparse_decode

D, F_ = 16, 48
ALL_CONFIGS = {
    "relu": ReLUConfig(d_sae=F_),
    "relu_l1": ReLUConfig(d_sae=F_, sparsity_penalty="l1"),
    "topk": TopKConfig(d_sae=F_, k=4),
    "batchtopk": BatchTopKConfig(d_sae=F_, k=4),
    "jumprelu": JumpReLUConfig(d_sae=F_, bandwidth=0.5, init_threshold=0.1),
    "gated": GatedConfig(d_sae=F_),
    "matryoshka": MatryoshkaConfig(d_sae=F_, k=4, group_sizes=[0.25, 0.75]),
    "tied": TiedConfig(d_sae=F_),
    "tied_topk": TiedConfig(d_sae=F_, k=4, l1_coefficient=0.0),
}
UNIT_NORM = {"relu_l1", "topk", "batchtopk", "jumprelu", "gated", "matryoshka"}
THRESHOLD_INFERENCE = {"batchtopk", "matryoshka"}  # train with batch top-k, infer with a learned threshold


def make(name: str, seed: int = 0):
    sae = build_sae(dataclasses.replace(ALL_CONFIGS[name]), D, seed=seed)
    with torch.no_grad():  # non-trivial biases so that every code path sees them
        g = torch.Generator().manual_seed(seed + 1)
        sae.b_dec_D.copy_(0.1 * torch.randn(D, generator=g))
        sae.b_enc_F.copy_(0.1 * torch.randn(F_, generator=g))
    return sae


def data(n: int = 32, seed: int = 0) -> torch.Tensor:
    return 2.0 * torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def all_dead() -> torch.Tensor:
    return torch.ones(F_, dtype=torch.bool)


def test_registry_covers_all_architectures():
    assert set(ARCHITECTURES) == {"relu", "topk", "batchtopk", "jumprelu", "gated", "matryoshka", "tied"}
    for arch, cls in CONFIG_CLASSES.items():
        assert cls().arch == arch
        for f in dataclasses.fields(cls):  # Hydra-friendly field types only
            assert f.type in ("str", "int", "float", "bool", "list[float]", str, int, float, bool), (
                arch,
                f.name,
            )
    with pytest.raises(UserError, match="sae.arch"):
        build_sae(dataclasses.replace(ReLUConfig(), arch="nope"), D)


@pytest.mark.parametrize("name", sorted(ALL_CONFIGS))
def test_shapes_and_gradients_reach_every_parameter(name):
    sae = make(name)
    x = data()
    assert sae.d_in == D and sae.d_sae == F_
    assert sae.W_enc_DF.shape == (D, F_) and sae.W_dec_FD.shape == (F_, D)
    assert sae.b_enc_F.shape == (F_,) and sae.b_dec_D.shape == (D,)
    assert sae.encode(x).shape == (32, F_)
    assert sae(x).shape == (32, D)
    out = sae.training_forward(x, dead_mask_F=all_dead())
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.acts_BF.shape == (32, F_) and out.x_hat_BD.shape == (32, D)
    # the reconstruction term is squared error summed over D, mean over B
    torch.testing.assert_close(out.parts["mse"], (out.x_hat_BD - x).pow(2).sum(1).mean())
    out.loss.backward()
    for pname, p in sae.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: no gradient reaches {pname}"


@pytest.mark.parametrize("name", sorted(ALL_CONFIGS))
def test_training_forward_matches_inference(name):
    sae = make(name)
    x = data()
    out = sae.training_forward(x)
    if name not in THRESHOLD_INFERENCE:
        torch.testing.assert_close(out.acts_BF, sae.encode(x).detach())
        torch.testing.assert_close(out.x_hat_BD, sae(x).detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.x_hat_BD, sae.decode(out.acts_BF).detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(ALL_CONFIGS))
def test_decoder_constraint_hooks(name):
    sae = make(name)
    opt = torch.optim.SGD(sae.parameters(), lr=0.5)
    out = sae.training_forward(data(), dead_mask_F=all_dead())
    out.loss.backward()
    sae.before_optimizer_step()
    if name in UNIT_NORM:
        parallel_F = (sae.W_dec_FD.grad * sae.W_dec_FD).sum(1)
        assert parallel_F.abs().max() < 1e-5, "gradient component parallel to decoder rows not removed"
    opt.step()
    sae.after_optimizer_step()
    norms_F = sae.W_dec_FD.norm(dim=1)
    if name in UNIT_NORM:
        torch.testing.assert_close(norms_F, torch.ones(F_))
    else:
        assert (norms_F - 1).abs().max() > 1e-3  # l1_decoder_norm leaves the decoder free


def test_topk_keeps_exactly_k_largest():
    sae = make("topk")
    x = data()
    acts = sae.encode(x)
    pre = (x - sae.b_dec_D) @ sae.W_enc_DF + sae.b_enc_F
    expected = torch.zeros_like(pre)
    top = pre.topk(4, dim=1)
    expected.scatter_(1, top.indices, top.values.relu())
    torch.testing.assert_close(acts, expected, rtol=1e-5, atol=1e-5)


def test_topk_sparse_decode_equals_dense_decode():
    g = torch.Generator().manual_seed(3)
    W_FD = torch.randn(F_, D, generator=g)
    b_D = torch.randn(D, generator=g)
    idx_BK = torch.stack([torch.randperm(F_, generator=g)[:5] for _ in range(7)])
    vals_BK = torch.rand(7, 5, generator=g)
    w_out = torch.randn(7, D, generator=g)

    W1, b1, v1 = (t.clone().requires_grad_() for t in (W_FD, b_D, vals_BK))
    y1 = sparse_decode(idx_BK, v1, W1, b1)
    (y1 * w_out).sum().backward()

    W2, b2, v2 = (t.clone().requires_grad_() for t in (W_FD, b_D, vals_BK))
    dense_BF = torch.zeros(7, F_).scatter(1, idx_BK, v2)
    y2 = dense_BF @ W2 + b2
    (y2 * w_out).sum().backward()

    torch.testing.assert_close(y1, y2)
    for a, b in ((W1, W2), (b1, b2), (v1, v2)):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("name", ["topk", "batchtopk"])
def test_sparse_training_gradients_equal_dense_autograd(name):
    """Custom sparse encoder/decoder backward == plain autograd through the dense formulas."""
    sae = make(name)
    x = data()
    out = sae.training_forward(x)
    out.loss.backward()  # no dead mask: loss is the reconstruction term alone
    sparse_grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    keep_BF = out.acts_BF > 0
    pre = (x - sae.b_dec_D) @ sae.W_enc_DF + sae.b_enc_F
    acts = pre * keep_BF
    loss = ((acts @ sae.W_dec_FD + sae.b_dec_D - x) ** 2).sum(1).mean()
    loss.backward()
    for n, p in sae.named_parameters():
        torch.testing.assert_close(sparse_grads[n], p.grad, rtol=1e-4, atol=1e-4, msg=n)


def test_topk_aux_loss():
    sae = make("topk")
    x = data()
    # no dead latents: zero
    out = sae.training_forward(x, dead_mask_F=torch.zeros(F_, dtype=torch.bool))
    assert out.parts["aux_k"] == 0
    # dead latents: normalised MSE of the residual reconstructed from the top aux_k dead pre-activations
    dead = torch.zeros(F_, dtype=torch.bool)
    dead[::3] = True
    out = sae.training_forward(x, dead_mask_F=dead)
    pre = (x - sae.b_dec_D) @ sae.W_enc_DF + sae.b_enc_F
    pre_dead = pre.masked_fill(~dead, float("-inf"))
    top = pre_dead.topk(sae.aux_k, dim=1)  # aux_k = D // 2 = 8 <= 16 dead
    aux_acts = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    resid = x - out.x_hat_BD
    expected = ((aux_acts @ sae.W_dec_FD - resid) ** 2).sum() / ((resid - resid.mean(0)) ** 2).sum()
    torch.testing.assert_close(out.parts["aux_k"], expected.detach(), rtol=1e-4, atol=1e-5)
    # 4: the default AuxK weight (sae/topk.py AUX_K_COEFFICIENT)
    torch.testing.assert_close(out.loss, out.parts["mse"] + 4 * expected.detach(), rtol=1e-4, atol=1e-4)


def test_batchtopk_selects_top_k_times_batch_and_learns_threshold():
    sae = make("batchtopk")
    x = data(64)
    out = sae.training_forward(x)
    pre = ((x - sae.b_dec_D) @ sae.W_enc_DF + sae.b_enc_F).detach()
    kept = pre.flatten().topk(4 * 64).values
    expected = torch.where(pre >= kept.min(), pre, 0.0).relu()
    torch.testing.assert_close(out.acts_BF, expected, rtol=1e-5, atol=1e-5)
    assert (out.acts_BF > 0).sum() == 4 * 64
    # first update sets the threshold to the smallest kept activation; later ones are an EMA
    torch.testing.assert_close(sae.threshold, kept.min())
    x2 = data(64, seed=5)
    sae.training_forward(x2)
    pre2 = ((x2 - sae.b_dec_D) @ sae.W_enc_DF + sae.b_enc_F).detach()
    t2 = pre2.flatten().topk(4 * 64).values.min()
    torch.testing.assert_close(sae.threshold, 0.99 * kept.min() + 0.01 * t2)


def test_batchtopk_inference_uses_threshold_and_rows_are_independent():
    sae = make("batchtopk")
    with torch.no_grad():
        sae.threshold.fill_(0.7)
    sae.eval()
    x = data(16)
    acts = sae.encode(x)
    pre = (x - sae.b_dec_D) @ sae.W_enc_DF + sae.b_enc_F
    torch.testing.assert_close(acts, torch.where(pre > 0.7, pre, 0.0), rtol=1e-5, atol=1e-5)
    # a row's code does not depend on the other rows of the batch
    torch.testing.assert_close(sae.encode(x[3:4]), acts[3:4], rtol=1e-5, atol=1e-5)
    mixed = torch.cat([x[3:4], 100 * x[:5], -x[6:9]])
    torch.testing.assert_close(sae.encode(mixed)[:1], acts[3:4], rtol=1e-5, atol=1e-5)


def test_jumprelu_threshold_gradient_is_rectangle_pseudo_derivative():
    sae = make("jumprelu")
    cfg = sae.cfg
    x = data(64)
    with torch.no_grad():  # spread thresholds so that some pre-activations fall inside the kernel window
        sae.log_threshold_F.copy_(torch.linspace(-2.0, 0.5, F_))
    out = sae.training_forward(x)
    out.loss.backward()
    with torch.no_grad():
        z = (x - sae.b_dec_D) @ sae.W_enc_DF + sae.b_enc_F
        theta = sae.log_threshold_F.exp()
        eps = cfg.bandwidth
        rect = ((z - theta).abs() < eps / 2).float()
        active = (z > theta).float()
        x_hat = (z * active) @ sae.W_dec_FD + sae.b_dec_D
        dmse_dacts = (2.0 / x.shape[0]) * (x_hat - x) @ sae.W_dec_FD.T
        # d acts/d theta = -(theta/eps) rect;  d L0/d theta = -(1/eps) rect / B
        dtheta = (dmse_dacts * (-(theta / eps) * rect)).sum(0)
        dtheta += cfg.l0_coefficient * (-(1.0 / eps) * rect).sum(0) / x.shape[0]
        expected = dtheta * theta  # chain rule through theta = exp(log_threshold)
    assert rect.sum() > 0
    torch.testing.assert_close(sae.log_threshold_F.grad, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.parts["l0_penalty"], active.sum(1).mean())


def test_gated_aux_loss_sends_no_gradient_into_decoder():
    sae = make("gated")
    x = data()
    out = sae.training_forward(x)
    with torch.no_grad():
        pi_gate = (x - sae.b_dec_D) @ sae.W_enc_DF + sae.b_enc_F
        expected_aux = ((pi_gate.relu() @ sae.W_dec_FD + sae.b_dec_D - x) ** 2).sum(1).mean()
    torch.testing.assert_close(out.parts["aux_gated"], expected_aux)
    # gradient of the aux term alone: the encoder gets some, the decoder and b_dec none
    params = dict(sae.named_parameters())
    pi_gate = (x - sae.b_dec_D.detach()) @ sae.W_enc_DF + sae.b_enc_F
    aux = ((pi_gate.relu() @ sae.W_dec_FD.detach() + sae.b_dec_D.detach() - x) ** 2).sum(1).mean()
    # compare: full-loss decoder gradient == gradient of the reconstruction term alone
    full_g = torch.autograd.grad(out.loss, [params["W_dec_FD"]], retain_graph=True)[0]
    recon = ((out.acts_BF @ params["W_dec_FD"] + params["b_dec_D"] - x) ** 2).sum(1).mean()
    recon_g = torch.autograd.grad(recon, [params["W_dec_FD"]])[0]
    torch.testing.assert_close(full_g, recon_g, rtol=1e-5, atol=1e-5)
    # and the aux term does push the gate (encoder) parameters
    g_enc = torch.autograd.grad(aux, [params["W_enc_DF"], params["b_enc_F"]])
    assert all(g.abs().sum() > 0 for g in g_enc)
    # b_dec: the full-loss gradient equals the hand-written loss whose aux term uses b_dec.detach()
    sae.zero_grad()
    out = sae.training_forward(x)
    out.loss.backward()
    g_full = sae.b_dec_D.grad.clone()
    sae.zero_grad()
    pi_gate = (x - sae.b_dec_D) @ sae.W_enc_DF + sae.b_enc_F
    pi_mag = (x - sae.b_dec_D) @ (sae.W_enc_DF * sae.r_mag_F.exp()) + sae.b_mag_F
    acts = (pi_gate > 0) * pi_mag.relu()
    recon = ((acts @ sae.W_dec_FD + sae.b_dec_D - x) ** 2).sum(1).mean()
    l1 = pi_gate.relu().sum(1).mean()
    aux_free = ((pi_gate.relu() @ sae.W_dec_FD.detach() + sae.b_dec_D.detach() - x) ** 2).sum(1).mean()
    (recon + sae.cfg.l1_coefficient * l1 + aux_free).backward()
    torch.testing.assert_close(g_full, sae.b_dec_D.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(ALL_CONFIGS))
def test_fold_input_scale(name):
    sae = make(name)
    with torch.no_grad():  # every other bias non-zero too (Gated's b_mag starts at 0, hiding its fold)
        g = torch.Generator().manual_seed(7)
        for key, p in sae.named_parameters():
            if key.startswith("b_") and key not in ("b_enc_F", "b_dec_D"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    if name in THRESHOLD_INFERENCE:
        with torch.no_grad():
            sae.threshold.fill_(0.5)
    s = 3.7
    x_raw = data(16)
    with torch.no_grad():
        acts_scaled = sae.encode(x_raw * s)
        x_hat_scaled = sae(x_raw * s)
        sae.fold_input_scale(s)
        acts_raw = sae.encode(x_raw)
        x_hat_raw = sae(x_raw)
    torch.testing.assert_close(x_hat_raw, x_hat_scaled / s, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(acts_raw, acts_scaled / s, rtol=1e-4, atol=1e-5)
    if name in UNIT_NORM:  # decoder directions untouched
        torch.testing.assert_close(sae.W_dec_FD.norm(dim=1), torch.ones(F_))


@pytest.mark.parametrize("name", sorted(ALL_CONFIGS))
def test_save_load_round_trip(name, tmp_path):
    sae = make(name)
    sae.training_forward(data())  # batchtopk: non-trivial threshold buffer
    save_sae(sae, tmp_path / "sae", extra={"store": "somewhere"})
    meta = json.loads((tmp_path / "sae" / "config.json").read_text())
    assert meta["arch"] == sae.cfg.arch and meta["d_in"] == D and meta["d_sae"] == F_
    assert meta["store"] == "somewhere" and meta["sae"] == dataclasses.asdict(sae.cfg)
    loaded = read_sae(tmp_path / "sae")
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    a, b = sae.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    x = data()
    assert torch.equal(loaded.eval()(x), sae.eval()(x))


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="config.json"):
        read_sae(tmp_path)
    sae = make("topk")
    save_sae(sae, tmp_path / "a", extra={})
    (tmp_path / "a" / "sae.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="sae.safetensors"):
        read_sae(tmp_path / "a")
    save_sae(sae, tmp_path / "b", extra={})
    save_sae(build_sae(TopKConfig(d_sae=F_ + 1, k=4), D), tmp_path / "c", extra={})
    (tmp_path / "c" / "config.json").replace(tmp_path / "b" / "config.json")
    with pytest.raises(UserError, match="sae.safetensors is damaged"):  # the recorded checksum disagrees
        read_sae(tmp_path / "b")
    meta = json.loads((tmp_path / "b" / "config.json").read_text())
    del meta["sha256"]  # a config without a recorded checksum (written elsewhere): the shapes are checked
    (tmp_path / "b" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="sae.safetensors.*shape"):
        read_sae(tmp_path / "b")
    (tmp_path / "c" / "config.json").write_text("{broken")
    with pytest.raises(UserError, match="config.json"):
        read_sae(tmp_path / "c")


@pytest.mark.parametrize(
    "cfg, key",
    [
        (TopKConfig(d_sae=F_, k=F_ + 1), "sae.k"),
        (TopKConfig(k=0), "sae.k"),
        (TopKConfig(aux_k_coefficient=-1.0), "sae.aux_k_coefficient"),
        (BatchTopKConfig(threshold_momentum=1.5), "sae.threshold_momentum"),
        (ReLUConfig(l1_coefficient=-1.0), "sae.l1_coefficient"),
        (ReLUConfig(sparsity_penalty="l2"), "sae.sparsity_penalty"),
        (GatedConfig(l1_coefficient=float("nan")), "sae.l1_coefficient"),
        (JumpReLUConfig(l0_coefficient=-0.1), "sae.l0_coefficient"),
        (JumpReLUConfig(bandwidth=0.0), "sae.bandwidth"),
        (JumpReLUConfig(init_threshold=-1.0), "sae.init_threshold"),
        (ReLUConfig(b_dec_init="median"), "sae.b_dec_init"),
        (MatryoshkaConfig(group_sizes=[0.5, 0.2]), "sae.group_sizes"),
        (MatryoshkaConfig(d_sae=F_, k=F_ + 1, group_sizes=[1.0]), "sae.k"),
        (TiedConfig(k=-1), "sae.k"),
        (TiedConfig(d_sae=F_, k=F_ + 1), "sae.k"),
        (TiedConfig(l1_coefficient=-1.0), "sae.l1_coefficient"),
        (TiedConfig(sparsity_penalty="l2"), "sae.sparsity_penalty"),
        (ReLUConfig(d_sae=-3), "sae.d_sae"),
        (ReLUConfig(expansion_factor=0.0), "sae.expansion_factor"),
    ],
)
def test_bad_config_raises_user_error_naming_key(cfg, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        build_sae(cfg, D)


def test_d_sae_from_expansion_factor():
    assert build_sae(ReLUConfig(expansion_factor=2.5), D).d_sae == 40
    assert build_sae(ReLUConfig(expansion_factor=2.5, d_sae=7), D).d_sae == 7


def test_init_from_data():
    # geometric median of points symmetric about c plus one far outlier stays near c; the mean does not
    c = torch.tensor([1.0, -2.0] + [0.0] * (D - 2))
    pts = torch.cat([c + torch.eye(D), c - torch.eye(D), (c + 1000.0).unsqueeze(0)])
    torch.testing.assert_close(geometric_median(pts), c, atol=0.2, rtol=0)
    for how, expected in (("mean", pts.mean(0)), ("zeros", torch.zeros(D))):
        sae = build_sae(ReLUConfig(d_sae=F_, b_dec_init=how), D)
        sae.init_from_data(pts)
        torch.testing.assert_close(sae.b_dec_D.detach(), expected)
    with pytest.raises(UserError, match="init_from_data"):
        sae.init_from_data(torch.zeros(4, D + 1))


def test_batchtopk_candidate_search_on_large_batches_is_exact():
    sae = build_sae(BatchTopKConfig(d_sae=256, k=4), D, seed=0)
    pre = torch.randn(
        2048, 256, generator=torch.Generator().manual_seed(0)
    )  # > 2**18 entries: candidate path
    pre[0, :64] += 10.0  # one row far above the rest: it owns more than 4k of the kept entries
    idx, keep, t = sae._batch_select(pre)
    got = torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx) * keep)
    kept = pre.flatten().topk(4 * 2048).values
    torch.testing.assert_close(t, kept.min())
    torch.testing.assert_close(got, torch.where(pre >= kept.min(), pre, 0.0))


@pytest.mark.parametrize("name", ["jumprelu", "gated"])
def test_fused_training_step_gradients_equal_plain_autograd(name):
    """The hand-written backward of the fused jumprelu / gated training step == autograd on the formulas."""
    sae = make(name)
    x = data(64)
    with torch.no_grad():  # spread per-latent parameters so that every mask and kernel window is exercised
        if name == "jumprelu":
            sae.log_threshold_F.copy_(torch.linspace(-2.0, 0.5, F_))
        else:
            sae.r_mag_F.copy_(torch.linspace(-1.0, 1.0, F_))
            sae.b_mag_F.copy_(torch.linspace(-1.0, 1.0, F_))
    out = sae.training_forward(x, sparsity_scale=0.7)
    out.loss.backward()
    fused = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    if name == "jumprelu":
        from sae_pipeline.sae.jumprelu import jumprelu, step_l0

        z = (x - sae.b_dec_D) @ sae.W_enc_DF + sae.b_enc_F
        theta = sae.log_threshold_F.exp()
        acts = jumprelu(z, theta, sae.cfg.bandwidth)
        l0 = step_l0(z, theta, sae.cfg.bandwidth)
        recon = ((acts @ sae.W_dec_FD + sae.b_dec_D - x) ** 2).sum(1).mean()
        loss = recon + sae.cfg.l0_coefficient * 0.7 * l0
        assert ((z - theta).abs() < sae.cfg.bandwidth / 2).any()
    else:
        pi_gate = (x - sae.b_dec_D) @ sae.W_enc_DF + sae.b_enc_F
        pi_mag = (x - sae.b_dec_D) @ (sae.W_enc_DF * sae.r_mag_F.exp()) + sae.b_mag_F
        acts = (pi_gate > 0) * pi_mag.relu()
        recon = ((acts @ sae.W_dec_FD + sae.b_dec_D - x) ** 2).sum(1).mean()
        l1 = pi_gate.relu().sum(1).mean()
        aux = ((pi_gate.relu() @ sae.W_dec_FD.detach() + sae.b_dec_D.detach() - x) ** 2).sum(1).mean()
        loss = recon + sae.cfg.l1_coefficient * 0.7 * l1 + aux
    torch.testing.assert_close(out.loss, loss.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.acts_BF, acts.detach(), rtol=1e-5, atol=1e-5)
    loss.backward()
    for n, p in sae.named_parameters():
        torch.testing.assert_close(fused[n], p.grad, rtol=1e-4, atol=1e-4, msg=n)
