"""The Python API: the README's notebook example runs as written (on a tiny model), and SAE methods take any
leading shape."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import sae_pipeline
from sae_pipeline.api import _override_list
from sae_pipeline.errors import UserError
from sae_pipeline.sae import CONFIG_CLASSES, build_sae
from tests import helpers

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "notebook_api.py"
D, F_ = 6, 24


def random_sae(arch: str):
    kwargs = {"k": 3} if arch in ("topk", "batchtopk", "matryoshka") else {}
    sae = build_sae(CONFIG_CLASSES[arch](d_sae=F_, **kwargs), D, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        sae.b_enc_F.copy_(torch.randn(F_, generator=g) * 0.5)
        if arch in ("batchtopk", "matryoshka"):
            sae.threshold.fill_(0.8)
    return sae.eval()


@pytest.mark.parametrize("arch", sorted(CONFIG_CLASSES))
def test_any_leading_shape_and_sparse_code(arch):
    sae = random_sae(arch)
    x = torch.randn(2, 3, 5, D, generator=torch.Generator().manual_seed(2)) * 2
    rows = x.reshape(-1, D)
    with torch.no_grad():
        acts = sae.encode(x)
        assert acts.shape == (2, 3, 5, F_)
        torch.testing.assert_close(acts, sae.encode(rows).reshape(2, 3, 5, F_))
        assert 0 < (acts > 0).float().mean() < 1
        torch.testing.assert_close(sae.decode(acts), sae.decode(acts.reshape(-1, F_)).reshape(x.shape))
        torch.testing.assert_close(sae(x), sae(rows).reshape(x.shape))
        torch.testing.assert_close(sae.encode(x[0, 0, 0]), sae.encode(rows[:1])[0])  # one vector [D]
        idx, vals = sae.encode_sparse(x)
        assert idx.shape == vals.shape and idx.shape[:3] == (2, 3, 5)
        # the sparse code is the dense code: scattering it back gives encode(x) exactly
        dense = torch.zeros_like(acts).scatter_add(-1, idx, vals)
        torch.testing.assert_close(dense, acts)


def test_override_dicts_become_command_line_overrides():
    got = _override_list({"hook.layer": 3, "sae.k": 8, "logger.wandb": False, "x": None, "l": [1, 2]})
    assert got == ["hook.layer=3", "sae.k=8", "logger.wandb=false", "x=null", "l=[1, 2]"]
    assert _override_list(["a=1"]) == ["a=1"] and _override_list(None) == []


def test_top_level_names_are_the_api_and_stage_modules_stay_importable():
    from sae_pipeline import harvest  # the stage module, not shadowed by the API

    assert callable(harvest.run) and sae_pipeline.load_sae is sae_pipeline.api.load_sae
    with pytest.raises(AttributeError):
        sae_pipeline.no_such_name  # noqa: B018


def _replace_line(text: str, prefix: str, new: str) -> str:
    lines = text.splitlines()
    hits = [i for i, line in enumerate(lines) if line.startswith(prefix)]
    assert len(hits) == 1, f"the example must have exactly one line starting with {prefix!r}"
    lines[hits[0]] = new
    return "\n".join(lines) + "\n"


def test_readme_example_runs(tmp_path, capsys):
    """Runs examples/notebook_api.py (the README's snippet) with only its two settings lines swapped for a
    tiny model and a seconds-long training run."""
    model_dir = helpers.save_tiny_model(tmp_path / "model")
    corpus = helpers.write_corpus(tmp_path / "corpus.jsonl", n_docs=8, words_per_doc=200)
    harvest = helpers.tiny_overrides(tmp_path, model_dir, corpus)
    train = [
        f"paths.root={tmp_path / 'runs'}",
        "sae=topk",
        "sae.k=4",
        "train=tiny",
        "train.val_tokens=31",
        "logger=none",
    ]
    text = _replace_line(EXAMPLE.read_text(), "harvest_settings = ", f"harvest_settings = {harvest!r}")
    text = _replace_line(text, "train_settings = ", f"train_settings = {train!r}")
    ns: dict = {}
    exec(compile(text, str(EXAMPLE), "exec"), ns)  # noqa: S102
    assert "loss recovered" in capsys.readouterr().out
    sae, model, ids, hook = ns["sae"], ns["model"], ns["ids"], ns["hook"]
    assert hook == "blocks.1.hook_resid_post" and ns["run_dir"].parent == tmp_path / "runs" / "train"
    assert ns["metrics"]["n_tokens"] > 0 and 0 < ns["metrics"]["l0"] <= 4
    T = ids.shape[1]
    assert ns["x"].shape == (1, T, sae.d_in) and ns["latents"].shape == (1, T, sae.d_sae)
    assert ns["idx"].shape[:2] == (1, T) and ns["idx"].shape[2] <= 4
    with torch.no_grad():
        assert not torch.allclose(ns["spliced"], ns["clean"], atol=1e-4)
        assert not torch.allclose(ns["steered"], ns["clean"], atol=1e-4)
        assert not torch.allclose(ns["ablated"], ns["clean"], atol=1e-5)
        # the error term alone restores the clean model exactly; the SAE's own output is what was spliced
        with sae_pipeline.splice_sae(model, sae, error_term=True):
            torch.testing.assert_close(model(ids).logits, ns["clean"], rtol=1e-4, atol=1e-4)
        # as sae-eval: ids start with BOS, whose position keeps its clean activation; every other is the SAE's
        assert ids[0, 0] == model.config.bos_token_id and ids[0, 1] != model.config.bos_token_id
        with sae_pipeline.capture_activations(model, [hook]) as acts, sae_pipeline.splice_sae(model, sae):
            model(ids)
        torch.testing.assert_close(acts[hook][:, 0], ns["x"][:, 0], rtol=0, atol=0)
        torch.testing.assert_close(acts[hook][:, 1:], sae(ns["x"])[:, 1:], rtol=1e-5, atol=1e-5)
        with sae_pipeline.capture_activations(model, [hook]) as acts:
            with sae_pipeline.splice_sae(model, sae, skip_bos=False):
                model(ids)
        torch.testing.assert_close(acts[hook], sae(ns["x"]), rtol=1e-5, atol=1e-5)
    sae.meta = {}
    with pytest.raises(UserError, match="pass hook="):
        with sae_pipeline.splice_sae(model, sae):
            pass


README_MARKER = "<!-- examples/notebook_api.py: tests/unit/test_api.py runs this block -->"


def test_readme_block_is_the_tested_example():
    """Once the README carries the example (after README_MARKER), it must be exactly the file the test runs."""
    readme = (EXAMPLE.parents[1] / "README.md").read_text()
    if README_MARKER not in readme:
        pytest.skip("the README does not carry the notebook example yet")
    block = readme.split(README_MARKER, 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert block == EXAMPLE.read_text()
