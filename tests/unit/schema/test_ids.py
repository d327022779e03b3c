"""model.id / data.id default from the name: two models never share a store folder by accident."""

from __future__ import annotations

import hashlib
from pathlib import Path

from sae_pipeline import harvest
from sae_pipeline.schema import compose
from tests.helpers import save_tiny_model, tiny_overrides, write_corpus


def short_hash(*paths: Path) -> str:
    return hashlib.sha256("\n".join(str(p.resolve()) for p in paths).encode()).hexdigest()[:6]


def test_embedded_defaults_keep_the_demo_store_path():
    cfg = compose("harvest", ["paths.root=runs"])
    assert cfg.harvest.out_dir == "runs/stores/smollm2-135m/shakespeare"


def test_hub_names_give_the_repo_name_and_explicit_ids_win():
    cfg = compose("harvest", ["model=hub", "model.name=EleutherAI/pythia-70m", "data=hub", "data.name=NeelNanda/pile-10k",
                              "data.config_name=default"])  # fmt: skip
    assert (cfg.model.id, cfg.data.id) == ("pythia-70m", "pile-10k-default")
    cfg = compose("harvest", ["model.name=EleutherAI/pythia-70m", "model.id=p70", "data.id=mine"])
    assert (cfg.model.id, cfg.data.id) == ("p70", "mine")


def test_two_local_models_with_the_same_folder_name_harvest_into_two_stores(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl", n_docs=4, words_per_doc=100)
    stores = []
    for owner in ("alice", "bob"):
        model = save_tiny_model(tmp_path / owner / "model")
        overrides = [
            o
            for o in tiny_overrides(tmp_path, model, corpus, n_tokens=300)
            if not o.startswith(("model.id", "data.id"))
        ]
        (store,) = harvest.run(compose("harvest", overrides))
        stores.append(store)
        data_id = f"corpus-{short_hash(corpus)}"
        assert store.parent == tmp_path / "runs" / "stores" / f"model-{short_hash(model)}" / data_id
    assert stores[0] != stores[1] and stores[0].is_dir() and stores[1].is_dir()


def test_many_files_of_one_folder_are_named_by_the_folder(tmp_path):
    files = [tmp_path / "texts" / f"doc{i}.txt" for i in range(3)]
    cfg = compose("harvest", [f"data.data_files=[{','.join(map(str, files))}]"])
    assert cfg.data.id == f"texts-{short_hash(*files)}"
