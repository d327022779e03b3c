"""`sae-<stage> --help`: what the stage does, only its own config groups, no base_* schema entries."""

from __future__ import annotations

import importlib

import pytest

from sae_pipeline.schema.help import stage_module
from tests.helpers import run_cli

OWN_GROUPS = {  # from each stage's conf/<stage>.yaml defaults list, written out by hand
    "train": {"paths", "sae", "train", "logger", "experiment"},
    "harvest": {"paths", "model", "data", "hook", "experiment"},
    "eval": {"paths", "logger"},
    "explain": {"paths"},
    "verify": set(),
}
ALL_GROUPS = {"paths", "sae", "train", "logger", "experiment", "model", "data", "hook"}


@pytest.mark.parametrize("stage", sorted(OWN_GROUPS))
def test_help_says_what_the_stage_does_and_lists_only_its_groups(stage, tmp_path):
    res = run_cli(stage, ["--help"], tmp_path)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    doc = importlib.import_module(stage_module(stage)).__doc__
    assert out.startswith(doc.strip().splitlines()[0])
    section = out.split("== Config groups")[1].split("== Config (")[0]
    listed = {
        ln.split(":")[0].strip()
        for ln in section.splitlines()[1:]
        if ":" in ln and not ln.strip().startswith("(")
    }
    assert listed == OWN_GROUPS[stage]
    assert (
        "base_" not in out.replace("base_url", "") and "is powered by Hydra" not in out
    )  # explain.base_url is a key
    assert "store:" in out if stage == "train" else True  # the composed config follows
    if stage == "train":
        (sae_line,) = [ln for ln in section.splitlines() if ln.strip().startswith("sae:")]
        assert "topk" in sae_line and "relu" in sae_line
    assert not (ALL_GROUPS - OWN_GROUPS[stage]) & listed
