"""Masked language models (ESM-2-like protein LMs): load, capture, harvest, train and probe offline.

A tiny random EsmForMaskedLM with an amino-acid vocabulary written here, and random protein-like
sequences. The label of the probing task is a fact of the sequence: whether the motif WWW (tryptophan
is otherwise absent) was planted in it, so the dense probe must find it well above chance.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import EsmConfig, EsmForMaskedLM, EsmTokenizer

from sae_pipeline import harvest, layout, probe, train
from sae_pipeline.data.store import read_manifest
from sae_pipeline.model.activations import capture
from sae_pipeline.model.hook_points import resolve_hook
from sae_pipeline.model.loading import load_model
from tests.helpers import compose_config

SPECIALS = ["<cls>", "<pad>", "<eos>", "<unk>"]
AMINO = list("LAGVSERTIDPKQNFYMHWC")
BACKGROUND = [a for a in AMINO if a != "W"]


def _esm(folder: Path) -> Path:
    vocab = folder / "vocab.txt"
    folder.mkdir(parents=True, exist_ok=True)
    vocab.write_text("\n".join([*SPECIALS, *AMINO, "<mask>"]) + "\n")
    tok = EsmTokenizer(str(vocab))
    cfg = EsmConfig(
        vocab_size=len(SPECIALS) + len(AMINO) + 1,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=80,
        pad_token_id=tok.pad_token_id,
        mask_token_id=tok.mask_token_id,
        position_embedding_type="rotary",
    )
    torch.manual_seed(0)
    EsmForMaskedLM(cfg).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _proteins(path: Path, n: int, seed: int, plant: bool) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            seq = "".join(rng.choice(BACKGROUND) for _ in range(rng.randint(20, 28)))
            label = plant and i % 2 == 1
            if label:
                p = rng.randrange(len(seq))
                seq = seq[:p] + "WWW" + seq[p:]
            f.write(json.dumps({"title": f"p{i}", "text": seq, "label": "motif" if label else "none"}) + "\n")
    return path


@pytest.fixture(scope="module")
def esm_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("esm")
    model_dir = _esm(tmp / "model")
    corpus = _proteins(tmp / "proteins.jsonl", 80, seed=0, plant=False)
    hcfg = compose_config(
        "harvest",
        [f"paths.root={tmp / 'runs'}", f"model.name={model_dir}", "model.id=esm-tiny", "data.name=json",
         f"data.data_files={corpus}", "data.id=prot", "data.eval_documents=4", "hook.layer=0",
         "harvest.context_size=24", "harvest.batch_size=8", "harvest.n_tokens=1200", "harvest.shard_size=400",
         "harvest.device=cpu"],
    )  # fmt: skip
    (store,) = harvest.run(hcfg)
    tcfg = compose_config(
        "train",
        [f"paths.root={tmp / 'runs'}", f"store={store}", "train=tiny", "sae=relu", "sae.d_sae=64",
         f"train.run_dir={tmp / 'run'}", "logger=none"],
    )  # fmt: skip
    train.run(tcfg)
    return tmp, model_dir, store


def test_masked_lm_is_detected_and_capture_matches_a_full_forward(esm_run):
    _, model_dir, _ = esm_run
    model, tok = load_model({"name": str(model_dir)}, "cpu")
    assert type(model).__name__ == "EsmForMaskedLM"
    ids = tok(["MKTAYIAKQR", "LLGVSE"], padding=True, return_tensors="pt")
    hp = resolve_hook(model, "blocks.0.hook_resid_post")
    got = capture(model, ids["input_ids"], ids["attention_mask"], [hp])[hp.name]
    with torch.no_grad():
        want = model(**ids, output_hidden_states=True).hidden_states[1]  # output of layer 0
    assert (
        ids["input_ids"][0, 0] == tok.cls_token_id and ids["input_ids"].shape[1] == 12
    )  # per-residue tokens
    torch.testing.assert_close(got, want)


def test_masked_lm_harvest_records_the_cls_token_as_bos(esm_run):
    _, _, store = esm_run
    m = read_manifest(store)
    assert m["bos"]["prepended"] and m["bos"]["token_id"] == 0  # <cls> is id 0 in the vocabulary above
    assert m["d_in"] == 32 and m["n_tokens"] >= 1200


def test_masked_lm_probe_finds_a_planted_motif(esm_run):
    tmp, _, _ = esm_run
    data = _proteins(tmp / "labelled.jsonl", 160, seed=7, plant=True)
    cfg = compose_config(
        "probe",
        [f"sae_path={tmp / 'run'}", f"paths.root={tmp / 'runs'}", "probe_task=files", f"probe.data_files={data}",
         "probe.device=cpu", "probe.ks=[1,4]", "probe.Cs=[0.1,1.0,10.0]", "probe.n_bootstrap=100",
         "logger=none"],
    )  # fmt: skip
    report = probe.run(cfg)["run"]
    assert report["splits"]["test"]["examples"] == 48 and report["splits"]["train"]["examples"] == 112
    for pool in report["results"].values():  # a random 2-layer model at layer 0: clearly above chance
        assert pool["dense"]["balanced_accuracy"] >= 0.85 and pool["dense"]["balanced_accuracy_ci"][0] > 0.6
    assert (tmp / "run" / layout.PROBE / "files" / layout.METRICS).is_file()


def test_masked_lm_splice_scores_the_masked_tokens(esm_run):
    """Clean CE is the cross-entropy of the original tokens at the masked positions (no shift), and an SAE
    that reconstructs exactly (x = relu(x) - relu(-x)) recovers all of the loss."""
    from torch.nn.functional import cross_entropy

    from sae_pipeline.evaluation.splice import SpliceEvaluator
    from sae_pipeline.sae import CONFIG_CLASSES, build_sae

    _, model_dir, _ = esm_run
    model, tok = load_model({"name": str(model_dir)}, "cpu")
    gen = torch.Generator().manual_seed(3)
    ids_NT = torch.randint(len(SPECIALS), len(SPECIALS) + len(AMINO), (6, 20), generator=gen)
    ids_NT[:, 0] = tok.cls_token_id
    valid_NT = torch.ones_like(ids_NT, dtype=torch.bool)
    valid_NT[:, 0] = False
    hp = resolve_hook(model, "blocks.0.hook_resid_post")
    ev = SpliceEvaluator(model, hp, ids_NT, valid_NT, batch_size=4)
    score = ev.score_NT
    assert score.any(1).all() and not score[:, 0].any()  # >= 1 per context, never the CLS position
    assert 0.05 < score.float().mean() < 0.35
    assert (ev.input_ids_NT[score] == tok.mask_token_id).all()
    assert torch.equal(ev.input_ids_NT[~score], ids_NT[~score])

    d = 32
    sae = build_sae(CONFIG_CLASSES["relu"](d_sae=2 * d, normalize_input=False), d_in=d, seed=0)
    with torch.no_grad():
        eye = torch.eye(d)
        sae.W_enc_DF.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec_FD.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc_F.zero_()
        sae.b_dec_D.zero_()
    out = ev.evaluate(sae)
    with torch.no_grad():
        logits = model(input_ids=ev.input_ids_NT).logits
    want = cross_entropy(logits[score], ids_NT[score]).item()
    assert out["n_scored_positions"] == int(score.sum())
    assert out["ce_clean"] == pytest.approx(want, rel=1e-5)
    assert out["ce_sae"] == pytest.approx(out["ce_clean"], abs=1e-4)
    assert out["loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert out["ce_zero"] > out["ce_clean"]


def test_masked_lm_sae_eval_cli_runs(esm_run):
    from tests.helpers import run_cli

    tmp, _, _ = esm_run
    res = run_cli("eval", [f"sae_path={tmp / 'run'}", f"paths.root={tmp / 'runs'}", "eval.n_tokens=200",
                           "eval.device=cpu", "logger=none"], cwd=tmp)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    m = json.loads((tmp / "run" / layout.EVAL / layout.METRICS).read_text())
    assert 0 < m["ce_clean"] < 10 and m["n_scored_positions"] > 0
