"""What identifies a store for a resume: settings that differ from the defaults, not the schema's size."""

from __future__ import annotations

from omegaconf import OmegaConf, open_dict

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
