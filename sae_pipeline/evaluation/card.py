"""One card per evaluated SAE: card.json and card.md beside metrics.json, in SAEBench's names.

    card = build_card(metrics, explain_summary)       # explain_summary: <run>/explain/summary.json or None
    write_card(card, eval_dir)

The JSON mirrors SAEBench's result files (`eval_result_metrics` of each eval type: `core`,
`absorption_first_letter`, `sparse_probing`, `autointerp`) so the numbers can sit beside published
SAEBench results. Sections that were not computed are absent. Differences of method (our probes, our
word sample, our text) are named in `notes`; equal names do not make the numbers interchangeable
without reading them.
"""

from __future__ import annotations

import json
from pathlib import Path

from sae_pipeline import layout
from sae_pipeline.evaluation.absorption import AbsorptionSettings as GATE  # SAEBench's reporting gate
from sae_pipeline.files import write_json_atomic, write_text_atomic


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def core_section(m: dict) -> dict:
    """SAEBench's core categories from our metrics.json (names: sae_bench/evals/core/eval_output.py);
    None where this evaluation has no such number (a model=torch_module task has no KL)."""
    g, lat = m.get, m.get("latents", {})
    kl_score = _ratio(g("kl_zero") - g("kl"), g("kl_zero")) if g("kl") is not None and g("kl_zero") else None
    dead = lat.get("dead_frac")
    return {
        "model_behavior_preservation": {
            "kl_div_score": kl_score,
            "kl_div_with_ablation": g("kl_zero"),
            "kl_div_with_sae": g("kl"),
        },
        "model_performance_preservation": {
            "ce_loss_score": g("loss_recovered"),
            "ce_loss_with_ablation": g("ce_zero"),
            "ce_loss_with_sae": g("ce_sae"),
            "ce_loss_without_sae": g("ce_clean"),
        },
        "reconstruction_quality": {
            "explained_variance": g("explained_variance"),
            "mse": g("mse_per_element"),
            "cossim": g("cosine"),
        },
        "shrinkage": {"l2_ratio": g("norm_ratio")},
        "sparsity": {"l0": g("l0")},
        "misc_metrics": {
            "frac_alive": None if dead is None else 1.0 - dead,
            "freq_over_10_percent": lat.get("dense_frac"),
        },
        "token_stats": {"total_tokens_eval_reconstruction": g("n_tokens")},
    }


def absorption_section(a: dict) -> dict:
    keys = (
        "mean_absorption_fraction_score", "mean_full_absorption_score", "mean_num_split_features",
        "std_dev_absorption_fraction_score", "std_dev_full_absorption_score", "std_dev_num_split_features",
    )  # fmt: skip
    return {"mean": {k: a[k] for k in keys}}


def absorption_note(a: dict) -> str:
    how = {
        "saebench": "SAEBench's probes and L1-probe ranking of the main latents",
        "mean_difference": "main latents by mean-difference ranking (SAEBench: an L1 probe)",
    }[a.get("method", "mean_difference")]  # reports written before the method existed used mean difference
    note = (
        f"{a['n_letters_scored']} letters scored from {a['n_words']} words of the model's vocabulary; {how}"
    )
    if a.get("saebench_would_report") is False:
        note += (
            f"; only {a['n_letters_probe_passed']} letters have probe F1 > {GATE.min_probe_f1}, and SAEBench "
            f"reports absorption only from {GATE.saebench_min_letters}: read these numbers with care"
        )
    return note


def probing_section(report: dict) -> dict:
    """SAEBench's llm/sae accuracies of one task: `llm_test_accuracy` (dense probe), `sae_test_accuracy`
    (all latents), `sae_top_{k}_test_accuracy` (k-sparse); the mean-pooled probes of a sequence task."""
    res = report["results"]
    pooled = res.get("mean") or res.get("token") or next(iter(res.values()))
    sae = {"sae_test_accuracy": pooled["sae_all"]["accuracy"]}
    sae.update({f"sae_top_{k}_test_accuracy": e["accuracy"] for k, e in pooled["sae_k"].items()})
    return {"llm": {"llm_test_accuracy": pooled["dense"]["accuracy"]}, "sae": sae}


def autointerp_section(summary: dict) -> dict:
    """SAEBench's autointerp_score is a detection score; fuzzing and the shuffled baselines ride along."""
    out = {"autointerp_score": summary.get("detection")}
    for k in ("n_latents", "detection", "fuzzing", "detection_shuffled", "fuzzing_shuffled"):
        if k in summary:
            out[k] = summary[k]
    return {"autointerp": out}


def build_card(m: dict, explain_summary: dict | None = None) -> dict:
    card = {
        "format_version": 1,
        "sae": {"run": m.get("run"), "hook": m.get("hook"), "model": (m.get("model") or {}).get("name"),
                **{k: m["sae"][k] for k in ("arch", "d_in", "d_sae")}},
        "eval_result_metrics": {"core": core_section(m)},
        "notes": {
            "core": "held-out text of the store; ce_loss_score = loss recovered against zero ablation",
        },
    }  # fmt: skip
    em = card["eval_result_metrics"]
    if m.get("absorption"):
        em["absorption_first_letter"] = absorption_section(m["absorption"])
        card["notes"]["absorption_first_letter"] = absorption_note(m["absorption"])
    for task, report in (m.get("sparse_probing") or {}).items():
        em.setdefault("sparse_probing", {})[task] = probing_section(report)
    if explain_summary is not None:
        em["autointerp"] = autointerp_section(explain_summary)
    return card


def read_explain_summary(run_dir: Path) -> dict | None:
    """<run>/explain/summary.json (written by sae-explain) or None when it is absent or unreadable."""
    path = Path(run_dir) / layout.EXPLAIN_DIR / layout.EXPLAIN_SUMMARY
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "—" if v is None else str(v)


def card_md(card: dict, title: str) -> str:
    s = card["sae"]
    lines = [
        f"# {title}",
        "",
        f"{s['arch']} SAE, d_sae {s['d_sae']}, at `{s['hook']}` of `{s['model']}`.",
        "",
    ]
    for eval_type, cats in card["eval_result_metrics"].items():
        lines += [f"## {eval_type}", "", "| category | metric | value |", "|---|---|---|"]
        for cat, metrics in cats.items():
            if eval_type == "sparse_probing":  # task -> {llm, sae}
                metrics = {f"{c}: {k}": v for c, d in metrics.items() for k, v in d.items()}
            lines += [f"| {cat} | {k} | {_fmt(v)} |" for k, v in metrics.items()]
        note = card["notes"].get(eval_type)
        lines += ["", f"_{note}_" if note else "", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_card(card: dict, eval_dir: Path, title: str) -> tuple[Path, Path]:
    eval_dir = Path(eval_dir)
    write_json_atomic(eval_dir / layout.CARD_JSON, card)
    write_text_atomic(eval_dir / layout.CARD_MD, card_md(card, title))
    return eval_dir / layout.CARD_JSON, eval_dir / layout.CARD_MD
