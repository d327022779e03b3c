"""model.name=<org>/<name> is a hub id, not a missing folder (loaded here from an offline hub cache).

.venv/bin/python -m pytest tests/unit/model/test_loading.py -q
"""

from __future__ import annotations

import pytest

from sae_pipeline import layout
from sae_pipeline.errors import UserError
from sae_pipeline.model.loading import load_model
from tests import helpers


def test_harvest_takes_an_org_slash_name_hub_id(tmp_path):
    model_dir = helpers.save_tiny_model(tmp_path / "model")
    helpers.fake_hub_repo(tmp_path / "hub", "tiny-org/tiny-llama", model_dir)
    corpus = helpers.write_corpus(tmp_path / "corpus.jsonl", n_docs=6, words_per_doc=80)
    shards = []
    for run, name in (("hub", "tiny-org/tiny-llama"), ("folder", str(model_dir))):
        args = helpers.tiny_overrides(tmp_path / run, model_dir, corpus, n_tokens=200) + [
            f"model.name={name}"
        ]
        res = helpers.run_cli("harvest", args, cwd=tmp_path, env={"HF_HUB_CACHE": str(tmp_path / "hub")})
        assert res.returncode == 0, res.stderr
        [shard] = (tmp_path / run).rglob(layout.shard_name(0))
        shards.append(shard.read_bytes())
    assert shards[0] == shards[1]  # the hub copy is the same model


@pytest.mark.parametrize("name", ["./no/such/folder", "/no/such/folder", "no/such/folder"])
def test_paths_that_do_not_exist_are_missing_folders(name):
    with pytest.raises(UserError, match=r"model.name=.*: no such folder"):
        load_model({"name": name}, "cpu")
