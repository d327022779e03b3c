"""`sae-<stage> --help`: what the stage does, only its own config groups, no base_* schema entries."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import yaml
from omegaconf import OmegaConf

from sae_pipeline.schema import compose
from sae_pipeline.schema.advanced import ADVANCED as ADVANCED_SCHEMAS
from sae_pipeline.schema.help import stage_module
from tests.helpers import run_cli

OWN_GROUPS = {  # from each stage's conf/<stage>.yaml defaults list, written out by hand
    "train": {"paths", "sae", "train", "logger", "experiment"},
    "harvest": {"paths", "model", "data", "hook", "experiment"},
    "eval": {"paths", "logger"},
    "features": {"paths"},
    "explain": {"paths", "logger"},
    "steer": {"paths"},
    "probe": {"paths", "logger", "probe_task"},
    "export": {"paths"},
    "verify": set(),
    "connect": {"paths"},
}
ALL_GROUPS = {"paths", "sae", "train", "logger", "experiment", "model", "data", "hook", "probe_task"}
ADVANCED = {"train", "harvest", "eval", "features"}  # stages whose own group has an `advanced` node


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


def _leaves(node, prefix=""):
    if isinstance(node, dict) and node:
        return {k for key, v in node.items() for k in _leaves(v, f"{prefix}{key}.")}
    return {prefix[:-1]}


@pytest.mark.parametrize("stage", sorted(OWN_GROUPS))
def test_help_shows_every_key_but_the_folded_advanced_node_and_says_how_to_print_it(stage, tmp_path):
    """The config in --help holds exactly the composed config's keys outside `<group>.advanced`; that node is
    one line naming the command that prints it, and that command prints the schema's advanced defaults."""
    res = run_cli(stage, ["--help"], tmp_path)
    assert res.returncode == 0, res.stderr
    body = res.stdout.split("== Config (")[1].split("\n", 1)[1]
    fold = [ln for ln in body.splitlines() if ".advanced (" in ln]
    shown = yaml.safe_load(
        "\n".join(ln for ln in body.splitlines() if ln not in fold and "--hydra-help" not in ln)
    )
    composed = yaml.safe_load(OmegaConf.to_yaml(compose(stage)))  # the same, without the command line
    group = stage if stage in ADVANCED else None
    every = _leaves(composed)
    assert _leaves(shown) == {k for k in every if not (group and k.startswith(f"{group}.advanced."))}
    if group is None:
        assert not fold and ".advanced" not in res.stdout
        return
    schema = ADVANCED_SCHEMAS[group]
    command = f"sae-{stage} --cfg job -p {group}.advanced"
    (line,) = fold
    assert (
        line.startswith(f"{group}.advanced ({len(dataclasses.fields(schema))} keys)")
        and f"`{command}`" in line
    )
    printed = run_cli(stage, command.split()[1:], tmp_path)
    assert printed.returncode == 0, printed.stderr
    assert yaml.safe_load(printed.stdout) == dataclasses.asdict(schema())
