"""The one-pass defaults of the K-sparse family (issue 21): a latent counts as dead after 32 x d_sae / k tokens
without firing (its fair share of the firings is one per d_sae / k tokens), every other architecture after
500,000, and AuxK weighs 4. Checked against values worked out by hand, and through real runs: a run that
leaves train.dead_tokens unset trains exactly the SAE of a run that names the law's value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from sae_pipeline import layout
from sae_pipeline.sae import CONFIG_CLASSES, build_sae
from sae_pipeline.schema import compose
from sae_pipeline.train import run
from tests.helpers import make_store


@pytest.mark.parametrize(
    ("arch", "k", "d_sae", "want"),
    [
        ("topk", 16, 4608, 9_216),  # 32 * 4608 / 16
        ("topk", 32, 4608, 4_608),
        ("topk", 64, 4608, 2_304),
        ("batchtopk", 32, 16_384, 16_384),  # 32 * 512
        ("topk", 3, 100, 1_066),  # floor(3200 / 3)
        ("relu", None, 4608, 500_000),
        ("jumprelu", None, 4608, 500_000),
    ],
)
def test_dead_threshold_by_hand(arch, k, d_sae, want):
    cfg = CONFIG_CLASSES[arch](d_sae=d_sae, **({"k": k} if k else {}))
    assert build_sae(cfg, d_in=64, seed=0).default_dead_tokens() == want


def test_composed_defaults_and_the_demo_pins():
    """`sae=topk` leaves train.dead_tokens to the SAE and weighs AuxK 4; the demo keeps what it was built with
    (AuxK 1/32, dead after 100,000 tokens, lr 1e-3), so its weights do not change."""
    for arch in ("topk", "batchtopk", "matryoshka"):
        cfg = compose("train", ["store=x", f"sae={arch}"])
        assert cfg.train.dead_tokens is None and cfg.sae.aux_k_coefficient == 4.0
    demo = compose("train", ["store=x", "experiment=demo"])
    assert (demo.sae.aux_k_coefficient, demo.train.dead_tokens, demo.train.lr) == (1 / 32, 100_000, 1e-3)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("store") / "s", n_contexts=32, d_in=16, tag_rows=False)


def _train(store: Path, run_dir: Path, *overrides: str) -> tuple[dict, list[dict]]:
    cfg = compose(
        "train",
        [f"store={store}", f"train.run_dir={run_dir}", "train=tiny", "logger=none", "sae=topk", "sae.d_sae=64",
         "sae.k=8", "train.total_tokens=4096", "train.lr=0.05", "train.checkpoint_every_tokens=0", *overrides],
    )  # fmt: skip
    out = run(cfg)
    weights = load_file(str(out / layout.FINAL_SAE / "sae.safetensors"))
    log = [json.loads(ln) for ln in (out / layout.TRAIN_LOG).read_text().splitlines()]
    return weights, [r for r in log if "dead_latents" in r]


def test_unset_dead_tokens_trains_with_the_law(store, tmp_path):
    """d_sae 64, k 8: dead after 32 * 64 / 8 = 256 tokens (4 batches of 64), well inside this 4096-token run
    whose lr 0.05 kills a few latents, so AuxK acts; the unset default trains bit for bit what train.dead_tokens=256 trains, and not
    what the old fixed 500,000 (AuxK never acting) trains."""
    unset, log_unset = _train(store, tmp_path / "unset", "train.dead_tokens=null")
    named, log_named = _train(store, tmp_path / "named", "train.dead_tokens=256")
    fixed, log_fixed = _train(store, tmp_path / "fixed", "train.dead_tokens=500000")
    assert any(r["dead_latents"] > 0 and r["loss/aux_k"] > 0 for r in log_unset), log_unset  # AuxK acted
    assert [r["dead_latents"] for r in log_unset] == [r["dead_latents"] for r in log_named]
    for name, w in unset.items():
        assert w.equal(named[name]), name
    assert all(r["dead_latents"] == 0 for r in log_fixed)
    assert not all(w.equal(fixed[name]) for name, w in unset.items())
