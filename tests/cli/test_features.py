"""sae-features: one streaming pass gives the same top contexts, densities and histograms as brute force."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sae_pipeline import layout
from sae_pipeline.data import text
from sae_pipeline.errors import UserError
from sae_pipeline.features import run
from sae_pipeline.interpret.browser import read_report
from sae_pipeline.interpret.feature_stats import collect
from sae_pipeline.interpret.logit_lens import final_norm_scale, top_logit_tokens
from sae_pipeline.runs import load_all
from tests import helpers
from tests.helpers import D_SAE, DEAD, features_cfg, make_sae_run


@pytest.fixture(scope="module")
def sae_run(tmp_path_factory) -> Path:
    return make_sae_run(tmp_path_factory.mktemp("features"))


def brute_force(run_dir: Path, n_tokens: int):
    """Every activation of every held-out token, encoded at once."""
    target, spec, model, tok, sae, hook = load_all(str(run_dir), "cpu")
    ids_NT, mask_NT = text.heldout_contexts(spec.manifest, tok, n_tokens)
    with torch.no_grad():
        out = model(ids_NT, output_hidden_states=True)
        x_NTD = out.hidden_states[hook.layer + 1]  # resid_post of block L
        acts_NTF = sae.encode(x_NTD.reshape(-1, x_NTD.shape[-1])).reshape(*ids_NT.shape, -1)
    return acts_NTF * mask_NT[..., None], mask_NT, ids_NT, model, sae


def test_streaming_stats_match_brute_force(sae_run):
    cfg = features_cfg(sae_run)
    acts_NTF, mask_NT, ids_NT, model, sae = brute_force(sae_run, 600)
    _, _, _, _, _, hook = load_all(str(sae_run), "cpu")
    stats = collect(model, hook, sae, ids_NT, mask_NT, torch.arange(D_SAE), cfg.features)
    n_valid = int(mask_NT.sum())
    assert stats.n_tokens == n_valid
    fires_F = (acts_NTF > 0).sum((0, 1))
    assert torch.equal(stats.count_F, fires_F)
    assert all(stats.count_F[f] == 0 for f in DEAD)
    assert torch.allclose(stats.max_F, acts_NTF.amax((0, 1)))

    k, T = cfg.features.top_k, ids_NT.shape[1]
    before, after = cfg.features.window_before, cfg.features.window_after
    peak_NF = acts_NTF.amax(dim=1)
    top_val_Fk, top_tok_Fk, top_win_FkW = stats.sorted_top()  # each context's peak per latent
    for f in range(D_SAE):
        # the k contexts with the largest peaks (as a set of values: near-ties may swap between batchings)
        want = peak_NF[:, f].sort(descending=True).values[:k]
        want = want[want > 0]
        n = len(want)
        assert (top_val_Fk[f, n:] == -1).all(), f"latent {f}: slots beyond the firing contexts stay empty"
        assert torch.allclose(top_val_Fk[f, :n], want, atol=1e-5), f"latent {f}"
        ctxs = [int(t) // T for t in top_tok_Fk[f, :n]]
        assert len(set(ctxs)) == n, "a context appears at most once per latent"
        for j, c in enumerate(ctxs):
            p = int(top_tok_Fk[f, j]) % T
            assert torch.isclose(acts_NTF[c, p, f], peak_NF[c, f], atol=1e-5), (
                "the window is centred on the peak"
            )
            assert torch.isclose(top_val_Fk[f, j], peak_NF[c, f], atol=1e-5)
            padded = torch.nn.functional.pad(acts_NTF[c, :, f], (before, after))
            assert torch.allclose(top_win_FkW[f, j], padded[p : p + before + after + 1], atol=1e-5)
        # the histogram holds every firing, exactly binned
        width = 2.0 ** int(stats.exp_F[f]) / stats.n_bins
        vals = acts_NTF[..., f][acts_NTF[..., f] > 0].double()
        want_hist = torch.bincount(
            (vals / width).floor().long().clamp(max=stats.n_bins - 1), minlength=stats.n_bins
        )
        assert torch.equal(stats.hist_Fb[f], want_hist), f"latent {f}"
        if len(vals):
            assert vals.max() <= 2.0 ** int(stats.exp_F[f]) < 2 * vals.max()
        # the uniform sample holds distinct firing positions with their true activations and windows,
        # and every firing when there are no more of them than its size
        kept = [(int(t), j) for j, t in enumerate(stats.res_tok_Fr[f]) if t >= 0]
        firing = {int(c) * T + int(p) for c, p in (acts_NTF[..., f] > 0).nonzero().tolist()}
        assert len({t for t, _ in kept}) == len(kept) == min(len(firing), stats.r)
        assert {t for t, _ in kept} <= firing
        for t, j in kept:
            c, p = divmod(t, T)
            assert torch.isclose(stats.res_val_Fr[f, j], acts_NTF[c, p, f])
            padded = torch.nn.functional.pad(acts_NTF[c, :, f], (before, after))
            assert torch.allclose(stats.res_win_FrW[f, j], padded[p : p + before + after + 1], atol=1e-5)


def test_small_uniform_sample_and_top_k_stay_consistent(sae_run):
    """Sizes below a batch's firings exercise the in-batch ranking as well as the cross-batch merge."""
    cfg = features_cfg(sae_run, "features.advanced.reservoir=4", "features.top_k=2", "features.batch_size=7")
    acts_NTF, mask_NT, ids_NT, model, sae = brute_force(sae_run, 600)
    _, _, _, _, _, hook = load_all(str(sae_run), "cpu")
    stats = collect(model, hook, sae, ids_NT, mask_NT, torch.arange(D_SAE), cfg.features)
    T = ids_NT.shape[1]
    top_val_Fk, _, _ = stats.sorted_top()
    for f in range(D_SAE):
        firing = {int(c) * T + int(p) for c, p in (acts_NTF[..., f] > 0).nonzero().tolist()}
        kept = [int(t) for t in stats.res_tok_Fr[f] if t >= 0]
        assert len(set(kept)) == len(kept) == min(len(firing), 4) and set(kept) <= firing
        want = acts_NTF[..., f].amax(1).sort(descending=True).values[:2]
        want = want[want > 0]
        assert torch.allclose(top_val_Fk[f, : len(want)], want, atol=1e-5)


