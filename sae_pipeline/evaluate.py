"""sae-eval: score SAEs by splicing them into their model on held-out text.

    sae-eval sae_path=runs/train/<run>                      # one run (or its sae/ folder)
    sae-eval sae_path=runs/sweeps/<multirun> eval.n_tokens=32768 logger=none
    sae-eval sae_path=... 'eval.data={name:json,data_files:/data/other.jsonl}'

Each SAE's store manifest names the model, hook and text; the evaluation text is the store's held-out
documents (harvest never saw them), packed the same way; for model=torch_module it is the store's
held-out examples, and loss recovered is the task's own loss (cross-entropy and accuracy with labels). Writes <run>/eval/metrics.json and
<run>/eval/feature_density.png and the SAE's card (card.json, card.md: the metrics in SAEBench's names),
logs to W&B (offline without an account) and prints one line per SAE.
With eval.absorption=true it adds feature absorption on the first-letter task, with
eval.probe_tasks=[genre,speaker] sae-probe's sparse probing, to metrics.json, the card, W&B and the lines:

    sae-eval sae_path=runs/demo/topk eval.absorption=true 'eval.probe_tasks=[genre,speaker]'
On a folder of many runs it also writes sweep.csv / sweep.md and the L0 Pareto plots there.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from sae_pipeline import locks
from sae_pipeline.errors import report_config_errors, report_user_errors
from sae_pipeline.evaluation import sweep
from sae_pipeline.evaluation.benchmarks import Benchmarks
from sae_pipeline.evaluation.report import (
    benchmark_lines,
    evaluate_target,
    evaluator_for,
    existing_metrics,
    summary_line,
)
from sae_pipeline.model.loading import load_model
from sae_pipeline.runs import find_targets, load_spec
from sae_pipeline.runtime import resolve_device
from sae_pipeline.schema import register_configs
from sae_pipeline.schema.eval import check_eval_config


def run(cfg: DictConfig) -> dict:
    """Evaluate every SAE at or below cfg.sae_path; returns {"metrics": {name: metrics}, "sweep": paths|None}."""
    check_eval_config(cfg)
    root = Path(cfg.sae_path)
    targets, is_sweep = find_targets(root)
    device = resolve_device(cfg.eval.device)
    specs = {t.name: load_spec(t, cfg.source) for t in targets}
    group = root.resolve().name if is_sweep else None
    results: dict[str, dict] = {}
    for key in dict.fromkeys(s.model_key for s in specs.values()):  # one model load per distinct model
        batch = [t for t in targets if specs[t.name].model_key == key]
        model = tokenizer = bench = None
        token_cache: dict[str, tuple] = {}
        evaluators: dict[tuple, object] = {}  # SAEs at one hook share the baselines
        for t in batch:
            spec = specs[t.name]
            old = existing_metrics(cfg, t, spec)
            if old is not None:
                results[t.name] = old
                print(summary_line(t.name, old) + " (kept)")
                continue
            if model is None:
                model, tokenizer = load_model(spec.model_cfg, device)
                bench = Benchmarks(cfg.eval, model, tokenizer)
            with locks.hold(t.eval_dir, "the evaluation folder", "evaluate it afterwards"):
                evaluator, desc = evaluator_for(cfg, t, spec, model, tokenizer, token_cache, evaluators)
                results[t.name] = evaluate_target(cfg, t, spec, evaluator, desc, device, group, bench)
            print(summary_line(t.name, results[t.name]), flush=True)
            for line in benchmark_lines(t.name, results[t.name]):
                print(line, flush=True)
        del model, token_cache, evaluators, bench
    swept = None
    if is_sweep and cfg.eval.sweep:
        swept = {k: str(v) for k, v in sweep.write_sweep(root).items()}
        print(f"sweep of {len(results)} runs: {swept['md']}, {swept['loss_plot']}, {swept['fvu_plot']}")
    return {"metrics": results, "sweep": swept}


register_configs()


@report_config_errors  # outside hydra.main: an override it cannot compose is one line too
@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
@report_user_errors  # inside hydra.main, so a UserError is one line instead of Hydra's traceback
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
