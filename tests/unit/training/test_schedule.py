"""The learning rate that follows the dictionary width when train.lr is not given (Gao et al. 2024:
2e-4 / sqrt(d_sae / 2**14)), against values worked out by hand; an explicit train.lr still wins."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from sae_pipeline import layout
from sae_pipeline.schema import register_configs
from sae_pipeline.train import run
from sae_pipeline.training.schedule import default_lr, resolve_lr
from tests.helpers import make_store


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("store") / "s", n_contexts=16, d_in=16, tag_rows=False)


def _cfg(store: Path, run_dir: Path, *overrides: str):
    register_configs()
    with initialize_config_module("sae_pipeline.conf", version_base="1.3"):
        return compose(
            config_name="train",
            overrides=[f"store={store}", f"train.run_dir={run_dir}", "train=tiny", "logger=none",
                       "train.total_tokens=1024", "train.checkpoint_every_tokens=0", *overrides],
        )  # fmt: skip


def test_rule_by_hand():
    # 2**14 latents: 2e-4 exactly; 4x wider: sqrt(4) = 2 times smaller; 8 x 576 = 4608 = 2**14 * 9/32
    assert default_lr(16_384) == pytest.approx(2e-4, rel=1e-12)
    assert default_lr(65_536) == pytest.approx(1e-4, rel=1e-12)
    assert default_lr(256) == pytest.approx(1.6e-3, rel=1e-12)  # sqrt(256 / 16384) = 1/8
    assert default_lr(4608) == pytest.approx(2e-4 * (32 / 9) ** 0.5, rel=1e-12)  # 3.771e-4
    assert resolve_lr(0.01, 4608) == 0.01 and resolve_lr(None, 1024) == pytest.approx(8e-4, rel=1e-12)


def test_unset_lr_follows_the_width_and_is_recorded(store, tmp_path):
    """tiny.yaml names an lr, so null it; d_sae 256 -> 1.6e-3 in config.json, the log event and the
    logged lr once the 5 warm-up steps are over (step 8 of 16, before the final 20% decay)."""
    run_dir = run(_cfg(store, tmp_path / "r", "train.lr=null", "sae.d_sae=256"))
    assert json.loads((run_dir / layout.CONFIG).read_text())["lr"] == pytest.approx(1.6e-3, rel=1e-12)
    lines = [json.loads(ln) for ln in (run_dir / layout.TRAIN_LOG).read_text().splitlines()]
    assert any("peak learning rate 0.0016 (train.lr not given" in ln.get("event", "") for ln in lines), lines
    step8 = next(ln for ln in lines if ln.get("step") == 8 and "lr" in ln)
    assert step8["lr"] == pytest.approx(1.6e-3, rel=1e-9)


def test_explicit_lr_wins_and_a_group_gets_one_lr_per_width(store, tmp_path):
    run_dir = run(_cfg(store, tmp_path / "e", "sae.d_sae=256"))  # tiny.yaml: train.lr=1e-2
    assert json.loads((run_dir / layout.CONFIG).read_text())["lr"] == 0.01
    group = "train.group=[{name:a,d_sae:256},{name:b,d_sae:1024}]"
    run_dir = run(_cfg(store, tmp_path / "g", "train.lr=null", group))
    lrs = {m: json.loads((run_dir / m / layout.CONFIG).read_text())["lr"] for m in ("a", "b")}
    assert lrs == {"a": pytest.approx(1.6e-3, rel=1e-12), "b": pytest.approx(8e-4, rel=1e-12)}


def test_topk_family_default_is_four_times_the_law(store, tmp_path):
    """TopK's default_lr_scale is 4 (measured by scripts/bench_quality.py): d_sae 256 -> 4 * 1.6e-3 = 0.0064,
    in config.json and the log event; sae=relu keeps the law itself (the tests above)."""
    assert default_lr(256, 4.0) == pytest.approx(6.4e-3, rel=1e-12)
    for arch in ("topk", "batchtopk"):
        run_dir = run(
            _cfg(store, tmp_path / arch, "train.lr=null", f"sae={arch}", "sae.d_sae=256", "sae.k=4")
        )
        assert json.loads((run_dir / layout.CONFIG).read_text())["lr"] == pytest.approx(6.4e-3, rel=1e-12)
        lines = [json.loads(ln) for ln in (run_dir / layout.TRAIN_LOG).read_text().splitlines()]
        assert any(
            "peak learning rate 0.0064 (train.lr not given: 4 x 2e-4" in ln.get("event", "") for ln in lines
        )
