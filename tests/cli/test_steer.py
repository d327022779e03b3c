"""sae-steer: add moves the next-token distribution toward the latent's promoted tokens; clamp and ablate
change exactly one latent's contribution through the spliced SAE; sampling is reproducible."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sae_pipeline import layout
from sae_pipeline.errors import UserError
from sae_pipeline.interpret.logit_lens import top_logit_tokens
from sae_pipeline.interpret.steering import FromPosition, generate, intervention, prompt_ids
from sae_pipeline.model.activations import capture, splice
from sae_pipeline.runs import load_all
from sae_pipeline.steer import run
from tests import helpers
from tests.helpers import make_sae_run


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    run_dir = make_sae_run(tmp_path_factory.mktemp("steer"))
    return (run_dir, *load_all(str(run_dir), "cpu"))


def steer_cfg(run_dir: Path, *extra: str):
    return helpers.compose_config(
        "steer", [f"sae_path={run_dir}", "steer.device=cpu", "steer.max_new_tokens=6", *extra]
    )


def _ids(tokenizer, manifest, text="the king hath"):
    return prompt_ids(tokenizer, text, manifest["bos"]["token_id"], "cpu")


def _next_logits(model, hook, ids, fn=None):
    with torch.no_grad():
        if fn is None:
            return model(ids).logits[0, -1]
        with splice(model, hook, FromPosition(fn, 1)):
            return model(ids).logits[0, -1]


def test_large_add_promotes_the_latents_tokens(loaded):
    _, _, spec, model, tok, sae, hook = loaded
    ids = _ids(tok, spec.manifest)
    base = _next_logits(model, hook, ids)
    for f in (0, 7, 30):
        (up,), *_ = top_logit_tokens(model, sae.W_dec_FD[[f]], 1)
        token = int(up[0])
        steered = _next_logits(model, hook, ids, intervention(sae, "add", f, 200.0))
        rank = lambda logits, t=token: int((logits > logits[t]).sum())  # noqa: E731
        assert rank(steered) < rank(base) or rank(base) == 0
        assert rank(steered) <= 2, f"latent {f}: its top promoted token should lead after a large push"
        assert steered.log_softmax(-1)[token] > base.log_softmax(-1)[token]


def test_ablate_and_clamp_change_only_that_latent(loaded):
    _, _, spec, model, tok, sae, hook = loaded
    ids = _ids(tok, spec.manifest)
    x_TD = capture(model, ids, None, [hook])[hook.name][0]
    acts_TF = sae.encode(x_TD).detach()
    f = int(acts_TF[1:].gt(0).sum(0).argmax())  # a latent active on the prompt
    assert acts_TF[1:, f].gt(0).any()
    error_TD = x_TD - sae.decode(acts_TF)
    for mode, value in (("ablate", 0.0), ("clamp", 3.5)):
        with splice(model, hook, FromPosition(intervention(sae, mode, f, value), 1)):
            spliced_TD = capture(model, ids, None, [hook])[hook.name][0]
        assert torch.equal(spliced_TD[0], x_TD[0]), "the BOS position is left alone"
        # hand computation: reconstruction with latent f set to the value, plus the SAE's error term
        edited_TF = acts_TF.clone()
        edited_TF[:, f] = value
        want_TD = sae.decode(edited_TF).detach() + error_TD
        assert torch.allclose(spliced_TD[1:], want_TD[1:], atol=1e-5)
        # the change lies along W_dec[f] alone, with coefficient value - a_f
        delta_TD = spliced_TD[1:] - x_TD[1:]
        coef_T = value - acts_TF[1:, f]
        assert torch.allclose(delta_TD, coef_T[:, None] * sae.W_dec_FD[f].detach(), atol=1e-5)


def test_add_uses_the_unit_direction_or_the_raw_row(loaded):
    *_, sae, _ = loaded
    with torch.no_grad():
        sae.W_dec_FD[4] *= 3.0  # a row whose norm is not 1
    try:
        x = torch.randn(2, 5, sae.d_in)
        row = sae.W_dec_FD[4].detach()
        unit = intervention(sae, "add", 4, 2.0)(x) - x
        raw = intervention(sae, "add", 4, 2.0, unit_direction=False)(x) - x
        assert torch.allclose(unit, (2.0 * row / row.norm()).expand_as(x), atol=1e-6)
        assert torch.allclose(unit.norm(dim=-1), torch.full((2, 5), 2.0))
        assert torch.allclose(raw, (2.0 * row).expand_as(x), atol=1e-6)
        # FromPosition leaves earlier positions alone, also across KV-cached calls
        steer = FromPosition(intervention(sae, "add", 4, 2.0), 3)
        first, second = steer(x[:, :2]), steer(x[:, 2:])
        assert torch.equal(first, x[:, :2]) and torch.equal(second[:, 0], x[:, 2])
        assert torch.allclose(second[:, 1:] - x[:, 3:], unit[:, 3:])
    finally:
        with torch.no_grad():
            sae.W_dec_FD[4] /= 3.0


def test_same_seed_same_baseline_and_sampling_differs_by_seed(loaded):
    _, _, spec, model, tok, sae, hook = loaded
    ids = _ids(tok, spec.manifest)
    a, _ = generate(model, ids, 12, 1.5, seed=3, eos_id=None)
    b, _ = generate(model, ids, 12, 1.5, seed=3, eos_id=None)
    c, _ = generate(model, ids, 12, 1.5, seed=4, eos_id=None)
    assert a == b and len(a) == 12 and a != c
    greedy, first_V = generate(model, ids, 4, 0.0, seed=0, eos_id=None)
    assert greedy[0] == int(first_V.argmax())
    # the KV-cached loop equals recomputing the full sequence each step
    full = ids
    for _ in range(4):
        nxt = model(full).logits[0, -1].argmax()
        full = torch.cat([full, nxt.view(1, 1)], dim=1)
    assert full[0, ids.shape[1] :].tolist() == greedy


def test_run_writes_report(loaded, tmp_path, capsys):
    run_dir = loaded[0]
    out = run(
        steer_cfg(
            run_dir,
            "steer.prompts=[the king,thou art]",
            "steer.latents=[0,9]",
            "steer.scales=[50.0]",
            "steer.temperature=0.9",
            f"steer.out_dir={tmp_path}",
        )
    )
    report = json.loads(out.read_text())
    assert [r["prompt"] for r in report["results"]] == ["the king", "thou art"]
    first = report["results"][0]
    assert [s["latent"] for s in first["steered"]] == [0, 9]
    assert all(len(s["tokens"]) == 6 or s["tokens"][-1] == 2 for s in first["steered"])
    assert first["steered"][0]["kl_next_token"] > 0
    assert set(first["prompt_max_act"]) == {"0", "9"} and all(
        v >= 0 for v in first["prompt_max_act"].values()
    )
    assert set(report["latents"]) == {"0", "9"} and len(report["latents"]["0"]["promoted"]) == 10
    printed = capsys.readouterr().out
    assert "--- baseline" in printed and "--- add latent 9 x 50 (unit direction)" in printed
    # the same seed gives the same baseline run to run
    again = json.loads(run(steer_cfg(run_dir, "steer.prompts=[the king]", "steer.latents=[0]",
                                     "steer.scales=[50.0]", "steer.temperature=0.9",
                                     f"steer.out_dir={tmp_path / 'again'}")).read_text())  # fmt: skip
    assert again["results"][0]["baseline"]["tokens"] == first["baseline"]["tokens"]


def test_bad_latent_is_a_user_error(loaded):
    with pytest.raises(UserError, match="steer.latents"):
        run(steer_cfg(loaded[0], "steer.latents=[999]"))
    with pytest.raises(UserError, match="steer.mode"):
        run(steer_cfg(loaded[0], "steer.mode=boost"))


def test_cli_ablate(loaded):
    run_dir = loaded[0]
    result = helpers.run_cli(
        "steer",
        [
            f"sae_path={run_dir}",
            "steer.mode=ablate",
            "steer.latents=[3]",
            "steer.max_new_tokens=4",
            "steer.device=cpu",
        ],
        cwd=run_dir.parent,
    )
    assert result.returncode == 0, result.stderr
    assert "--- ablate latent 3" in result.stdout
    report = json.loads((run_dir / layout.STEER / layout.STEER_JSON).read_text())
    assert report["mode"] == "ablate" and report["results"][0]["steered"][0]["value"] == 0.0
