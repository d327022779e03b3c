"""One probing task for one SAE, end to end: labelled contexts, activations, probes, report files, W&B.

task = prepare_task(p_cfg, spec, model, tokenizer, hook)    # shared by every SAE at one hook of one store
report = probe_sae(task, sae, p_cfg)                        # the numbers
write_report(report, out_dir)                               # metrics.json, probe.md, probe_vs_k.png
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from torch import Tensor

from sae_pipeline import layout
from sae_pipeline.errors import UserError
from sae_pipeline.files import write_json_atomic, write_text_atomic
from sae_pipeline.interpret import probe_tasks, probing
from sae_pipeline.tracking import start_wandb


@dataclass
class Task:
    ctx: probe_tasks.Contexts
    acts_NTD: Tensor
    split: probing.Split
    token_task: bool
    source: str  # where the documents came from, in words


def prepare_task(p_cfg, spec, model, tokenizer, hook) -> Task:
    """Documents -> contexts (the store's packing policy) -> document split -> dense activations at the hook."""
    m = spec.manifest
    token_task = p_cfg.task in probe_tasks.TOKEN_TASKS
    if p_cfg.task == "files":
        docs, source = probe_tasks.file_documents(p_cfg), f"probe.data_files={p_cfg.data_files}"
    else:
        docs, source = (
            probe_tasks.store_documents(p_cfg, m),
            f"the store's text ({m['dataset']['config'].get('name')})",
        )
    bos_id = m["bos"]["token_id"] if m["bos"]["prepended"] else None
    size = int(p_cfg.context_size or m["context_size"])
    ctx = probe_tasks.build_contexts(docs, tokenizer, size, bos_id, int(p_cfg.contexts_per_doc), token_task)
    split = probing.split_groups(ctx, float(p_cfg.test_fraction), int(p_cfg.seed), token_task)
    acts = probing.dense_activations(model, hook, ctx, int(p_cfg.batch_size))
    return Task(ctx, acts, split, token_task, source)


def _side(task: Task, sae, side: str, p_cfg):
    """({pool: (dense, latents)}, labels, groups) of one side of the split."""
    ctx = task.ctx
    if task.token_task:
        rows = probing.token_rows(ctx, task.split, side, int(p_cfg.max_examples), int(p_cfg.seed))
        sets = probing.token_features(task.acts_NTD, rows, sae)
        y = ctx.token_label_NT[rows[:, 0], rows[:, 1]].numpy()
        g = np.array([ctx.group_N[i] for i in rows[:, 0].tolist()])
        return sets, y, g
    mask = task.split.mask(ctx.group_N, side)
    idx = np.flatnonzero(mask)
    sets = probing.sequence_features(task.acts_NTD[idx], ctx.valid_NT[idx], sae)
    return sets, ctx.label_N.numpy()[idx], np.array(ctx.group_N)[idx]


def _counts(y: np.ndarray, g: np.ndarray, classes: list[str]) -> dict:
    return {
        "examples": int(len(y)),
        "documents": int(len(np.unique(g))),
        "per_class": {c: int((y == i).sum()) for i, c in enumerate(classes)},
    }


def probe_sae(task: Task, sae, p_cfg) -> dict:
    """Every probe of the task for one SAE, with the split sizes and which documents the SAE saw."""
    classes = task.ctx.classes
    tr, y_tr, g_tr = _side(task, sae, "train", p_cfg)
    te, y_te, g_te = _side(task, sae, "test", p_cfg)
    for name, y in (("probe-train", y_tr), ("probe-test", y_te)):
        if len(np.unique(y)) < len(classes):
            missing = [c for i, c in enumerate(classes) if i not in set(y.tolist())]
            raise UserError(f"the {name} split has no example of class(es) {missing}; add documents.")
    results = probing.probe_all(tr, te, y_tr, g_tr, y_te, g_te, len(classes), p_cfg)
    seen = task.ctx.seen
    return {
        "format_version": 1,
        "task": p_cfg.task,
        "level": "token" if task.token_task else "sequence",
        "classes": classes,
        "source": task.source,
        "context_size": int(task.ctx.ids_NT.shape[1]),
        "splits": {"train": _counts(y_tr, g_tr, classes), "test": _counts(y_te, g_te, classes)},
        "documents": {"train": task.split.train_groups, "test": task.split.test_groups},
        "in_store_training_documents": {  # not held out by the store (its harvest may have read only some)
            side: sum(bool(seen.get(d)) for d in docs)
            for side, docs in (("train", task.split.train_groups), ("test", task.split.test_groups))
        },  # fmt: skip
        "settings": OmegaConf.to_container(p_cfg, resolve=True),
        "results": results,
    }


# ----------------------------------------------------------------------------- files


def _fmt(e: dict, m: str) -> str:
    lo, hi = e[f"{m}_ci"]
    return f"{e[m]:.3f} [{lo:.3f}, {hi:.3f}]"


def table_md(report: dict) -> str:
    """Markdown: one row per probe and pooling; balanced accuracy and AUROC with 95% intervals."""
    s = report["splits"]
    lines = [
        f"Task `{report['task']}` ({report['level']}-level, classes: {', '.join(report['classes'])}); "
        f"probe-train {s['train']['examples']} examples from {s['train']['documents']} documents, "
        f"probe-test {s['test']['examples']} examples from {s['test']['documents']} documents.",
        "",
        "| pooling | probe | features | balanced accuracy [95% CI] | AUROC [95% CI] | accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for pool, res in report["results"].items():
        rows = [("dense activations", res["dense"]), ("SAE, all latents", res["sae_all"])]
        rows += [(f"SAE, k={k}", e) for k, e in res["sae_k"].items()]
        for name, e in rows:
            n = e.get("n_features", len(e.get("latents", [])))
            lines.append(
                f"| {pool} | {name} | {n} | {_fmt(e, 'balanced_accuracy')} | {_fmt(e, 'auroc')} | {e['accuracy']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, (pool, res) in enumerate(report["results"].items()):
        color = f"C{i}"
        ks = [int(k) for k in res["sae_k"]]
        es = list(res["sae_k"].values())
        y = [e["balanced_accuracy"] for e in es]
        lo = [e["balanced_accuracy_ci"][0] for e in es]
        hi = [e["balanced_accuracy_ci"][1] for e in es]
        ax.plot(ks, y, "o-", color=color, label=f"SAE top-k latents ({pool})")
        ax.fill_between(ks, lo, hi, color=color, alpha=0.15)
        ax.axhline(
            res["dense"]["balanced_accuracy"], color=color, ls="--", label=f"dense activations ({pool})"
        )
        ax.axhline(
            res["sae_all"]["balanced_accuracy"], color=color, ls=":", label=f"SAE, all latents ({pool})"
        )
    ax.axhline(1 / len(report["classes"]), color="grey", lw=0.8, label="chance")
    ax.set_xscale("log")
    ax.set_xlabel("k (latents in the sparse probe)")
    ax.set_ylabel("balanced accuracy (probe-test)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(report: dict, out_dir: Path, title: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / layout.METRICS, report)
    write_text_atomic(out_dir / layout.PROBE_TABLE_MD, table_md(report))
    plot(report, out_dir / layout.PROBE_PLOT, title)


def log_wandb(logger_cfg, out_dir: Path, name: str, report: dict, group: str | None) -> None:
    """One W&B run per SAE and task under <out_dir>/wandb (offline unless an API key or logger.mode=online)."""
    if not logger_cfg.wandb:
        return
    import wandb

    run = start_wandb(logger_cfg, out_dir, logger_cfg.name or f"probe-{report['task']}-{name}", group,
                      {"task": report["task"], "sae": report.get("sae"), **report["settings"]}, job_type="probe")  # fmt: skip
    summary = {}
    for pool, res in report["results"].items():
        for probe in ("dense", "sae_all"):
            for m in probing.METRICS:
                summary[f"probe/{pool}/{probe}/{m}"] = res[probe][m]
        for k, e in res["sae_k"].items():
            for m in probing.METRICS:
                summary[f"probe/{pool}/sae_k{k}/{m}"] = e[m]
    run.summary.update(summary)
    run.log({"probe/plot": wandb.Image(str(out_dir / layout.PROBE_PLOT))})
    run.finish()
