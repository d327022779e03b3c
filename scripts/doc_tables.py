"""The README's tables that can be generated, generated: the package map and the config groups.

    python scripts/doc_tables.py           # rewrite them in README.md
    python scripts/doc_tables.py --check   # exit 1 naming a stale table (tests/project/test_docs.py runs this)

The package map is the docstring of sae_pipeline/__init__.py (its one home); the config table lists each
group under sae_pipeline/conf/, its options and the stages whose defaults list names it. Each table sits
between `<!-- doc_tables.py: NAME -->` and `<!-- /doc_tables.py -->` in the README. Nothing is imported, so
this runs without the package's dependencies.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "sae_pipeline"
CONF = PKG / "conf"
STAGES = ("harvest", "train", "eval", "features", "steer", "probe", "export", "verify", "connect")


def package_map() -> str:
    """The module lines of the package docstring (from its first indented line to its last)."""
    doc = ast.get_docstring(ast.parse((PKG / "__init__.py").read_text())) or ""
    lines = doc.splitlines()
    indented = [i for i, ln in enumerate(lines) if ln.startswith("    ")]
    body = [ln[4:] for ln in lines[indented[0] : indented[-1] + 1]]
    return "```\nsae_pipeline/\n" + "\n".join(f"  {ln}" if ln else "" for ln in body) + "\n```"


def _group_stages() -> dict[str, list[str]]:
    used: dict[str, list[str]] = {}
    for stage in STAGES:
        for group in re.findall(r"^  - (\w+): ", (CONF / f"{stage}.yaml").read_text(), re.M):
            used.setdefault(group, []).append(stage)
    return used


def config_table() -> str:
    used = _group_stages()
    rows = ["| group | options | `sae-<stage>` |", "|---|---|---|"]
    for group in sorted(used):
        folder = CONF / group
        if group == "experiment":  # presets live per stage; the same name means the same run in each
            folder = CONF / "presets" / used[group][0] / "experiment"
        options = sorted(p.stem for p in folder.glob("*.yaml"))
        stages = ", ".join(used[group])
        rows.append(f"| `{group}` | {', '.join(f'`{o}`' for o in options)} | {stages} |")
    launchers = sorted(p.stem for p in (CONF / "hydra" / "launcher").glob("*.yaml"))
    rows.append(f"| `hydra/launcher` | {', '.join(f'`{o}`' for o in launchers)} | any stage run with `-m` |")
    return "\n".join(rows)


TABLES = {"package map": package_map, "config groups": config_table}


def render(readme: str) -> str:
    for name, make in TABLES.items():
        pattern = re.compile(rf"(<!-- doc_tables.py: {name} -->\n).*?(\n<!-- /doc_tables.py -->)", re.S)
        if not pattern.search(readme):
            raise SystemExit(f"README.md has no <!-- doc_tables.py: {name} --> block")
        table = make()
        readme = pattern.sub(lambda m: m.group(1) + table + m.group(2), readme)  # noqa: B023 (used at once)
    return readme


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when README.md is not up to date")
    args = ap.parse_args()
    path = REPO / "README.md"
    old = path.read_text()
    new = render(old)
    if args.check:
        if new != old:
            print("README.md's generated tables are stale: run python scripts/doc_tables.py", file=sys.stderr)
            return 1
        print("ok")
        return 0
    path.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
