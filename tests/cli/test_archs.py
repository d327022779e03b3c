"""sae=matryoshka and sae=tied through the real command lines: sae-train (a Hydra multirun over both) on a
store harvested from a tiny model, then sae-eval over the sweep folder."""

from __future__ import annotations

import json

from sae_pipeline import layout
from sae_pipeline.sae import read_sae
from tests.helpers import compose_config, run_cli, save_tiny_model, tiny_overrides, write_corpus


def test_matryoshka_and_tied_train_and_eval_from_the_cli(tmp_path):
    from sae_pipeline import harvest

    model = save_tiny_model(tmp_path / "model")
    corpus = write_corpus(tmp_path / "corpus.jsonl", n_docs=8, words_per_doc=150)
    (store,) = harvest.run(compose_config("harvest", tiny_overrides(tmp_path, model, corpus, n_tokens=600)))
    sweep = tmp_path / "sweep"
    train = run_cli(
        "train",
        [
            "-m",
            "sae=matryoshka,tied",
            "sae.expansion_factor=4",
            f"store={store}",
            "train=tiny",
            "train.total_tokens=1024",
            "logger=none",
            f"paths.root={tmp_path / 'runs'}",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    runs = {arch: p for p in sweep.iterdir() for arch in ("matryoshka", "tied") if f"sae={arch}," in p.name}
    assert sorted(runs) == ["matryoshka", "tied"], list(sweep.iterdir())
    d_in = json.loads((store / layout.MANIFEST).read_text())["d_in"]
    matryoshka = read_sae(runs["matryoshka"] / layout.FINAL_SAE)
    assert matryoshka.cfg.arch == "matryoshka" and matryoshka.d_sae == 4 * d_in
    assert matryoshka.prefix_ends == [d_in // 4, d_in // 2, d_in, 2 * d_in, 4 * d_in]  # default 1/16 .. 1/2
    assert matryoshka.threshold > 0  # the inference threshold was learned and saved
    tied = read_sae(runs["tied"] / layout.FINAL_SAE)
    assert tied.cfg.arch == "tied" and "W_dec_FD" not in tied.state_dict()

    evaluated = run_cli(
        "eval",
        [f"sae_path={sweep}", "eval.n_tokens=200", "logger=none", f"paths.root={tmp_path / 'runs'}"],
        cwd=tmp_path,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    for name in runs:
        m = json.loads((runs[name] / layout.EVAL / layout.METRICS).read_text())
        assert m["sae"]["arch"] == name
        for key in ("l0", "fvu", "loss_recovered"):
            assert isinstance(m[key], float), (name, key)
        assert m["fvu"] < 1.0, (name, m["fvu"])  # better than predicting the mean
    assert (sweep / layout.SWEEP_TABLE_CSV).is_file()
