"""What identifies a store for a resume: settings that differ from the defaults, not the schema's size."""

from __future__ import annotations

import json

from omegaconf import OmegaConf, open_dict

from sae_pipeline import layout
from sae_pipeline.data.shards import store_fingerprint
from tests.helpers import compose_config


def _cfg(*overrides: str):
    return compose_config("harvest", ["paths.root=/tmp/x", *overrides])


def test_a_key_added_later_at_its_default_keeps_the_fingerprint():
    """A store harvested before a schema key existed must still be resumable once the key exists at its default."""
    cfg = _cfg()
    older = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))  # as an older version composed it
    with open_dict(older):
        del older.data["eval_fraction"]
        del older.model["weights"]
    assert store_fingerprint(cfg, "blocks.1.hook_resid_post") == store_fingerprint(
        older, "blocks.1.hook_resid_post"
    )


def test_settings_that_change_the_rows_change_the_fingerprint():
    base = store_fingerprint(_cfg(), "h")
    assert store_fingerprint(_cfg("data.eval_fraction=0.3"), "h") != base
    assert store_fingerprint(_cfg("model.revision=abc"), "h") != base
    assert store_fingerprint(_cfg("harvest.context_size=64"), "h") != base
    assert store_fingerprint(_cfg(), "other") != base


def _old_store(folder, cfg, fingerprint: str):
    """A manifest as an older version wrote it: its own fingerprint and the config it recorded."""
    folder.mkdir(parents=True)
    (folder / layout.MANIFEST).write_text(json.dumps({"fingerprint": fingerprint, "config": cfg}))
    return folder


def test_a_store_from_an_older_version_with_the_same_settings_keeps_its_fingerprint(tmp_path):
    cfg = _cfg()
    older = OmegaConf.to_container(cfg, resolve=True)
    del older["data"]["eval_fraction"], older["model"]["weights"]  # keys that version did not have
    same = _old_store(tmp_path / "same", older, "fingerprint-of-an-older-version")
    assert store_fingerprint(cfg, "h", same) == "fingerprint-of-an-older-version"  # resumed, not refused

    older["data"]["eval_documents"] = 7  # a setting that changes the rows: not the same store
    other = _old_store(tmp_path / "other", older, "fingerprint-of-an-older-version")
    assert store_fingerprint(cfg, "h", other) == store_fingerprint(cfg, "h")
    assert store_fingerprint(cfg, "h", tmp_path / "absent") == store_fingerprint(cfg, "h")