def test_promoted_tokens_match_hand_computation(sae_run):
    _, _, model, _, sae, _ = load_all(str(sae_run), "cpu")
    g_D = model.model.norm.weight.detach()
    assert not torch.allclose(g_D, torch.ones_like(g_D))
    assert torch.equal(final_norm_scale(model), g_D)
    up_i, up_v, down_i, down_v = top_logit_tokens(model, sae.W_dec_FD, 10, chunk=7)
    logits_FV = (sae.W_dec_FD.detach() * g_D) @ model.lm_head.weight.detach().T
    for f in range(D_SAE):
        order = logits_FV[f].argsort(descending=True)
        assert up_i[f].tolist() == order[:10].tolist()
        assert down_i[f].tolist() == order.flip(0)[:10].tolist()
        assert torch.allclose(up_v[f], logits_FV[f, order[:10]], atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_logit_lens_finds_each_familys_final_norm(family):
    from tests.support.tiny_models import TINY_MODELS

    model = TINY_MODELS[family]()
    norm = model.transformer.ln_f if family == "gpt2" else model.gpt_neox.final_layer_norm
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
    assert torch.equal(final_norm_scale(model), norm.weight)
    W_dec_FD = torch.randn(6, model.config.hidden_size)
    up_i, *_ = top_logit_tokens(model, W_dec_FD, 3)
    want = ((W_dec_FD * norm.weight) @ model.get_output_embeddings().weight.T).topk(3, dim=1).indices
    assert torch.equal(up_i, want)
    assert top_logit_tokens(model, torch.randn(2, 7), 3) is None  # not in the residual stream: no lens


def test_run_writes_report(sae_run, tmp_path):
    out = run(features_cfg(sae_run, f"features.out_dir={tmp_path / 'f'}", "features.n_weak=3"))
    report = read_report(out)
    assert len(report["latents"]) == D_SAE and report["n_dead"] == len(DEAD)
    by_id = {r["id"]: r for r in report["latents"]}
    assert all(by_id[f]["dead"] and not by_id[f]["top"] for f in DEAD)
    live = by_id[0]
    assert len(live["top"]) == 5 and len(live["weak"]) == 3
    assert live["weak"][0]["act"] < live["top"][-1]["act"]
    for ex in live["top"] + live["weak"]:
        assert ex["acts"][ex["peak"]] == ex["act"] and len(ex["toks"]) == len(ex["acts"])
        assert all(str(t) in report["tokens"] for t in ex["toks"])
    assert len(live["promoted"]) == 10 and sum(live["hist"]["counts"]) == live["count"]
    html = (out / layout.FEATURES_HTML).read_text()
    assert (
        layout.FEATURES_DATA_JS in html
        and "fetch(" not in html
        and "http" not in html.replace("http://www.w3.org/2000/svg", "")
    )


def test_cli_writes_json_and_html(sae_run):
    result = helpers.run_cli(
        "features",
        [f"sae_path={sae_run}", "features.n_tokens=300", "features.max_latents=10", "features.device=cpu"],
        cwd=sae_run.parent,
    )
    assert result.returncode == 0, result.stderr
    out = sae_run / layout.FEATURES
    report = read_report(out)
    assert [r["id"] for r in report["latents"]] == list(range(10))
    assert (out / layout.FEATURES_HTML).is_file() and (out / layout.FEATURES_DATA_JS).is_file()


def test_bad_settings_are_user_errors(sae_run, tmp_path):
    with pytest.raises(UserError, match="sae_path"):
        run(features_cfg(tmp_path / "nope"))
    with pytest.raises(UserError, match="features.latents"):
        run(features_cfg(sae_run, f"features.latents=[0,{D_SAE}]"))
    with pytest.raises(UserError, match="features.top_k"):
        run(features_cfg(sae_run, "features.top_k=0"))
