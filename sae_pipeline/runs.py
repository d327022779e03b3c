"""Finding SAE runs on disk and what trained them.

A path given as `sae_path` may be an SAE folder (`sae/`), a run folder holding one, or a folder of many
runs (a multirun sweep). Each SAE's config (or its run's config.json) names the store that trained it, and
the store's manifest names the model, hook and text, so later stages need no repetition of those settings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sae_pipeline import layout
from sae_pipeline.data.store import read_manifest
from sae_pipeline.errors import UserError
from sae_pipeline.model.hook_points import resolve_hook
from sae_pipeline.model.loading import load_model
from sae_pipeline.runtime import resolve_device
from sae_pipeline.sae import SAE, load_sae
from sae_pipeline.sae.formats import read_saelens_config, sae_format


@dataclass
class Target:
    """One SAE to evaluate: its folder, the run folder it belongs to and where its eval goes."""

    sae_dir: Path
    run_dir: Path
    name: str

    @property
    def eval_dir(self) -> Path:
        return self.run_dir / layout.EVAL


def _is_sae_dir(p: Path) -> bool:
    return (p / layout.CONFIG).is_file() and (p / layout.SAE_WEIGHTS).is_file()


def find_targets(root: Path) -> tuple[list[Target], bool]:
    """Every SAE at or below root, and whether root is a folder of many runs (a sweep)."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"sae_path {root} does not exist.")
    if _is_sae_dir(root):  # an SAE folder: the run folder is its parent when that holds the run config
        run_dir = root.parent if (root.parent / layout.CONFIG).is_file() else root
        return [Target(root, run_dir, run_dir.name)], False
    if _is_sae_dir(root / layout.FINAL_SAE):
        return [Target(root / layout.FINAL_SAE, root, root.name)], False
    if (root / layout.CONFIG).is_file() and not any(root.rglob(f"{layout.FINAL_SAE}/{layout.CONFIG}")):
        raise UserError(
            f"run folder {root} has no final SAE ({layout.FINAL_SAE}/ is missing): did training finish?"
        )
    found = sorted(p.parent for p in root.rglob(f"{layout.FINAL_SAE}/{layout.CONFIG}"))
    targets = [Target(d, d.parent, d.parent.relative_to(root).as_posix()) for d in found if _is_sae_dir(d)]
    if not targets:
        raise UserError(
            f"no SAE found under {root}: no {layout.FINAL_SAE}/{layout.CONFIG} with {layout.SAE_WEIGHTS} below it."
        )
    return targets, True


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {path} ({err}).") from None


def store_path(target: Target, meta: dict) -> Path:
    store = meta.get("store")
    if store is None and (target.run_dir / layout.CONFIG).is_file():
        store = _read_json(target.run_dir / layout.CONFIG).get("store")
    if not store:
        raise UserError(
            f"{target.sae_dir / layout.CONFIG} does not say which store trained it (no 'store' key)."
        )
    return Path(store)


@dataclass
class Spec:
    """What evaluating one SAE needs besides the SAE: model, hook, text."""

    meta: dict
    store: Path
    manifest: dict
    model_cfg: dict
    hook_name: str

    @property
    def model_key(self) -> str:
        return json.dumps(self.model_cfg, sort_keys=True, default=str)


def load_spec(target: Target) -> Spec:
    meta = _read_json(target.sae_dir / layout.CONFIG)
    store = store_path(target, meta)
    manifest = read_manifest(store)
    model_cfg = meta.get("model") or manifest["model"]
    hook = meta.get("hook") or manifest["hook"]
    hook_name = hook["name"] if isinstance(hook, dict) else str(hook)
    return Spec(meta, store, manifest, dict(model_cfg), hook_name)


def check_matches_store(sae: SAE, target: Target, spec: Spec) -> None:
    """The SAE must take the activations its store holds."""
    d_store = spec.manifest.get("d_in", sae.d_in)
    if sae.d_in != d_store:
        raise UserError(
            f"the SAE in {target.sae_dir} has d_in={sae.d_in} but its store {spec.store} has d_in={d_store}."
        )


def single_target(sae_path: str) -> tuple[Target, Spec]:
    """The one SAE at sae_path (a run folder or an SAE folder) and what it was trained on."""
    target, _ = single_target_only(Path(sae_path))
    return target, load_spec(target)


def load_all(sae_path: str, device_name: str):
    """(target, spec, model, tokenizer, sae, hook point) for the SAE at sae_path."""
    target, spec = single_target(sae_path)
    device = resolve_device(device_name)
    sae = load_sae(target.sae_dir, map_location=device).eval().requires_grad_(False)
    model, tokenizer = load_model(spec.model_cfg, device)
    hook = resolve_hook(model, spec.hook_name)
    check_matches_store(sae, target, spec)
    return target, spec, model, tokenizer, sae, hook


def training_metadata(sae_path: str | Path) -> tuple[dict, Path]:
    """(what the SAE at sae_path was trained on, in SAELens's key names; the folder its outputs go to).

    Our runs: the model and hook from the SAE's config.json, context size, BOS and dataset from its store's
    manifest when the store is still there. SAELens folders: their own cfg.json. Bare files: nothing known.
    """
    p = Path(sae_path)
    kind = sae_format(p)
    if kind == "saelens":
        folder = p.parent if p.is_file() else p
        cfg = read_saelens_config(folder)
        keys = (
            "model_name",
            "hook_name",
            "hook_layer",
            "context_size",
            "prepend_bos",
            "dataset_path",
            "neuronpedia_id",
        )
        return {k: cfg[k] for k in keys if cfg.get(k) is not None}, folder
    if kind == "bare":
        return {}, p.parent
    target, _ = single_target_only(p)
    meta = _read_json(target.sae_dir / layout.CONFIG)
    hook = meta.get("hook")
    out = {
        "model_name": (meta.get("model") or {}).get("name"),
        "hook_name": hook["name"] if isinstance(hook, dict) else hook,
    }
    try:
        man = read_manifest(store_path(target, meta))
    except (UserError, OSError, KeyError):
        man = None  # the store was moved or deleted: export what the SAE's own config says
    if man is not None:
        out.update(
            model_name=out["model_name"] or man.get("model", {}).get("name"),
            hook_name=out["hook_name"] or man.get("hook", {}).get("name"),
            hook_layer=man.get("hook", {}).get("layer"),
            context_size=man.get("context_size"),
            prepend_bos=bool(man.get("bos", {}).get("prepended", True)),
            dataset_path=man.get("dataset", {}).get("config", {}).get("name"),
        )
    return {k: v for k, v in out.items() if v is not None}, target.run_dir


def single_target_only(sae_path: Path) -> tuple[Target, bool]:
    targets, is_sweep = find_targets(Path(sae_path))
    if len(targets) != 1:
        raise UserError(
            f"sae_path {sae_path} holds {len(targets)} SAEs; point it at one run folder (e.g. {targets[0].run_dir})."
        )
    return targets[0], is_sweep
