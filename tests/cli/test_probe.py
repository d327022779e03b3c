"""sae-probe: a label that is a known function of the text (a planted character) must be found.

The ground truth is the construction: a document is labelled `planted` exactly when an upper-case Z (a
character the other documents never contain) was inserted into it, and one SAE latent is built to fire
exactly on Z tokens (checked on separate text before it is used). So the dense baseline and the 1-sparse
probe on max-pooled latents must be near-perfect, and the difference-of-means ranking must pick that latent.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_pipeline import layout
from sae_pipeline.interpret.probe_tasks import IGNORE, speaker_char_labels, token_labels
from sae_pipeline.interpret.probing import auroc
from sae_pipeline.model.activations import capture
from sae_pipeline.model.hook_points import resolve_hook
from sae_pipeline.model.loading import load_model
from sae_pipeline.runs import single_target
from sae_pipeline.sae import read_sae, save_sae
from tests.helpers import compose_config, make_sae_run, run_cli, tiny_tokenizer

WORDS = ["the", "king", "queen", "crown", "love", "night", "day", "hath"]
DETECTOR = 40  # the latent made to fire on Z


def _texts(n: int, seed: int) -> tuple[list[str], list[int]]:
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        t = " ".join(rng.choice(WORDS) for _ in range(6))[:28]
        if i % 2:
            p = rng.randrange(len(t) + 1)
            t = t[:p] + "Z" + t[p:]
        texts.append(t)
        labels.append(i % 2)
    return texts, labels


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A tiny model and store, an SAE whose latent DETECTOR fires exactly on Z, and a labelled JSONL file."""
    tmp = tmp_path_factory.mktemp("probe")
    run_dir = make_sae_run(tmp)
    target, spec = single_target(str(run_dir))
    sae = read_sae(target.sae_dir)
    model, tok = load_model(spec.model_cfg, "cpu")
    hook = resolve_hook(model, spec.hook_name)

    def acts(texts):
        ids = [[tok.bos_token_id, *tok(t, add_special_tokens=False)["input_ids"]] for t in texts]
        T = max(map(len, ids))
        ids_NT = torch.tensor([r + [tok.pad_token_id] * (T - len(r)) for r in ids])
        att_NT = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in ids])
        x = capture(model, ids_NT, att_NT, [hook])[hook.name]
        keep = att_NT.bool() & (ids_NT != tok.bos_token_id)
        return x[keep], ids_NT[keep] == tok.convert_tokens_to_ids("Z")

    x, is_z = acts(_texts(60, seed=100)[0])  # text the probe never sees
    w = x[is_z].mean(0) - x[~is_z].mean(0)
    w = w / w.norm()
    proj = (x - sae.b_dec_D.detach()) @ w
    lo, hi = proj[~is_z].max(), proj[is_z].min()
    assert lo < hi, "Z tokens are not linearly separable at this hook; the construction needs another hook"
    scale = 20.0 / float(hi - lo)  # a Z token gives about 10 or more, other tokens 0
    with torch.no_grad():
        sae.W_enc_DF[:, DETECTOR] = w * scale
        sae.b_enc_F[DETECTOR] = -scale * (lo + hi) / 2
    x2, z2 = acts(_texts(40, seed=200)[0])
    fires = sae.encode(x2)[:, DETECTOR] > 0
    assert torch.equal(fires, z2), "the detector latent does not fire exactly on Z on fresh text"
    save_sae(sae, target.sae_dir, extra=spec.meta)

    texts, labels = _texts(120, seed=1)
    data = tmp / "planted.jsonl"
    with open(data, "w") as f:
        for t, y in zip(texts, labels, strict=True):
            f.write(json.dumps({"text": t, "label": ["plain", "planted"][y]}) + "\n")
    return run_dir, data


def _overrides(run_dir: Path, data: Path) -> list[str]:
    return [
        f"sae_path={run_dir}",
        f"paths.root={run_dir.parent / 'runs'}",
        "probe_task=files",
        f"probe.data_files={data}",
        "probe.device=cpu",
        "probe.ks=[1,3]",
        "probe.Cs=[0.1,1.0,10.0]",
        "probe.n_bootstrap=200",
        "logger=none",
    ]


