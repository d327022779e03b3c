"""Matryoshka SAE: nested prefix losses checked against their definition, group sizes, and less feature
absorption than plain BatchTopK at the same L0 on data with a known parent/child hierarchy."""

from __future__ import annotations

import pytest
import torch

from sae_pipeline.errors import UserError
from sae_pipeline.sae import BatchTopKConfig, MatryoshkaConfig, build_sae, input_scale_factor
from tests.support.synthetic import HierarchicalFeatures

D, F_ = 16, 48


def make(group_sizes, k: int = 4, seed: int = 0, cls=MatryoshkaConfig):
    kw = {} if cls is BatchTopKConfig else {"group_sizes": group_sizes}
    sae = build_sae(cls(d_sae=F_, k=k, **kw), D, seed=seed)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        sae.b_dec_D.copy_(0.1 * torch.randn(D, generator=g))
        sae.b_enc_F.copy_(0.1 * torch.randn(F_, generator=g))
    return sae


def data(n: int = 32, seed: int = 0) -> torch.Tensor:
    return 2.0 * torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "sizes, ends",
    [
        ([0.25, 0.75], [12, 48]),
        ([0.0625, 0.0625, 0.125, 0.25, 0.5], [3, 6, 12, 24, 48]),  # round(cumulative fraction * 48)
        ([4, 12, 32], [4, 16, 48]),
        ([1.0], [48]),
    ],
)
def test_group_sizes_give_prefix_ends(sizes, ends):
    sae = make(sizes)
    assert sae.prefix_ends == ends
    group_F = torch.cat(
        [torch.full((e - s,), g) for g, (s, e) in enumerate(zip([0, *ends[:-1]], ends, strict=True))]
    )
    assert torch.equal(sae.group_F, group_F)


@pytest.mark.parametrize(
    "sizes, match",
    [
        ([], "at least one"),
        ([0.5, -0.5, 1.0], "> 0"),
        ([0.3, 0.3], "summing to 1 or whole"),
        ([4, 12, 30], "sum to 46 latents, but d_sae is 48"),
        ([0.001, 0.999], "no latent at d_sae=48"),
    ],
)
def test_bad_group_sizes_are_one_sentence_naming_the_key(sizes, match):
    with pytest.raises(UserError, match=r"sae\.group_sizes.*" + match.replace("(", r"\(")):
        make(sizes)


def test_loss_is_the_mean_of_the_prefix_reconstruction_losses():
    sae = make([4, 12, 32])
    x = data(64)
    out = sae.training_forward(x)  # no dead mask: no AuxK term
    keep_BF = out.acts_BF > 0
    assert keep_BF.sum() == 4 * 64  # batch top-k over the whole dictionary
    pre = (x - sae.b_dec_D) @ sae.W_enc_DF + sae.b_enc_F
    losses = []
    for end in (4, 16, 48):
        acts = pre[:, :end] * keep_BF[:, :end]
        x_hat = acts @ sae.W_dec_FD[:end] + sae.b_dec_D
        losses.append(((x_hat - x) ** 2).sum(1).mean())
    torch.testing.assert_close(out.parts["mse_prefix0"], losses[0].detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.parts["mse_prefix1"], losses[1].detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.parts["mse"], losses[2].detach(), rtol=1e-5, atol=1e-4)
    expected = sum(losses) / 3
    torch.testing.assert_close(out.loss, expected.detach(), rtol=1e-5, atol=1e-4)
    # gradients of the sparse (row, group)-bag implementation == autograd through the dense formula
    out.loss.backward()
    sparse_grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    expected.backward()
    for n, p in sae.named_parameters():
        torch.testing.assert_close(sparse_grads[n], p.grad, rtol=1e-4, atol=1e-4, msg=n)


def test_one_group_is_batchtopk():
    x = data(64)
    outs = []
    for cls in (BatchTopKConfig, MatryoshkaConfig):
        sae = make([1.0], cls=cls)
        dead = torch.zeros(F_, dtype=torch.bool)
        dead[::3] = True
        out = sae.training_forward(x, dead_mask_F=dead)
        out.loss.backward()
        outs.append((out, {n: p.grad for n, p in sae.named_parameters()}, sae.threshold.clone()))
    (a, ga, ta), (b, gb, tb) = outs
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(a.acts_BF, b.acts_BF)
    torch.testing.assert_close(ta, tb)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-5, atol=1e-5, msg=n)


# ---- feature absorption on a known hierarchy ----------------------------------------------------
def train(arch_cfg, gen: HierarchicalFeatures, steps: int, seed: int = 0):
    torch.manual_seed(seed)
    sae = build_sae(arch_cfg, gen.dirs_FD.shape[1], seed=seed)
    sample = gen.sample(4096)
    scale = input_scale_factor(sample)
    sae.init_from_data(sample * scale)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    steps_since_fired_F = torch.zeros(sae.d_sae)
    for _ in range(steps):
        out = sae.training_forward(gen.sample(128) * scale, dead_mask_F=steps_since_fired_F > 100)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step()
        steps_since_fired_F = torch.where((out.acts_BF > 0).any(0), 0.0, steps_since_fired_F + 1)
    return sae.eval(), scale


def absorption(sae, scale: float, gen: HierarchicalFeatures, n: int = 8192) -> dict:
    """From the ground truth: each parent's latent is the one whose decoder row is closest (cosine) to the
    parent's direction; absorption = how often that latent stays silent when the parent fires together with
    one of its children (averaged over parents), `misses_alone` the same when the parent fires alone."""
    x_ND, codes_NF = gen.sample_with_codes(n)
    with torch.no_grad():
        acts_NF = sae.encode(x_ND * scale)
    dec_FD = sae.W_dec_FD.detach() / sae.W_dec_FD.detach().norm(dim=1, keepdim=True)
    cos_GF = gen.dirs_FD @ dec_FD.t()  # true feature x latent
    absorbed, alone = [], []
    for p in range(gen.n_parents):
        latent = int(cos_GF[p].argmax())
        with_child_N = (codes_NF[:, list(gen.children_of(p))] > 0).any(1)
        silent_N = acts_NF[:, latent] == 0
        absorbed.append(silent_N[with_child_N].float().mean().item())
        alone.append(silent_N[(codes_NF[:, p] > 0) & ~with_child_N].float().mean().item())
    return {
        "absorption": sum(absorbed) / len(absorbed),
        "misses_alone": max(alone),
        "l0": (acts_NF > 0).float().sum(1).mean().item(),
    }


def test_matryoshka_absorbs_parents_less_than_batchtopk_at_the_same_l0():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threading overhead dominates
    try:
        results = {}
        for name, cfg in (
            ("batchtopk", BatchTopKConfig(d_sae=16, k=2)),
            ("matryoshka", MatryoshkaConfig(d_sae=16, k=2, group_sizes=[4, 12])),
        ):
            gen = HierarchicalFeatures(n_parents=2, children_per_parent=4, n_background=6, d=16, seed=0)
            sae, scale = train(cfg, gen, steps=500)
            results[name] = absorption(sae, scale, gen)
    finally:
        torch.set_num_threads(threads)
    bt, mt = results["batchtopk"], results["matryoshka"]
    assert abs(bt["l0"] - mt["l0"]) < 0.2, results  # the same sparsity (k=2, true mean L0 ~2.0)
    assert max(bt["misses_alone"], mt["misses_alone"]) < 0.05, results  # each found its parent latents
    assert bt["absorption"] > 0.3, results  # plain BatchTopK absorbs the parents into their children
    assert mt["absorption"] < bt["absorption"] - 0.25, results
