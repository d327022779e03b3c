"""Scoring one SAE for `sae-eval` and writing what it found: metrics.json, the density plot, W&B, one line.

The evaluation text is the store's held-out documents (harvest never saw them), packed the same way, or
the `eval.data` override. `settings_fingerprint` records what a metrics.json depends on, so
`eval.skip_existing` keeps only results made with the same settings.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from sae_pipeline import layout
from sae_pipeline.data import text
from sae_pipeline.errors import UserError
from sae_pipeline.evaluation import card as C
from sae_pipeline.evaluation import metrics as M
from sae_pipeline.evaluation import task
from sae_pipeline.evaluation.benchmarks import Benchmarks
from sae_pipeline.evaluation.scorer import store_scorer
from sae_pipeline.evaluation.splice import SpliceEvaluator
from sae_pipeline.files import sha256_file, write_json_atomic
from sae_pipeline.runs import Spec, TargetSAE, check_matches_store, heldout_text, load_target_sae
from sae_pipeline.schema.eval import eval_data_config
from sae_pipeline.tracking import start_wandb, training_wandb


def eval_tokens(cfg: DictConfig, spec: Spec, tokenizer) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(input_ids, valid mask, description of the text) for this SAE's evaluation."""
    e, man = cfg.eval, spec.manifest
    if e.data is None and spec.source is not None:  # an SAE not trained here: the source group's text
        ids, mask, desc = heldout_text(spec, tokenizer, e.n_tokens)
    elif e.data is None:
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


def settings_fingerprint(cfg: DictConfig, target: TargetSAE, spec: Spec) -> dict:
    """What a metrics.json depends on besides the code: skip_existing compares this."""
    return {
        "definitions_version": M.DEFINITIONS_VERSION,
        "n_tokens_requested": int(cfg.eval.n_tokens),
        "data": OmegaConf.to_container(cfg.eval.data, resolve=True) if cfg.eval.data is not None else None,
        "data_split": cfg.eval.data_split,
        "seed": int(cfg.eval.seed),
        "store": str(spec.store),
        "source": spec.source,
        "sae_sha256": sha256_file(target.weights_file),
        "benchmarks": _benchmark_settings(cfg.eval),
    }


