"""`sae-<stage> --help`: what the stage does (its module docstring), its own config groups and their
options (no `base_*` schema entries, no other stage's groups), then the composed config with each
`advanced` node (schema/advanced.py) folded into one line that says how to print it.

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


def folded_config(root) -> tuple[str, dict[str, int]]:
    """The composed config as YAML without `hydra` and without any `advanced` node; {group: keys folded}."""
    cfg = OmegaConf.to_container(root, resolve=False)
    cfg.pop("hydra", None)
    folded = {}
    for group, node in cfg.items():
        if isinstance(node, dict) and isinstance(node.get("advanced"), dict):
            folded[group] = len(node.pop("advanced"))
    return OmegaConf.to_yaml(OmegaConf.create(cfg)), folded


def help_text(stage: str, _root_=None) -> str:
    """The --help template; with the composed config (`_root_`, given by OmegaConf) it prints that config
    itself, with every `advanced` node folded away, instead of Hydra's $CONFIG."""
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
    if _root_ is None:
        lines.append("$CONFIG")
    else:
        config, folded = folded_config(_root_)
        lines.append(config.replace("$", "$$"))
        for group, n_keys in folded.items():  # one line per folded node: that it exists and how to see it
            lines.append(
                f"{group}.advanced ({n_keys} keys), settings most runs never change, is folded away: "
                f"`sae-{stage} --cfg job -p {group}.advanced` prints it"
            )
    lines += ["", "Hydra's own options: --hydra-help"]
    return "\n".join(lines)


def register_resolver() -> None:
    if not OmegaConf.has_resolver("sae_help"):
        OmegaConf.register_new_resolver("sae_help", help_text)
