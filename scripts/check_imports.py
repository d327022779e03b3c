"""The package's import rules, checked from the source (no import is executed).

    python scripts/check_imports.py            # exit 1 and one line per violation, else "ok"

1. A stage module (the `sae-*` commands) never imports another stage, directly or through others.
2. No import circle between the package's modules (a package's own __init__ is not an edge target
   from its submodules unless they import it by name).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "sae_pipeline"
STAGES = (
    "harvest",
    "train",
    "evaluate",
    "features",
    "explain",
    "steer",
    "probe",
    "export",
    "verify",
    "connect",
)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the package modules it imports (anywhere in its body, lazy imports included)."""
    pkg = root.name
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t.split(".")[0] == pkg and t in files and t != mod}
        graph[mod] = edges
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), list(graph.get(start, ()))
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph.get(m, ()))
    return seen


def violations(root: Path = ROOT, stages: tuple[str, ...] = STAGES) -> list[str]:
    graph = import_graph(root)
    stage_mods = {f"{root.name}.{s}" for s in stages}
    out = []
    for s in sorted(stage_mods & set(graph)):
        for other in sorted((reachable(graph, s) & stage_mods) - {s}):
            out.append(f"stage {s} imports stage {other}")
    for mod in sorted(graph):
        if mod in reachable(graph, mod):
            out.append(f"import circle through {mod}")
    return out


if __name__ == "__main__":
    found = violations()
    print("\n".join(found) or "ok")
    sys.exit(1 if found else 0)
