"""Experiment presets: each stage's presets compose, and a preset name means the same run in harvest and
train (the train preset's store is where the harvest preset writes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sae_pipeline.schema import compose
from tests.helpers import run_cli

PRESETS = Path(__file__).resolve().parents[3] / "sae_pipeline" / "conf" / "presets"


def presets(stage: str) -> list[str]:
    return sorted(p.stem for p in (PRESETS / stage / "experiment").glob("*.yaml"))


def test_every_preset_is_offered_to_both_stages():
    assert presets("harvest") == presets("train")
    assert {"demo", "gpt2-small-res-32k"} <= set(presets("train"))


@pytest.mark.parametrize("name", presets("harvest"))
def test_each_preset_composes_for_harvest_and_train(name):
    h = compose("harvest", [f"experiment={name}", "paths.root=runs"])
    store = f"{h.harvest.out_dir}/blocks.{h.hook.layer}.hook_{h.hook.points[0]}"
    t = compose("train", [f"experiment={name}", f"store={store}"])
    assert t.train.eval_every < t.train.total_tokens // t.train.batch_size  # loss recovered during training
    assert h.harvest.n_tokens > 0 and t.sae.arch


def test_gpt2_preset_values():
    h = compose("harvest", ["experiment=gpt2-small-res-32k", "paths.root=runs"])
    assert (h.model.name, h.hook.layer, list(h.hook.points)) == ("gpt2", 8, ["resid_pre"])
    assert h.harvest.out_dir == "runs/stores/gpt2/pile-10k"
    t = compose("train", ["experiment=gpt2-small-res-32k", "store=x"])
    assert (t.sae.arch, t.sae.k, t.sae.d_sae) == ("topk", 32, 32768)


def test_demo_preset_keeps_the_make_demo_store_path():
    h = compose("harvest", ["experiment=demo", "paths.root=runs"])
    assert h.harvest.out_dir == "runs/stores/smollm2-135m/shakespeare" and h.harvest.n_tokens == 200_000


def test_the_cli_takes_a_preset_and_lists_it_in_help(tmp_path):
    res = run_cli("harvest", ["experiment=gpt2-small-res-32k", "--cfg", "job"], tmp_path)
    assert res.returncode == 0 and "name: gpt2" in res.stdout, res.stderr
    res = run_cli("train", ["--help"], tmp_path)
    (line,) = [ln for ln in res.stdout.splitlines() if ln.strip().startswith("experiment:")]
    assert "gpt2-small-res-32k" in line and "demo" in line
