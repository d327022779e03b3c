"""An SAE not trained here (a SAELens folder, a bare .safetensors file) evaluated, browsed and steered with
no store: model, hook and text come from the `source` group or the SAE's own cfg.json."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file, save_file

from sae_pipeline import evaluate as eval_stage
from sae_pipeline import features as features_stage
from sae_pipeline import layout
from sae_pipeline.errors import UserError
from sae_pipeline.interpret.browser import read_report
from sae_pipeline.sae import read_sae, write_saelens
from tests import helpers


@pytest.fixture(scope="module")
def outside(tmp_path_factory):
    """Our tiny run, the same SAE exported to a SAELens folder (its cfg.json names model and hook), and the
    same weights as a bare file (which names nothing)."""
    tmp = tmp_path_factory.mktemp("outside")
    run_dir = helpers.make_sae_run(tmp)
    store = json.loads((run_dir / layout.CONFIG).read_text())["store"]
    manifest = json.loads((tmp / store / layout.MANIFEST).read_text())
    meta = {"model_name": str(tmp / "model"), "hook_name": manifest["hook"]["name"],
            "context_size": manifest["context_size"], "prepend_bos": True}  # fmt: skip
    write_saelens(read_sae(run_dir), tmp / "saelens", meta)
    t = load_file(str(tmp / "saelens" / layout.SAELENS_WEIGHTS))
    save_file(t, str(tmp / "bare.safetensors"))
    corpus = tmp / "corpus.jsonl"  # the corpus harvest read (written by make_sae_run)
    return {"tmp": tmp, "run": run_dir, "corpus": corpus, "manifest": manifest}


def _data(o) -> str:
    return f"{{name:json,data_files:{o['corpus']},eval_documents:2}}"


def test_eval_of_a_saelens_folder_equals_eval_of_the_run_on_the_same_text(outside):
    o = outside
    common = [f"paths.root={o['tmp'] / 'runs'}", "eval.n_tokens=400", "eval.batch_size=4", "logger=none"]
    ours = eval_stage.run(
        helpers.compose_config("eval", [f"sae_path={o['run']}", f"eval.data={_data(o)}", *common])
    )["metrics"]
    theirs = eval_stage.run(
        helpers.compose_config(
            "eval", [f"sae_path={o['tmp'] / 'saelens'}", f"source.data={_data(o)}", *common]
        )
    )["metrics"]
    (m_ours,), (m_theirs,) = ours.values(), theirs.values()
    assert m_theirs["n_tokens"] == m_ours["n_tokens"] > 0
    for key in ("l0", "fvu", "ce_clean", "ce_sae", "loss_recovered", "kl"):
        assert m_theirs[key] == pytest.approx(m_ours[key], rel=1e-4, abs=1e-6), key
    assert m_theirs["hook"] == o["manifest"]["hook"]["name"]
    assert m_theirs["eval_data"]["source"] == "source.data held-out documents"
    assert (o["tmp"] / "saelens" / layout.EVAL / layout.METRICS).is_file()


def test_bare_file_needs_model_and_hook_named(outside):
    o = outside
    cfg = helpers.compose_config(
        "eval", [f"sae_path={o['tmp'] / 'bare.safetensors'}", f"source.data={_data(o)}", "logger=none"]
    )
    with pytest.raises(UserError, match="source.model=.*source.hook="):
        eval_stage.run(cfg)
    cfg = helpers.compose_config("eval", [f"sae_path={o['tmp'] / 'saelens'}", "logger=none"])
    with pytest.raises(UserError, match="source.data="):  # its cfg.json names no dataset
        eval_stage.run(cfg)


def test_features_and_steer_of_a_bare_file(outside):
    o = outside
    src = [f"source.model={o['tmp'] / 'model'}", f"source.hook={o['manifest']['hook']['name']}"]
    cfg = helpers.compose_config(
        "features",
        [f"sae_path={o['tmp'] / 'bare.safetensors'}", f"paths.root={o['tmp'] / 'runs'}", *src,
         f"source.data={_data(o)}", "source.context_size=32", "features.n_tokens=300", "features.top_k=3",
         "features.device=cpu", "features.max_latents=8"],
    )  # fmt: skip
    out = features_stage.run(cfg)
    assert out == o["tmp"] / "bare" / layout.FEATURES and (out / layout.FEATURES_HTML).is_file()
    report = read_report(out)
    assert report["text"]["source"] == "source.data held-out documents" and report["n_tokens"] > 0
    res = helpers.run_cli(
        "steer",
        [f"sae_path={o['tmp'] / 'bare.safetensors'}", *src, "steer.mode=ablate", "steer.latents=[0]",
         "steer.max_new_tokens=4", "steer.device=cpu"],
        cwd=o["tmp"],
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    steered = json.loads((o["tmp"] / "bare" / layout.STEER / layout.STEER_JSON).read_text())
    assert steered["hook"] == o["manifest"]["hook"]["name"] and steered["results"]


def test_bare_file_without_b_dec_in_the_encoder(outside):
    """A Gemma-Scope-style file (encoder reads x, not x - b_dec) evaluates like the run with
    source.apply_b_dec_to_input=false, and differently without it."""
    o = outside
    t = load_file(str(o["tmp"] / "saelens" / layout.SAELENS_WEIGHTS))
    t["b_dec"] = t["b_dec"] + 0.3 * t["W_dec"][0]  # a b_dec that matters (the run's is zero)
    save_file(t, str(o["tmp"] / "ref.safetensors"))
    t["b_enc"] = t["b_enc"] - t["b_dec"] @ t["W_enc"]  # (x - b_dec) @ W + b == x @ W + (b - b_dec @ W)
    save_file(t, str(o["tmp"] / "scope.safetensors"))
    common = [f"paths.root={o['tmp'] / 'runs'}", "eval.n_tokens=400", "eval.batch_size=4", "logger=none"]
    src = [f"source.model={o['tmp'] / 'model'}", f"source.hook={o['manifest']['hook']['name']}",
           f"source.data={_data(o)}", "source.context_size=32"]  # fmt: skip

    def metrics(path, *extra):
        cfg = helpers.compose_config("eval", [f"sae_path={path}", *src, *common, *extra])
        return next(iter(eval_stage.run(cfg)["metrics"].values()))

    ref = metrics(o["tmp"] / "ref.safetensors")
    right = metrics(o["tmp"] / "scope.safetensors", "source.apply_b_dec_to_input=false")
    wrong = metrics(o["tmp"] / "scope.safetensors")
    assert right["fvu"] == pytest.approx(ref["fvu"], rel=1e-4) and right["l0"] == pytest.approx(ref["l0"])
    assert wrong["fvu"] != pytest.approx(ref["fvu"], rel=1e-3)


def test_saelens_folder_naming_a_local_text_file_needs_no_source(outside):
    o = outside
    cfg = json.loads((o["tmp"] / "saelens" / layout.SAELENS_CONFIG).read_text())
    folder = o["tmp"] / "saelens_with_data"
    folder.mkdir()
    (folder / layout.SAELENS_CONFIG).write_text(json.dumps({**cfg, "dataset_path": str(o["corpus"])}))
    (folder / layout.SAELENS_WEIGHTS).write_bytes(
        (o["tmp"] / "saelens" / layout.SAELENS_WEIGHTS).read_bytes()
    )
    run = eval_stage.run(
        helpers.compose_config(
            "eval", [f"sae_path={folder}", "eval.n_tokens=200", "eval.batch_size=4", "logger=none"]
        )
    )
    (m,) = run["metrics"].values()
    assert m["eval_data"]["data"]["name"] == "json" and m["eval_data"]["data"]["data_files"] == str(
        o["corpus"]
    )
    assert m["n_tokens"] >= 200