def _benchmark_settings(e) -> dict | None:
    """The settings absorption and sparse probing depend on (None when neither runs)."""
    if not (e.absorption or e.probe_tasks):
        return None
    keys = (
        "absorption",
        "absorption_method",
        "absorption_words",
        "absorption_examples",
        "absorption_min_words",
        "probe_tasks",
        "probe",
    )
    return {
        k: OmegaConf.to_container(e[k], resolve=True) if OmegaConf.is_config(e[k]) else e[k] for k in keys
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


def benchmark_lines(name: str, m: dict) -> list[str]:
    """The absorption and sparse-probing results in a few printed lines (none when not computed)."""
    lines = []
    a = m.get("absorption")
    if a is not None and a["n_letters_scored"]:
        lines.append(
            f"{name} absorption (first letter): mean fraction {a['mean_absorption_fraction_score']:.4f} | "
            f"full absorption {a['mean_full_absorption_score']:.4f} | split latents {a['mean_num_split_features']:.2f} | "
            f"probe F1 {a['mean_probe_f1']:.3f} | {a['n_letters_scored']} letters, {a['n_words']} words"
            + (
                f" (SAEBench reports from {C.GATE.saebench_min_letters} letters with probe F1 > {C.GATE.min_probe_f1})"
                if a.get("saebench_would_report") is False
                else ""
            )
        )
    elif a is not None:
        lines.append(
            f"{name} absorption (first letter): no letter scored ({len(a['skipped_letters'])} skipped)"
        )
    for t, r in (m.get("sparse_probing") or {}).items():
        sec = C.probing_section(r)
        ks = " ".join(
            f"k{k.split('_')[2]}={v:.3f}" for k, v in sec["sae"].items() if k.startswith("sae_top_")
        )
        lines.append(
            f"{name} sparse probing {t} (accuracy): dense {sec['llm']['llm_test_accuracy']:.3f} | "
            f"all latents {sec['sae']['sae_test_accuracy']:.3f} | {ks}"
        )
    return lines


def summary_line(name: str, m: dict) -> str:
    if "task_loss" in m:  # a torch_module's task (evaluation/task.py)
        return task.summary_line(name, m)
    tc = m.get("transcoder")
    if tc:  # FVU and the splice are those of the target hook
        name = f"{name} (transcoder {tc['input_hook']} -> {tc['target_hook']})"
    return (
        f"{name}: L0 {m['l0']:.2f} | FVU {m['fvu']:.4f} | loss recovered {m['loss_recovered']:.4f} | "
        f"CE {m['ce_increase']:+.4f} nats | KL {m['kl']:.4f} | dead {100 * m['latents']['dead_frac']:.1f}% | "
        f"{m['n_tokens']} tokens"
    )


SCALARS = (
    "l0", "fvu", "explained_variance", "mse_per_token", "mse_per_element", "cosine", "norm_ratio",
    "ce_clean", "ce_zero", "ce_mean", "ce_sae", "loss_recovered", "loss_recovered_mean", "ce_increase",
    "kl", "kl_zero", "kl_mean", "n_tokens",
    "loss_clean", "loss_zero", "loss_sae", "accuracy_clean", "accuracy_zero", "accuracy_mean", "accuracy_sae",
)  # fmt: skip


def _trained_with(target: TargetSAE) -> dict | None:
    """The W&B run that trained target (from its run's config.json), or None."""
    try:
        record = json.loads((target.run_dir / layout.CONFIG).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    found = training_wandb(record)
    if found is not None:
        train = record["config"].get("train") or {}
        found["last_step"] = max(
            1, int(train.get("total_tokens", 0)) // max(1, int(train.get("batch_size", 1)))
        )
    return found


def log_wandb(cfg: DictConfig, target: TargetSAE, metrics: dict, group: str | None) -> str | None:
    """The metrics in W&B: written into the run that trained the SAE when it logged to W&B (resumed by the
    id in its config.json, under <run>/wandb), else a new `eval` run in the trainer's group (or the run
    folder's name) under <run>/eval/wandb. Offline unless WANDB_API_KEY or logger.mode=online."""
    lg = cfg.logger
    if not lg.wandb:
        return None
    import wandb

    config = {"eval": OmegaConf.to_container(cfg.eval, resolve=True), "eval_data": metrics["eval_data"]}
    trained = _trained_with(target)
    if trained is not None:
        run = start_wandb(lg, target.run_dir, lg.name or trained["name"], lg.group or trained["group"], config,
                          id=trained["id"], resume="allow")  # fmt: skip
        step = trained["last_step"] + 1  # after the training steps: W&B drops rows logged at earlier steps
    else:
        config.update(sae=metrics["sae"], hook=metrics["hook"], run=str(target.run_dir))
        name = lg.name or f"eval-{target.name}"
        run = start_wandb(
            lg, target.eval_dir, name, lg.group or group or target.run_dir.name, config, job_type="eval"
        )
        step = None
    try:
        flat = {f"eval/{k}": metrics[k] for k in SCALARS if k in metrics}
        flat.update({f"eval/{k}": v for k, v in metrics["latents"].items()})
        flat.update(_benchmark_scalars(metrics))
        run.summary.update(flat)
        h = metrics["log10_density_histogram"]
        flat["eval/log10_density"] = wandb.Histogram(np_histogram=(h["counts"], h["edges"]))
        flat["eval/density_plot"] = wandb.Image(str(target.eval_dir / layout.DENSITY_PLOT))
        run.log(flat, step=step)
        return str(run.dir)
    finally:
        run.finish()


def _benchmark_scalars(m: dict) -> dict:
    """eval/absorption/* and eval/sparse_probing/<task>/* in SAEBench's names, for W&B."""
    out = {}
    a = m.get("absorption")
    if a is not None:
        for k, v in C.absorption_section(a)["mean"].items():
            out[f"eval/absorption/{k}"] = v
        out["eval/absorption/mean_probe_f1"] = a["mean_probe_f1"]
        out["eval/absorption/n_letters_scored"] = a["n_letters_scored"]
        for letter, e in a["letters"].items():
            out[f"eval/absorption/letters/{letter}/mean_absorption_fraction"] = e["mean_absorption_fraction"]
            out[f"eval/absorption/letters/{letter}/full_absorption_rate"] = e["full_absorption_rate"]
            out[f"eval/absorption/letters/{letter}/probe_f1"] = e["probe_f1"]
    for t, r in (m.get("sparse_probing") or {}).items():
        for cat in C.probing_section(r).values():
            out.update({f"eval/sparse_probing/{t}/{k}": v for k, v in cat.items()})
    return {k: v for k, v in out.items() if v is not None}


def evaluator_for(
    cfg: DictConfig, target: TargetSAE, spec: Spec, model, tokenizer, token_cache: dict, evaluators: dict
):
    """(the scorer for this SAE, its text's description), built once per held-out text and hook pair.

    Stores of one harvest (several hooks) share their held-out text; a transcoder is spliced at its
    target hook from its input hook; a torch_module store (no tokenizer) is scored by its task's own loss."""
    m = spec.manifest
    tkey = json.dumps([m.get("dataset"), m.get("context_size"), m.get("bos")], sort_keys=True, default=str)
    hooks = (spec.hook_name, spec.meta.get("target_hook"))
    if tokenizer is None and hooks[1]:
        raise UserError(
            f"{target.sae_dir} is a transcoder on a model=torch_module store; sae-eval scores only SAEs there"
        )
    if (tkey, hooks) not in evaluators:

        def heldout():
            if tokenizer is None:  # a torch module's examples, loaded again for each hook pair
                examples, token_cache[tkey] = task.heldout_task_examples(m, cfg.eval)
                return examples
            if tkey not in token_cache:
                token_cache[tkey] = eval_tokens(cfg, spec, tokenizer)
            return token_cache[tkey][:2]

        evaluators[tkey, hooks] = store_scorer(
            model,
            tokenizer,
            *hooks,
            cfg.eval.batch_size,
            heldout,
            reuse_prefix=cfg.eval.advanced.reuse_prefix,
        )
    desc = token_cache[tkey] if tokenizer is None else token_cache[tkey][2]
    return evaluators[tkey, hooks], desc


def evaluate_target(
    cfg,
    target: TargetSAE,
    spec: Spec,
    evaluator: SpliceEvaluator,
    desc: dict,
    device,
    group,
    bench: Benchmarks | None = None,
) -> dict:
    sae = load_target_sae(target, spec, device)
    hook = evaluator.hook
    check_matches_store(sae, target, spec)
    baseline_reused = evaluator.baseline is not None  # zero/mean-ablation CE measured for an earlier SAE
    started = time.perf_counter()
    m = evaluator.evaluate(sae)
    wall = time.perf_counter() - started
    if bench is not None and bench.wanted:
        started = time.perf_counter()
        m.update(bench.run(sae, spec, hook, transcoder=evaluator.source is not None))
        m["benchmarks_wall_s"] = round(time.perf_counter() - started, 3)
    m["sae"] = {"arch": sae.cfg.arch, "d_in": sae.d_in, "d_sae": sae.d_sae, "cfg": spec.meta.get("sae", {})}
    if evaluator.source is not None:  # the FVU, MSE and splice above are of the target hook
        m["sae"]["d_out"] = sae.d_out
        m["transcoder"] = {
            "input_hook": evaluator.source.name,
            "target_hook": hook.name,
            "skip": bool(getattr(sae.cfg, "skip", False)),
        }
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
    write_json_atomic(target.eval_dir / layout.METRICS, m)
    plot_density(m, target.eval_dir / layout.DENSITY_PLOT, f"{target.name} ({sae.cfg.arch})")
    card = C.build_card(m, C.read_explain_summary(target.run_dir))
    C.write_card(card, target.eval_dir, f"{target.name}: SAE card")
    log_wandb(cfg, target, m, group)
    if (
        m["n_tokens"] < cfg.eval.n_tokens and "task_loss" not in m
    ):  # a torch_module: all its held-out examples
        print(
            f"warning: {target.name}: only {m['n_tokens']} of {cfg.eval.n_tokens} tokens available",
            file=sys.stderr,
        )
    return m


def existing_metrics(cfg, target: TargetSAE, spec: Spec) -> dict | None:
    path = target.eval_dir / layout.METRICS
    if not (cfg.eval.skip_existing and path.is_file()):
        return None
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return old if old.get("settings") == settings_fingerprint(cfg, target, spec) else None
