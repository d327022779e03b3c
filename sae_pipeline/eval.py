"""sae-eval: score SAEs by splicing them into their model on held-out text.

    sae-eval sae_path=runs/train/<run>                      # one run (or its sae/ folder)
    sae-eval sae_path=runs/sweeps/<multirun> eval.n_tokens=32768 logger=none
    sae-eval sae_path=... 'eval.data={name:json,data_files:/data/other.jsonl}'

Each SAE's store manifest names the model, hook and text; the evaluation text is the store's held-out
documents (harvest never saw them), packed the same way. Writes <run>/eval/metrics.json and
<run>/eval/feature_density.png, logs to W&B (offline without an account) and prints one line per SAE.
On a folder of many runs it also writes sweep.csv / sweep.md and the L0 Pareto plots there.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from sae_pipeline import metrics as M
from sae_pipeline import paths, sweep, text
from sae_pipeline.config import register_configs
from sae_pipeline.errors import UserError, report_user_errors
from sae_pipeline.eval_config import check_eval_config, eval_data_config
from sae_pipeline.evaluate import SpliceEvaluator
from sae_pipeline.hooks import resolve_hook
from sae_pipeline.models import load_model, resolve_device
from sae_pipeline.runlog import wandb_mode
from sae_pipeline.sae import load_sae
from sae_pipeline.store import read_manifest, sha256_file, write_json_atomic


@dataclass
class Target:
    """One SAE to evaluate: its folder, the run folder it belongs to and where its eval goes."""

    sae_dir: Path
    run_dir: Path
    name: str

    @property
    def eval_dir(self) -> Path:
        return self.run_dir / paths.EVAL


def _is_sae_dir(p: Path) -> bool:
    return (p / paths.SAE_CONFIG).is_file() and (p / paths.SAE_WEIGHTS).is_file()


def find_targets(root: Path) -> tuple[list[Target], bool]:
    """Every SAE at or below root, and whether root is a folder of many runs (a sweep)."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"sae_path {root} does not exist.")
    if _is_sae_dir(root):  # an SAE folder: the run folder is its parent when that holds the run config
        run_dir = root.parent if (root.parent / paths.RUN_CONFIG).is_file() else root
        return [Target(root, run_dir, run_dir.name)], False
    if _is_sae_dir(root / paths.FINAL_SAE):
        return [Target(root / paths.FINAL_SAE, root, root.name)], False
    if (root / paths.RUN_CONFIG).is_file() and not any(root.rglob(f"{paths.FINAL_SAE}/{paths.SAE_CONFIG}")):
        raise UserError(
            f"run folder {root} has no final SAE ({paths.FINAL_SAE}/ is missing): did training finish?"
        )
    found = sorted(p.parent for p in root.rglob(f"{paths.FINAL_SAE}/{paths.SAE_CONFIG}"))
    targets = [Target(d, d.parent, d.parent.relative_to(root).as_posix()) for d in found if _is_sae_dir(d)]
    if not targets:
        raise UserError(
            f"no SAE found under {root}: no {paths.FINAL_SAE}/{paths.SAE_CONFIG} with {paths.SAE_WEIGHTS} below it."
        )
    return targets, True


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {path} ({err}).") from None


