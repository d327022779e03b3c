"""What a new user meets first on the real command lines (issue 23, part 6): a `+key` the schema does not
know is refused in one line, a key of another architecture points to that architecture, a command writes
only where it says it writes, and the training lines of a log file say elapsed time, ETA and the numbers
computed during training, naming the member of a sweep group."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from sae_pipeline import layout
from tests.helpers import make_store, run_cli

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("store") / "s", n_contexts=16, d_in=8, tag_rows=False)


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


@pytest.mark.parametrize(("extra", "key"), [("+foo=1", "foo"), ("+train.bar=2", "train.bar")])
def test_unknown_plus_key_is_refused_in_one_line_and_writes_nothing(store, tmp_path, extra, key):
    root = tmp_path / "runs"
    res = run_cli(
        "train", [f"store={store}", f"paths.root={root}", "train=tiny", "logger=none", extra], tmp_path
    )
    assert res.returncode == 2, res.stdout
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("error:") and f"{key} " in line and "train" in line
    assert _tree(root) == []  # a refused run leaves no run folder and no Hydra log folder


def test_a_key_of_another_architecture_suggests_that_architecture(store, tmp_path):
    res = run_cli("train", [f"store={store}", "sae=relu", "sae.k=3", "logger=none"], tmp_path)
    assert res.returncode == 2
    (line,) = res.stderr.strip().splitlines()
    assert "sae=topk" in line and "+sae.k" not in line, line


def test_a_failed_command_leaves_no_folder(tmp_path):
    """sae-eval on a missing SAE: no Hydra log folder under paths.root, nothing in the working directory."""
    root = tmp_path / "runs"
    res = run_cli("eval", [f"sae_path={tmp_path}/nowhere", f"paths.root={root}", "logger=none"], tmp_path)
    assert res.returncode == 2 and "nowhere" in res.stderr, res.stderr
    assert _tree(tmp_path) == []


def test_group_run_writes_only_its_run_dir_and_its_log_lines_say_enough(store, tmp_path):
    """A sweep group with train.run_dir, stdout to a file: no folder under paths.root; every progress line
    has elapsed time and ETA, validation numbers are printed, and each learning-rate line names its member."""
    root, run_dir = tmp_path / "runs", tmp_path / "run"
    args = [f"store={store}", f"paths.root={root}", f"train.run_dir={run_dir}", "train=tiny", "logger=none",
            "train.total_tokens=1024", "train.log_every=4", "train.val_every=8",
            "train.group=[{name:a,l1_coefficient:1},{name:b,l1_coefficient:3}]"]  # fmt: skip
    res = run_cli("train", args, tmp_path)
    assert res.returncode == 0, res.stderr
    assert _tree(root) == []
    assert (run_dir / "a" / layout.FINAL_SAE).is_dir() and (run_dir / "b" / layout.FINAL_SAE).is_dir()
    lines = res.stdout.splitlines()
    steps = [ln for ln in lines if re.search(r"\bstep \d+/16\b", ln)]
    assert len(steps) == 2 * 4  # 16 steps, a line every 4 for each member
    assert all(re.search(r"elapsed \d+m\d\ds \| ETA \d+m\d\ds", ln) for ln in steps), steps
    assert [ln.split()[0] for ln in steps[-2:]] == ["[a]", "[b]"] and steps[-1].endswith("ETA 0m00s")
    vals = [ln for ln in lines if " val mse " in ln]
    assert [ln.split()[0] for ln in vals] == ["[a]", "[b]"] * 2  # steps 8 and 16
    lr_lines = [ln for ln in lines if "peak learning rate" in ln]
    assert sorted(ln.split()[0] for ln in lr_lines) == ["[a]", "[b]"], lr_lines


def test_make_probe_does_not_install_chromium():
    """`make -n` prints what a target would run: only `make setup` may reach apt-get."""

    def plan(target: str) -> str:
        res = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        return res.stdout

    assert "apt-get" in plan("setup")
    for target in ("probe", "steer", "demo", "sweep", "bench"):
        assert "apt-get" not in plan(target), target
