"""A regular (non-editable) install ships the Hydra configs (and the C top-k source) inside the package and the
CLIs find them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from sae_pipeline.schema.help import stage_module
from tests.helpers import REPO


def test_regular_install_finds_configs(tmp_path):
    site = tmp_path / "site"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    assert (site / "sae_pipeline" / "conf" / "harvest.yaml").exists()
    assert (site / "sae_pipeline" / "conf" / "probe_task" / "genre.yaml").exists()
    assert (site / "sae_pipeline" / "interpret" / "first_folio_genres.json").exists()  # the genre task's data
    assert (site / "sae_pipeline" / "sae" / "native.c").exists()  # the C top-k, compiled on first use
    env = {**os.environ, "PYTHONPATH": str(site)}
    required = {
        "harvest": [],
        "train": ["store=/nowhere"],
        "eval": ["sae_path=/nowhere"],
        "probe": ["sae_path=/nowhere"],
    }
    for stage, args in required.items():
        proc = subprocess.run(
            [sys.executable, "-m", stage_module(stage), "--cfg", "job", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,  # a hang guard, not a speed bar
        )
        assert proc.returncode == 0, f"{stage}: {proc.stderr}"
        assert "paths:" in proc.stdout
    where = subprocess.run(
        [sys.executable, "-c", "import sae_pipeline; print(sae_pipeline.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert where.stdout.strip().startswith(str(site))
    if shutil.which("cc"):  # the shipped source builds and loads from the installed package
        code = "from sae_pipeline.sae import native; print(native.SOURCE, native._load() is not None)"
        built = subprocess.run(
            [sys.executable, "-c", code],
            cwd=tmp_path,
            env={**env, "SAE_PIPELINE_CACHE": str(tmp_path / "cache")},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert built.stdout.split() == [str(site / "sae_pipeline" / "sae" / "native.c"), "True"], built.stderr
