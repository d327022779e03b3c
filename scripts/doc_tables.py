"""The tables that can be generated, generated: the README's package map and config groups, and the test
map of tests/README.md.

    python scripts/doc_tables.py           # rewrite them in README.md and tests/README.md
    python scripts/doc_tables.py --check   # exit 1 naming a stale file (tests/project/test_docs.py runs this)

The package map is the docstring of sae_pipeline/__init__.py (its one home); the config table lists each
group under sae_pipeline/conf/, its options and the stages whose defaults list names it. The test map lists
every test file with the first sentence of its docstring and the package modules it imports, and for each
package module the test files that import it. Each table sits between `<!-- doc_tables.py: NAME -->` and
`<!-- /doc_tables.py -->`. Nothing is imported, so this runs without the package's dependencies.
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


TESTS = REPO / "tests"


def _first_sentence(doc: str) -> str:
    paragraph = " ".join(doc.split("\n\n")[0].split())
    end = paragraph.find(". ")
    return (paragraph if end < 0 else paragraph[: end + 1]).replace("|", "\\|")


def _imported_modules(tree: ast.AST) -> set[str]:
    """Package modules a test file imports, as paths under sae_pipeline/ (`sae/` for the package itself)."""

    def name_of(dotted: str) -> str | None:
        parts = dotted.split(".")
        if parts[0] != "sae_pipeline":
            return None
        if len(parts) == 1:
            return "__init__.py"
        path = PKG.joinpath(*parts[1:])
        if path.with_suffix(".py").is_file():
            return str(path.with_suffix(".py").relative_to(PKG))
        return str(path.relative_to(PKG)) + "/" if path.is_dir() else None  # None: a name, not a module

    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {name_of(a.name) for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            base = name_of(node.module)
            subs = {name_of(f"{node.module}.{a.name}") for a in node.names}
            subs = {m for m in subs if m and m.endswith(".py")}
            found |= subs or {base}  # `from sae_pipeline import harvest` names harvest.py, not the package
    found.discard(None)
    return found


def _test_files() -> dict[Path, set[str]]:
    return {p: _imported_modules(ast.parse(p.read_text())) for p in sorted(TESTS.rglob("test_*.py"))}


COMMON = {"errors.py", "layout.py"}  # imported by most test files for UserError and folder names: no signal


def home_module(test: Path) -> str | None:
    """The module a test file is named after: unit/<package>/test_<module>.py, unit/test_<module>.py, or
    cli/test_<stage>.py (a stage is a top-level module); None for a file that guards several."""
    rel = test.relative_to(TESTS)
    name = rel.stem.removeprefix("test_")
    if rel.parts[0] == "unit":
        candidate = Path(*rel.parts[1:-1], name + ".py")
    elif rel.parts[0] == "cli":
        candidate = Path(name + ".py")
    else:
        return None
    return str(candidate) if (PKG / candidate).is_file() else None


def test_table() -> str:
    rows = [
        "| file | what it checks (its docstring's first sentence) | imports from `sae_pipeline/` |",
        "|---|---|---|",
    ]
    for path, modules in _test_files().items():
        doc = _first_sentence(ast.get_docstring(ast.parse(path.read_text())) or "")
        shown = ", ".join(f"`{m}`" for m in sorted(modules - COMMON))
        rows.append(f"| `{path.relative_to(TESTS)}` | {doc} | {shown} |")
    return "\n".join(rows)


def module_table() -> str:
    files = _test_files()
    home: dict[str, str] = {}
    for path in files:
        if (m := home_module(path)) is not None:
            home[m] = f"`{path.relative_to(TESTS)}`"
    importers: dict[str, list[str]] = {}
    for path, modules in files.items():
        for m in modules - COMMON:
            if home.get(m) != f"`{path.relative_to(TESTS)}`":
                importers.setdefault(m, []).append(f"`{path.relative_to(TESTS)}`")
    modules = {
        str(p.relative_to(PKG))
        for p in PKG.rglob("*.py")
        if "conf" not in p.parts and p.name != "__init__.py"
    }
    rows = ["| `sae_pipeline/...` | its test file | other test files that import it |", "|---|---|---|"]
    for m in sorted(modules | set(importers)):
        rows.append(f"| `{m}` | {home.get(m, '')} | {', '.join(importers.get(m, []))} |")
    return "\n".join(rows)


TABLES = {
    REPO / "README.md": {"package map": package_map, "config groups": config_table},
    TESTS / "README.md": {"test files": test_table, "tests by module": module_table},
}


def render(path: Path, text: str) -> str:
    for name, make in TABLES[path].items():
        pattern = re.compile(rf"(<!-- doc_tables.py: {name} -->\n).*?(\n<!-- /doc_tables.py -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"{path.relative_to(REPO)} has no <!-- doc_tables.py: {name} --> block")
        table = make()
        text = pattern.sub(lambda m: m.group(1) + table + m.group(2), text)  # noqa: B023 (used at once)
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when a generated table is not up to date")
    args = ap.parse_args()
    stale = []
    for path in TABLES:
        old = path.read_text()
        new = render(path, old)
        if new != old:
            stale.append(str(path.relative_to(REPO)))
            if not args.check:
                path.write_text(new)
    if args.check:
        if stale:
            print(
                f"{', '.join(stale)}: generated tables are stale: run python scripts/doc_tables.py",
                file=sys.stderr,
            )
            return 1
        print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
