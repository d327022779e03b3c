"""The maps a reader relies on stay true: every module is listed in its package's docstring, the README's
generated tables (package map, config groups) are up to date, and every environment variable the package
reads is documented in the README."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PKG = REPO / "sae_pipeline"
PACKAGES = sorted(p.parent for p in PKG.rglob("__init__.py") if "conf" not in p.relative_to(PKG).parts)


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_package_docstring_lists_every_module(package):
    doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""
    missing = [p.name for p in sorted(package.glob("*.py")) if p.name != "__init__.py" and p.name not in doc]
    assert not missing, f"{package.relative_to(REPO)}/__init__.py's docstring does not list {missing}"


def test_readme_tables_are_generated_from_the_code():
    res = subprocess.run(
        [sys.executable, "scripts/doc_tables.py", "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr


def test_every_environment_variable_is_documented():
    used = {m for p in PKG.rglob("*.py") for m in re.findall(r"SAE_PIPELINE_[A-Z_]+", p.read_text())}
    readme = (REPO / "README.md").read_text()
    assert used and not {v for v in used if f"`{v}`" not in readme}