def test_cli_probes_a_planted_token_and_picks_its_latent(planted):
    run_dir, data = planted
    proc = run_cli("probe", _overrides(run_dir, data), cwd=run_dir.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = run_dir / layout.PROBE / "files"
    report = json.loads((out / layout.METRICS).read_text())
    assert (out / layout.PROBE_PLOT).stat().st_size > 0
    assert "| max | SAE, k=1 | 1 |" in (out / layout.PROBE_TABLE_MD).read_text()
    # whole rows are the documents; 30% of each class is held out: 18 + 18 of 60 + 60
    assert report["splits"]["test"] == {
        "examples": 36,
        "documents": 36,
        "per_class": {"plain": 18, "planted": 18},
    }
    assert report["splits"]["train"]["examples"] == 84
    assert not set(report["documents"]["train"]) & set(report["documents"]["test"])
    res = report["results"]
    for pool in ("mean", "max"):
        assert res[pool]["dense"]["balanced_accuracy"] >= 0.95, (pool, res[pool]["dense"])
    k1 = res["max"]["sae_k"]["1"]
    assert k1["latents"] == [DETECTOR]
    assert k1["balanced_accuracy"] >= 0.97 and k1["auroc"] >= 0.99
    assert res["mean"]["sae_k"]["1"]["latents"] == [DETECTOR]
    for pool in res.values():  # every interval holds its point estimate
        for e in [pool["dense"], pool["sae_all"], *pool["sae_k"].values()]:
            for m in ("accuracy", "balanced_accuracy", "auroc"):
                lo, hi = e[f"{m}_ci"]
                assert lo <= e[m] <= hi, (m, e)


def test_a_label_unrelated_to_the_text_stays_near_chance(planted, tmp_path):
    """Shuffled labels: the same pipeline finds nothing, so a good score above cannot come from leakage."""
    run_dir, data = planted
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rng = random.Random(5)
    labels = [r["label"] for r in rows]
    rng.shuffle(labels)
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text(
        "".join(json.dumps({**r, "label": y}) + "\n" for r, y in zip(rows, labels, strict=True))
    )
    from sae_pipeline import probe

    out = tmp_path / "out"
    # weak regularisation: a probe that saw probe-test while fitting would score far above chance here
    over = [*_overrides(run_dir, shuffled), f"probe.out_dir={out}", "probe.ks=[1]", "probe.Cs=[1000.0]"]
    cfg = compose_config("probe", over)
    report = probe.run(cfg)[run_dir.name]
    for pool in report["results"].values():
        for e in (pool["dense"], pool["sae_all"], pool["sae_k"]["1"]):  # 36 test rows: chance is 0.5 +- 0.08
            assert e["balanced_accuracy"] < 0.72 and e["balanced_accuracy_ci"][0] < 0.56, e


def test_speaker_labels_follow_the_markdown():
    doc = "## ACT I\n\n**KING**  \nthe crown, _Aside_ hath\n\n_Exit KING_\n"
    labels = speaker_char_labels(doc)
    spans = {1: "**KING**", 0: "the crown, hath"}
    got = {y: "".join(c for c, lab in zip(doc, labels, strict=True) if lab == y) for y in (0, 1)}
    assert got[1] == spans[1]
    assert got[0] == spans[0].replace(" ", "")  # whitespace carries no label
    assert all(lab == IGNORE for c, lab in zip(doc, labels, strict=True) if c in "#_AEx")
    # a token spanning a heading and spoken text (or only whitespace) is left out
    assert token_labels([1, 1, IGNORE, 0], [(0, 2), (1, 4), (2, 3)]) == [1, IGNORE, IGNORE]
    enc = tiny_tokenizer()(doc, add_special_tokens=False, return_offsets_mapping=True)
    tl = token_labels(labels, enc["offset_mapping"])
    assert tl.count(1) == len("**KING**") and tl.count(0) == len("thecrown,hath")


def test_auroc_matches_the_pairwise_definition():
    """AUROC = P(score of a random positive > score of a random negative) + half the ties."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 50)
    P = rng.random((50, 3)).round(1)  # rounding makes ties
    want = []
    for c in range(3):
        pos, neg = P[y == c, c], P[y != c, c]
        want.append(np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg]))
    assert auroc(y, P) == pytest.approx(np.mean(want))
    y2 = (y == 1).astype(int)
    P2 = np.stack([1 - P[:, 1], P[:, 1]], 1)
    pos, neg = P2[y2 == 1, 1], P2[y2 == 0, 1]
    assert auroc(y2, P2) == pytest.approx(np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg]))


def test_a_sweep_folder_probes_every_run(planted, tmp_path):
    """Two runs under one folder: each gets its own report; the same SAE twice gives the same numbers."""
    import shutil

    from sae_pipeline import probe

    run_dir, data = planted
    sweep = tmp_path / "sweep"
    for name in ("a", "b"):
        shutil.copytree(run_dir, sweep / name, ignore=shutil.ignore_patterns(layout.PROBE))
    cfg = compose_config("probe", [*_overrides(sweep, data), "probe.ks=[1]", "probe.n_bootstrap=20"])
    reports = probe.run(cfg)
    assert sorted(reports) == ["a", "b"]
    for name in ("a", "b"):
        assert (sweep / name / layout.PROBE / "files" / layout.METRICS).is_file()
    assert reports["a"]["results"] == reports["b"]["results"]
