"""Finding SAE runs on disk and what trained them.

A path given as `sae_path` may be an SAE folder (`sae/`), a run folder holding one, or a folder of many
runs (a multirun sweep). Each SAE's config (or its run's config.json) names the store that trained it, and
the store's manifest names the model, hook and text, so later stages need no repetition of those settings.

An SAE not trained here (a SAELens folder, a bare .safetensors file) has no store: the `source` group
(schema/source.py) names its model, hook and text, each defaulting to what its own cfg.json says. Its
outputs (eval/, features/, steer/) go into its folder (a bare file: a folder named after the file).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from sae_pipeline import layout
from sae_pipeline.data import text
from sae_pipeline.data.remote import is_url
from sae_pipeline.data.store import read_manifest
from sae_pipeline.errors import UserError
from sae_pipeline.model.hook_points import resolve_hook
from sae_pipeline.model.loading import load_model
from sae_pipeline.runtime import resolve_device
from sae_pipeline.sae import SAE, read_sae
from sae_pipeline.sae.formats import RUN_META_KEYS, read_saelens_config, sae_format
from sae_pipeline.schema.eval import eval_data_config


@dataclass
class TargetSAE:
    """One SAE to evaluate: its folder, the run folder it belongs to and where its eval goes."""

    sae_dir: Path  # our sae/ folder, a SAELens folder, or a bare .safetensors file
    run_dir: Path
    name: str
    kind: str = "native"  # native | saelens | bare (see sae.formats.sae_format)

    @property
    def eval_dir(self) -> Path:
        return self.run_dir / layout.EVAL

    @property
    def weights_file(self) -> Path:
        if self.kind == "bare":
            return self.sae_dir
        return self.sae_dir / (layout.SAELENS_WEIGHTS if self.kind == "saelens" else layout.SAE_WEIGHTS)


def _is_sae_dir(p: Path) -> bool:
    return (p / layout.CONFIG).is_file() and (p / layout.SAE_WEIGHTS).is_file()


def find_targets(root: Path) -> tuple[list[TargetSAE], bool]:
    """Every SAE at or below root, and whether root is a folder of many runs (a sweep)."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"sae_path {root} does not exist.")
    kind = sae_format(root)
    if kind == "saelens":
        folder = root.parent if root.is_file() else root
        return [TargetSAE(folder, folder, folder.name, kind)], False
    if kind == "bare":
        return [TargetSAE(root, root.parent / root.stem, root.stem, kind)], False
    if root.is_file() and kind == "native":
        root = root.parent
    if _is_sae_dir(root):  # an SAE folder: the run folder is its parent when that holds the run config
        run_dir = root.parent if (root.parent / layout.CONFIG).is_file() else root
        return [TargetSAE(root, run_dir, run_dir.name)], False
    if _is_sae_dir(root / layout.FINAL_SAE):
        return [TargetSAE(root / layout.FINAL_SAE, root, root.name)], False
    if (root / layout.CONFIG).is_file() and not any(root.rglob(f"{layout.FINAL_SAE}/{layout.CONFIG}")):
        raise UserError(
            f"run folder {root} has no final SAE ({layout.FINAL_SAE}/ is missing): did training finish?"
        )
    found = sorted(p.parent for p in root.rglob(f"{layout.FINAL_SAE}/{layout.CONFIG}"))
    targets = [TargetSAE(d, d.parent, d.parent.relative_to(root).as_posix()) for d in found if _is_sae_dir(d)]
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


def store_path(target: TargetSAE, meta: dict) -> Path:
    store = meta.get("store")
    if store is None and (target.run_dir / layout.CONFIG).is_file():
        store = _read_json(target.run_dir / layout.CONFIG).get("store")
    if not store:
        raise UserError(
            f"{target.sae_dir / layout.CONFIG} does not say which store trained it (no 'store' key)."
        )
    return store if is_url(store) else Path(store)  # a URL stays a string (data/remote.py reads it)


@dataclass
class Spec:
    """What evaluating one SAE needs besides the SAE: model, hook, text."""

    meta: dict
    store: Path
    manifest: dict
    model_cfg: dict
    hook_name: str
    source: dict | None = None  # an SAE not trained here: its text settings (data, context_size, ...)

    @property
    def model_key(self) -> str:
        return json.dumps(self.model_cfg, sort_keys=True, default=str)


def _outside_spec(target: TargetSAE, source) -> Spec:
    """Model, hook and text of an SAE not trained here: the `source` keys, else its own cfg.json."""
    src = OmegaConf.to_container(source, resolve=True) if OmegaConf.is_config(source) else dict(source or {})
    meta, _ = training_metadata(target.sae_dir)
    model = src.get("model") or meta.get("model_name")
    hook = src.get("hook") or meta.get("hook_name")
    if not model or not hook:
        raise UserError(
            f"{target.sae_dir} was not trained here and does not name its {'model' if not model else 'hook'}; "
            "pass source.model=<hub id or folder> source.hook=<hook name, e.g. blocks.8.hook_resid_pre>."
        )
    data = src.get("data")
    if data is None and meta.get("dataset_path"):
        data = _data_from_path(str(meta["dataset_path"]))
    model_cfg = {"name": model, "dtype": src.get("model_dtype") or "float32"}
    model_cfg["trust_remote_code"] = bool(src.get("trust_remote_code", False))
    context_size = int(src.get("context_size") or meta.get("context_size") or 128)
    prepend_bos = src.get("prepend_bos")
    prepend_bos = bool(meta.get("prepend_bos", True) if prepend_bos is None else prepend_bos)
    manifest = {
        "model": model_cfg,
        "hook": {"name": hook},
        "context_size": context_size,
        "bos": {"prepended": prepend_bos},
        "dataset": {"config": data},
    }
    text_cfg = {
        "data": data,
        "seed": int(src.get("seed", 0)),
        "context_size": context_size,
        "prepend_bos": prepend_bos,
    }
    if target.kind == "bare":  # what a bare file cannot say about itself
        text_cfg["bare_options"] = {
            "k": src.get("k"),
            "apply_b_dec_to_input": bool(src.get("apply_b_dec_to_input", True)),
        }
    return Spec({"sae": {}, "cfg_json": meta}, None, manifest, model_cfg, hook, text_cfg)


