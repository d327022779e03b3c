"""Fetch the wheels `make gpu-check` needs on a GPU node that has only torch, transformers, safetensors,
numpy, fsspec and pyarrow (and their own dependencies), into gpu_bundle/ in this checkout.

    .venv/bin/python scripts/gpu_bundle.py                  # for Python 3.12 (the default node)
    .venv/bin/python scripts/gpu_bundle.py --python 3.11 --out gpu_bundle

The versions are the ones installed in this venv. Only pure-Python wheels are wanted (py3-none-any: they
install on any node's Python and platform); a package published only as source (antlr4-python3-runtime,
omegaconf's parser) is built into such a wheel here. The node installs them with
`pip install --no-index --no-deps --target .gpu-site gpu_bundle/*.whl`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

# what the check imports beyond the node's packages: the Hydra configs (hydra-core, omegaconf and its parser)
PACKAGES = ("hydra-core", "omegaconf", "antlr4-python3-runtime")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--python", default="3.12", help="the node's Python version")
    ap.add_argument("--out", type=Path, default=Path("gpu_bundle"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "-q"]
    for name in PACKAGES:
        spec = f"{name}=={version(name)}"
        got = subprocess.run(
            [
                *pip,
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--python-version",
                args.python,
                "-d",
                str(args.out),
                spec,
            ],
            capture_output=True,
            text=True,
        )
        if got.returncode != 0:  # published as source only: build a wheel (pure Python) from it
            subprocess.run([*pip, "wheel", "--no-deps", "-w", str(args.out), spec], check=True)
    wheels = sorted(args.out.glob("*.whl"))
    impure = [w.name for w in wheels if not w.name.endswith("-py3-none-any.whl")]
    if impure:
        sys.exit(f"gpu-bundle: not pure-Python wheels, they would not install on every node: {impure}")
    size = sum(w.stat().st_size for w in wheels)
    print(
        f"gpu-bundle: {len(wheels)} wheels, {size / 2**20:.1f} MiB in {args.out}: {[w.name for w in wheels]}"
    )


if __name__ == "__main__":
    main()
