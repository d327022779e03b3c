"""`sae-<stage> --help`: what the stage does (its module docstring), its own config groups and their
options (no `base_*` schema entries, no other stage's groups), then the composed config.

conf/hydra/help/stage.yaml renders `${sae_help:${hydra.job.name}}`; Hydra then substitutes $CONFIG.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import yaml
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"


def stage_module(stage: str) -> str:
    """The module of `sae-<stage>`: sae_pipeline.<stage>, but sae-eval's is evaluate.py (eval is a builtin)."""
    return f"sae_pipeline.{'evaluate' if stage == 'eval' else stage}"


def _docstring(stage: str) -> str:
    spec = importlib.util.find_spec(stage_module(stage))
    if spec is None or spec.origin is None:
        return f"sae-{stage}"
    return ast.get_docstring(ast.parse(Path(spec.origin).read_text())) or f"sae-{stage}"


def stage_groups(stage: str) -> dict[str, tuple[str | None, list[str]]]:
    """{group: (default option, options)} for the groups in conf/<stage>.yaml's defaults list."""
    defaults = (yaml.safe_load((CONF / f"{stage}.yaml").read_text()) or {}).get("defaults", [])
    out = {}
    for entry in defaults:
        if not isinstance(entry, dict):
            continue
        for group, choice in entry.items():
            folder = next((f for f in (CONF / group, CONF / "presets" / stage / group) if f.is_dir()), None)
            if group.startswith(("override", "hydra")) or "/" in group or folder is None:
                continue
            options = sorted(p.stem for p in folder.glob("*.yaml") if not p.stem.startswith("base_"))
            out[group] = (choice, options)
    return out


def help_text(stage: str) -> str:
    lines = [_docstring(stage).replace("$", "$$"), "", "== Config groups (group=option) =="]
    groups = stage_groups(stage)
    if not groups:
        lines.append("  (none: set the keys below directly)")
    for group, (choice, options) in groups.items():
        default = f"  (default: {choice})" if choice else "  (default: none)"
        lines.append(f"  {group}: {', '.join(options)}{default}")
    lines += [
        "",
        "== Config (override any key: key=value; `sae-" + stage + " --cfg job` prints it resolved) ==",
        "",
    ]
    lines += ["$CONFIG", "Hydra's own options: --hydra-help"]
    return "\n".join(lines)


def register_resolver() -> None:
    if not OmegaConf.has_resolver("sae_help"):
        OmegaConf.register_new_resolver("sae_help", help_text)