def _dataset_path(data_cfg: dict) -> str | None:
    """SAELens's dataset_path for our data config: a builder's (json, text...) own file, else the name."""
    files = data_cfg.get("data_files")
    if data_cfg.get("name") in set(text.BUILDER_BY_SUFFIX.values()) and files:
        return str(files if isinstance(files, str) else list(files)[0])
    return data_cfg.get("name")


def _data_from_path(path: str) -> dict:
    """Our data config for a cfg.json dataset_path: a local text file by its extension, else a streamed name."""
    if Path(path).is_file() and Path(path).suffix in text.BUILDER_BY_SUFFIX:
        return {"name": text.BUILDER_BY_SUFFIX[Path(path).suffix], "data_files": path}
    return {"name": path, "streaming": not Path(path).exists() and not path.startswith("embedded:")}


def heldout_text(spec: Spec, tokenizer, n_tokens: int):
    """(input_ids, valid mask, description) of the held-out text an SAE is evaluated / browsed on."""
    if spec.source is None:
        ids, mask = text.heldout_contexts(spec.manifest, tokenizer, n_tokens)
        return ids, mask, {"source": "store held-out documents", "store": str(spec.store)}
    src = spec.source
    if src["data"] is None:
        raise UserError(
            "the SAE was not trained here and its cfg.json names no dataset; pass "
            "source.data={name:json,data_files:/path/to/text.jsonl} (or any dataset) to choose the text."
        )
    data = eval_data_config(src["data"])
    ids, mask = text.contexts_for_data(
        data, tokenizer, "eval", src["context_size"], src["prepend_bos"], n_tokens, src["seed"]
    )
    return ids, mask, {"source": "source.data held-out documents", "data": data, "seed": src["seed"]}


def load_spec(target: TargetSAE, source=None) -> Spec:
    if target.kind != "native":
        return _outside_spec(target, source)
    meta = _read_json(target.sae_dir / layout.CONFIG)
    store = store_path(target, meta)
    manifest = read_manifest(store)
    model_cfg = meta.get("model") or manifest["model"]
    hook = meta.get("hook") or manifest["hook"]
    hook_name = hook["name"] if isinstance(hook, dict) else str(hook)
    return Spec(meta, store, manifest, dict(model_cfg), hook_name)


def load_target_sae(target: TargetSAE, spec: Spec, device) -> SAE:
    """The SAE of target in eval mode (a bare file read with the source group's k / apply_b_dec_to_input)."""
    options = (spec.source or {}).get("bare_options") or {}
    return read_sae(target.sae_dir, map_location=device, **options).eval()


def check_matches_store(sae: SAE, target: TargetSAE, spec: Spec) -> None:
    """The SAE must take the activations its store holds."""
    d_store = spec.manifest.get("d_in", sae.d_in)
    if sae.d_in != d_store:
        raise UserError(
            f"the SAE in {target.sae_dir} has d_in={sae.d_in} but its store {spec.store} has d_in={d_store}."
        )


def single_target(sae_path: str, source=None) -> tuple[TargetSAE, Spec]:
    """The one SAE at sae_path (a run folder or an SAE folder) and what it was trained on."""
    target, _ = single_target_only(Path(sae_path))
    return target, load_spec(target, source)


def load_all(sae_path: str, device_name: str, source=None):
    """(target, spec, model, tokenizer, sae, hook point) for the SAE at sae_path."""
    target, spec = single_target(sae_path, source)
    device = resolve_device(device_name)
    sae = load_target_sae(target, spec, device).requires_grad_(False)
    model, tokenizer = load_model(spec.model_cfg, device)
    if tokenizer is None:
        raise UserError(
            f"the SAE in {target.sae_dir} was trained on a model=torch_module store; this command needs a language model"
        )
    if spec.source is not None and spec.source["prepend_bos"]:
        spec.manifest["bos"]["token_id"] = text.bos_token_id(tokenizer, True)
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
        return {k: cfg[k] for k in RUN_META_KEYS if cfg.get(k) is not None}, folder
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
            dataset_path=_dataset_path(man.get("dataset", {}).get("config", {})),
        )
    return {k: v for k, v in out.items() if v is not None}, target.run_dir


def single_target_only(sae_path: Path) -> tuple[TargetSAE, bool]:
    targets, is_sweep = find_targets(Path(sae_path))
    if len(targets) != 1:
        raise UserError(
            f"sae_path {sae_path} holds {len(targets)} SAEs; point it at one run folder (e.g. {targets[0].run_dir})."
        )
    return targets[0], is_sweep
