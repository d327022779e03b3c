"""The package's import rules hold (stages never import stages, no import circle), and the checker
that guards them really finds each kind of violation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO

CHECKER = REPO / "scripts" / "check_imports.py"


def _load_checker():
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_imports", CHECKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_package_follows_the_import_rules():
    out = subprocess.run([sys.executable, str(CHECKER)], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout


def _package(tmp: Path, files: dict[str, str]) -> Path:
    root = tmp / "pkg"
    for name, text in {"__init__.py": "", **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_checker_finds_a_stage_importing_a_stage_through_a_library(tmp_path):
    check = _load_checker()
    root = _package(
        tmp_path,
        {
            "harvest.py": "from pkg.lib import helper\n",
            "lib.py": "def helper():\n    from pkg import train\n",
            "train.py": "",
        },
    )
    assert check.violations(root) == ["stage pkg.harvest imports stage pkg.train"]


def test_checker_finds_a_circle_made_by_relative_imports(tmp_path):
    check = _load_checker()
    root = _package(
        tmp_path,
        {"sub/__init__.py": "", "sub/a.py": "from .b import x\n", "sub/b.py": "from . import a\nx = 1\n"},
    )
    assert check.violations(root) == ["import circle through pkg.sub.a", "import circle through pkg.sub.b"]
    (root / "sub" / "b.py").write_text("x = 1\n")
    assert check.violations(root) == []