def _store_path(target: Target, meta: dict) -> Path:
    store = meta.get("store")
    if store is None and (target.run_dir / paths.RUN_CONFIG).is_file():
        store = _read_json(target.run_dir / paths.RUN_CONFIG).get("store")
    if isinstance(store, dict):
        store = store.get("path") or store.get("folder")
    if not store:
        raise UserError(
            f"{target.sae_dir / paths.SAE_CONFIG} does not say which store trained it (no 'store' key)."
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
    meta = _read_json(target.sae_dir / paths.SAE_CONFIG)
    store = _store_path(target, meta)
    manifest = read_manifest(store)
    model_cfg = meta.get("model") or manifest["model"]
    hook = meta.get("hook") or manifest["hook"]
    hook_name = hook["name"] if isinstance(hook, dict) else str(hook)
    return Spec(meta, store, manifest, dict(model_cfg), hook_name)


def eval_tokens(cfg: DictConfig, spec: Spec, tokenizer) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(input_ids, valid mask, description of the text) for this SAE's evaluation."""
    e, man = cfg.eval, spec.manifest
    if e.data is None:
        ids, mask = text.heldout_contexts(man, tokenizer, e.n_tokens)
        heldout = man.get("dataset", {}).get("heldout", {})
        desc = {
            "source": "store held-out documents",
            "store": str(spec.store),
            "dataset": man.get("dataset", {}).get("config", {}).get("name"),
            "eval_split": heldout.get("eval_split"),
            "documents": heldout.get("eval_titles") or heldout.get("eval_indices"),
        }
    else:
        data = eval_data_config(e.data)
        context_size = e.context_size or man["context_size"]
        prepend_bos = bool(man.get("bos", {}).get("prepended", True))
        ids, mask = text.contexts_for_data(
            data, tokenizer, e.data_split, context_size, prepend_bos, e.n_tokens, e.seed
        )
        desc = {"source": "eval.data override", "data": data, "split": e.data_split, "seed": e.seed}
    desc.update(context_size=int(ids.shape[1]), n_contexts=int(ids.shape[0]))
    return ids, mask, desc


def settings_fingerprint(cfg: DictConfig, target: Target, spec: Spec) -> dict:
    """What a metrics.json depends on besides the code: skip_existing compares this."""
    return {
        "definitions_version": M.DEFINITIONS_VERSION,
        "n_tokens_requested": int(cfg.eval.n_tokens),
        "data": OmegaConf.to_container(cfg.eval.data, resolve=True) if cfg.eval.data is not None else None,
        "data_split": cfg.eval.data_split,
        "seed": int(cfg.eval.seed),
        "store": str(spec.store),
        "sae_sha256": sha256_file(target.sae_dir / paths.SAE_WEIGHTS),
    }


def plot_density(metrics: dict, path: Path, title: str) -> Path:
    """Histogram of log10 latent firing frequency (dead latents counted in the title)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = metrics["log10_density_histogram"]
    edges, counts = h["edges"], h["counts"]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    widths = [b - a for a, b in zip(edges[:-1], edges[1:], strict=True)]
    ax.bar(edges[:-1], counts, width=widths, align="edge", edgecolor="black", linewidth=0.3)
    ax.axvline(-1.0, color="red", ls="--", lw=1, label=f"dense (> {M.DENSE_THRESHOLD:.0%})")
    lat = metrics["latents"]
    ax.set_title(
        f"{title}\n{lat['d_sae']} latents, {lat['dead']} dead, {lat['dense']} dense, {metrics['n_tokens']} tokens"
    )
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("latents")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary_line(name: str, m: dict) -> str:
    return (
        f"{name}: L0 {m['l0']:.2f} | FVU {m['fvu']:.4f} | loss recovered {m['loss_recovered']:.4f} | "
        f"CE {m['ce_increase']:+.4f} nats | KL {m['kl']:.4f} | dead {100 * m['latents']['dead_frac']:.1f}% | "
        f"{m['n_tokens']} tokens"
    )


SCALARS = (
    "l0", "fvu", "explained_variance", "mse_per_token", "mse_per_element", "cosine", "norm_ratio",
    "ce_clean", "ce_zero", "ce_mean", "ce_sae", "loss_recovered", "loss_recovered_mean", "ce_increase",
    "kl", "kl_zero", "kl_mean", "n_tokens",
)  # fmt: skip


def log_wandb(cfg: DictConfig, target: Target, metrics: dict, group: str | None) -> str | None:
    """One W&B run per SAE under <run>/eval/wandb (offline unless WANDB_API_KEY or logger.mode=online)."""
    lg = cfg.logger
    if not lg.wandb:
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    import wandb

    config = {
        "eval": OmegaConf.to_container(cfg.eval, resolve=True),
        "sae": metrics["sae"],
        "hook": metrics["hook"],
        "run": str(target.run_dir),
    }
    run = wandb.init(
        project=lg.project,
        entity=lg.entity,
        mode=wandb_mode(lg.mode),
        dir=str(target.eval_dir),
        name=lg.name or f"eval-{target.name}",
        group=lg.group or group,
        job_type="eval",
        tags=list(lg.tags),
        config=config,
        reinit="create_new",
        settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
    )
    try:
        flat = {f"eval/{k}": metrics[k] for k in SCALARS if k in metrics}
        flat.update({f"eval/{k}": v for k, v in metrics["latents"].items()})
        h = metrics["log10_density_histogram"]
        flat["eval/log10_density"] = wandb.Histogram(np_histogram=(h["counts"], h["edges"]))
        flat["eval/density_plot"] = wandb.Image(str(target.eval_dir / paths.DENSITY_PLOT))
        run.log(flat)
        return str(run.dir)
    finally:
        run.finish()


def evaluate_target(
    cfg, target: Target, spec: Spec, evaluator: SpliceEvaluator, desc: dict, device, group
) -> dict:
    sae = load_sae(target.sae_dir, map_location=device)
    hook = evaluator.hook
    if sae.d_in != spec.manifest.get("d_in", sae.d_in):
        raise UserError(
            f"the SAE in {target.sae_dir} has d_in={sae.d_in} but store {spec.store} has d_in={spec.manifest['d_in']}."
        )
    baseline_reused = evaluator.baseline is not None  # zero/mean-ablation CE measured for an earlier SAE
    started = time.perf_counter()
    m = evaluator.evaluate(sae)
    wall = time.perf_counter() - started
    m["sae"] = {"arch": sae.cfg.arch, "d_in": sae.d_in, "d_sae": sae.d_sae, "cfg": spec.meta.get("sae", {})}
    m.update(
        run=str(target.run_dir),
        sae_dir=str(target.sae_dir),
        hook=hook.name,
        model=spec.model_cfg,
        n_tokens_requested=int(cfg.eval.n_tokens),
        eval_data=desc,
        baseline_reused=baseline_reused,
        wall_s=round(wall, 3),
        tokens_per_s=round(m["n_tokens"] / wall, 1) if wall > 0 else None,
        device=str(device),
        settings=settings_fingerprint(cfg, target, spec),
        definitions=M.DEFINITIONS,
    )
    target.eval_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(target.eval_dir / paths.METRICS, m)
    plot_density(m, target.eval_dir / paths.DENSITY_PLOT, f"{target.name} ({sae.cfg.arch})")
    log_wandb(cfg, target, m, group)
    if m["n_tokens"] < cfg.eval.n_tokens:
        print(
            f"warning: {target.name}: only {m['n_tokens']} of {cfg.eval.n_tokens} tokens available",
            file=sys.stderr,
        )
    return m


def _existing(cfg, target: Target, spec: Spec) -> dict | None:
    path = target.eval_dir / paths.METRICS
    if not (cfg.eval.skip_existing and path.is_file()):
        return None
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return old if old.get("settings") == settings_fingerprint(cfg, target, spec) else None


def run(cfg: DictConfig) -> dict:
    """Evaluate every SAE at or below cfg.sae_path; returns {"metrics": {name: metrics}, "sweep": paths|None}."""
    check_eval_config(cfg)
    root = Path(cfg.sae_path)
    targets, is_sweep = find_targets(root)
    device = resolve_device(cfg.eval.device)
    specs = {t.name: load_spec(t) for t in targets}
    group = root.resolve().name if is_sweep else None
    results: dict[str, dict] = {}
    for key in dict.fromkeys(s.model_key for s in specs.values()):  # one model load per distinct model
        batch = [t for t in targets if specs[t.name].model_key == key]
        model = tokenizer = None
        token_cache: dict[str, tuple] = {}
        evaluators: dict[tuple[str, str], SpliceEvaluator] = {}  # SAEs at one hook share the baselines
        for t in batch:
            spec = specs[t.name]
            old = _existing(cfg, t, spec)
            if old is not None:
                results[t.name] = old
                print(summary_line(t.name, old) + " (kept)")
                continue
            if model is None:
                model, tokenizer = load_model(spec.model_cfg, device)
            m = spec.manifest  # stores of one harvest (several hooks) share their held-out text
            tkey = json.dumps(
                [m.get("dataset"), m.get("context_size"), m.get("bos")], sort_keys=True, default=str
            )
            if tkey not in token_cache:
                token_cache[tkey] = eval_tokens(cfg, spec, tokenizer)
            ids, mask, desc = token_cache[tkey]
            if (tkey, spec.hook_name) not in evaluators:
                hook = resolve_hook(model, spec.hook_name)
                evaluators[tkey, spec.hook_name] = SpliceEvaluator(
                    model, hook, ids, mask, cfg.eval.batch_size, reuse_prefix=cfg.eval.reuse_prefix
                )
            evaluator = evaluators[tkey, spec.hook_name]
            results[t.name] = evaluate_target(cfg, t, spec, evaluator, desc, device, group)
            print(summary_line(t.name, results[t.name]), flush=True)
        del model, token_cache, evaluators
    swept = None
    if is_sweep and cfg.eval.sweep:
        swept = {k: str(v) for k, v in sweep.write_sweep(root).items()}
        print(f"sweep of {len(results)} runs: {swept['md']}, {swept['loss_plot']}, {swept['fvu_plot']}")
    return {"metrics": results, "sweep": swept}


register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
@report_user_errors  # inside hydra.main, so a UserError is one line instead of Hydra's traceback
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
