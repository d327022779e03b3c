"""sae-probe: are an SAE's latents useful for prediction? Sparse probing against dense baselines.

    sae-probe sae_path=runs/demo/topk                          # genre of the play (First Folio), per context
    sae-probe sae_path=runs/demo/topk probe_task=speaker       # token: speaker heading vs spoken text
    sae-probe sae_path=runs/demo/topk probe_task=play          # which held-out play, per context
    sae-probe sae_path=... probe_task=files probe.data_files=data.csv probe.label_column=label
    sae-probe -m sae_path=runs/demo/topk probe_task=genre,play,speaker logger=none

For each SAE (one run, or every run of a sweep folder): labelled documents are cut into contexts packed
like the store (BOS policy, context size), whole documents are split into probe-train and probe-test, the
model runs to the hook, and logistic probes are fit on the dense activations, on all latents and on the k
latents ranked best on probe-train (difference of class means). Sequence tasks pool over tokens (mean, max;
BOS excluded), token tasks use each token's row. Writes <run>/probe/<task>/{metrics.json, probe.md,
probe_vs_k.png} with bootstrap 95% intervals, and a W&B run per SAE (logger=none turns it off).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from sae_pipeline import layout, locks
from sae_pipeline.errors import UserError, report_config_errors, report_user_errors
from sae_pipeline.interpret.probe_report import log_wandb, prepare_task, probe_sae, write_report
from sae_pipeline.model.hook_points import resolve_hook
from sae_pipeline.model.loading import load_model
from sae_pipeline.runs import check_matches_store, find_targets, load_spec
from sae_pipeline.runtime import resolve_device
from sae_pipeline.sae import read_sae
from sae_pipeline.schema import register_configs
from sae_pipeline.schema.probe import check_probe_config


def run(cfg: DictConfig) -> dict[str, dict]:
    """Probe every SAE at or below cfg.sae_path on cfg.probe's task; returns {run name: report}."""
    check_probe_config(cfg)
    p = cfg.probe
    root = Path(cfg.sae_path)
    targets, is_sweep = find_targets(root)
    device = resolve_device(p.device)
    specs = {t.name: load_spec(t) for t in targets}
    group = root.resolve().name if is_sweep else None
    loaded: dict[str, tuple] = {}  # one model at a time
    tasks: dict[str, object] = {}  # SAEs at one hook of one store share contexts and dense activations
    reports = {}
    for t in sorted(targets, key=lambda t: specs[t.name].model_key):
        spec = specs[t.name]
        if spec.model_key not in loaded:
            loaded = {spec.model_key: load_model(spec.model_cfg, device)}
            tasks = {}
        model, tokenizer = loaded[spec.model_key]
        if tokenizer is None:
            raise UserError(
                f"the SAE in {t.sae_dir} was trained on a model=torch_module store; sae-probe needs a language model"
            )
        m = spec.manifest
        key = json.dumps([spec.hook_name, m.get("dataset"), m.get("context_size"), m.get("bos")], default=str)
        if key not in tasks:
            tasks[key] = prepare_task(p, spec, model, tokenizer, resolve_hook(model, spec.hook_name))
        sae = read_sae(t.sae_dir, map_location=device).eval().requires_grad_(False)
        check_matches_store(sae, t, spec)
        report = probe_sae(tasks[key], sae, p)
        report.update(run=str(t.run_dir), sae={"arch": sae.cfg.arch, "d_in": sae.d_in, "d_sae": sae.d_sae},
                      hook=spec.hook_name, store=str(spec.store))  # fmt: skip
        out_dir = Path(p.out_dir) / t.name if p.out_dir else layout.probe_dir(t.run_dir, p.task)
        with locks.hold(out_dir, "the probe folder", "rerun it when that one has ended"):
            write_report(report, out_dir, f"{t.name}: {p.task} ({spec.hook_name})")
            log_wandb(cfg.logger, out_dir, t.name, report, group)
        reports[t.name] = report
        print(_summary(t.name, report, out_dir), file=sys.stderr, flush=True)
    return reports


def _summary(name: str, report: dict, out_dir: Path) -> str:
    parts = []
    for pool, res in report["results"].items():
        ks = " ".join(f"k{k}={e['balanced_accuracy']:.2f}" for k, e in res["sae_k"].items())
        parts.append(
            f"[{pool}] dense={res['dense']['balanced_accuracy']:.2f} all={res['sae_all']['balanced_accuracy']:.2f} {ks}"
        )
    return (
        f"{name} {report['task']} balanced accuracy: {'; '.join(parts)} -> {out_dir / layout.PROBE_TABLE_MD}"
    )


register_configs()


@report_config_errors  # outside hydra.main: an override it cannot compose is one line too
@hydra.main(version_base="1.3", config_path="conf", config_name="probe")
@report_user_errors  # inside hydra.main, so a UserError is one line instead of Hydra's traceback
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
