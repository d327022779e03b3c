"""Tables and L0 <-> quality Pareto plots over many evaluated runs.

    rows = collect_rows(multirun_folder)          # one row per <run>/eval/metrics.json below it
    write_sweep(multirun_folder, rows)            # sweep.csv, sweep.md, the two Pareto PNGs


A point is on the Pareto frontier when no other run has both L0 <= its L0 and a score at least as
good (higher loss recovered / lower FVU), one of them strictly.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from sae_pipeline import layout
from sae_pipeline.errors import UserError

# Which SAE config key sets an architecture's sparsity (the first one present is reported).
SPARSITY_KEYS = ("l1_coefficient", "k", "l0_coefficient")

COLUMNS = (
    "run",
    "arch",
    "sparsity_key",
    "sparsity_value",
    "d_sae",
    "l0",
    "loss_recovered",
    "fvu",
    "ce_increase",
    "kl",
    "explained_variance",
    "cosine",
    "mse_per_token",
    "ce_clean",
    "ce_sae",
    "ce_zero",
    "loss_recovered_mean",
    "dead_frac",
    "dense_frac",
    "n_tokens",
    "pareto_loss_recovered",
    "pareto_fvu",
)


def sparsity_setting(sae_cfg: dict) -> tuple[str, float | int | None]:
    for key in SPARSITY_KEYS:
        if key in sae_cfg:
            return key, sae_cfg[key]
    return "", None


def row_from_metrics(metrics: dict, run: str) -> dict:
    """One flat table row of a metrics.json dict."""
    sae = metrics.get("sae", {})
    key, value = sparsity_setting(sae.get("cfg", {}))
    latents = metrics.get("latents", {})
    row = {
        "run": run,
        "arch": sae.get("arch", "?"),
        "sparsity_key": key,
        "sparsity_value": value,
        "d_sae": sae.get("d_sae"),
        "dead_frac": latents.get("dead_frac"),
        "dense_frac": latents.get("dense_frac"),
    }
    for col in COLUMNS:
        if col not in row and col in metrics:
            row[col] = metrics[col]
    return row


def collect_rows(folder: Path) -> list[dict]:
    """A row for every <run>/eval/metrics.json below folder (run names relative to folder)."""
    folder = Path(folder)
    rows = []
    for path in sorted(folder.rglob(f"{layout.EVAL}/{layout.METRICS}")):
        run_dir = path.parent.parent
        rel = run_dir.relative_to(folder).as_posix() if run_dir != folder else "."
        rows.append(row_from_metrics(json.loads(path.read_text()), rel))
    return rows


def _num(v) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f


def pareto_mask(l0: list[float], score: list[float], higher_is_better: bool = True) -> list[bool]:
    """True where no other point has l0 <= and score >= (or <=, when lower is better), one strictly."""
    sign = 1.0 if higher_is_better else -1.0
    pts = [(_num(a), sign * _num(b)) for a, b in zip(l0, score, strict=True)]
    out = []
    for i, (li, si) in enumerate(pts):
        if math.isnan(li) or math.isnan(si):
            out.append(False)
            continue
        dominated = any(
            j != i and lj <= li and sj >= si and (lj < li or sj > si)
            for j, (lj, sj) in enumerate(pts)
            if not (math.isnan(lj) or math.isnan(sj))
        )
        out.append(not dominated)
    return out


def add_pareto_flags(rows: list[dict]) -> list[dict]:
    l0 = [r.get("l0") for r in rows]
    lr = pareto_mask(l0, [r.get("loss_recovered") for r in rows], higher_is_better=True)
    fv = pareto_mask(l0, [r.get("fvu") for r in rows], higher_is_better=False)
    for r, a, b in zip(rows, lr, fv, strict=True):
        r["pareto_loss_recovered"], r["pareto_fvu"] = a, b
    return rows


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}"
    return str(v)


def write_tables(rows: list[dict], folder: Path) -> tuple[Path, Path]:
    """sweep.csv (full precision) and sweep.md (rounded), sorted by architecture then L0."""
    folder = Path(folder)
    rows = sorted(rows, key=lambda r: (str(r.get("arch")), _num(r.get("l0"))))
    csv_path, md_path = folder / layout.SWEEP_TABLE_CSV, folder / layout.SWEEP_TABLE_MD
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({c: r.get(c) for c in COLUMNS})
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    md_path.write_text(
        f"# Sweep: {len(rows)} runs\n\nPareto flags: not dominated on lower L0 and higher loss recovered "
        "(resp. lower FVU).\n\n" + "\n".join(lines) + "\n"
    )
    return csv_path, md_path


def plot_pareto(rows: list[dict], y_key: str, path: Path, higher_is_better: bool) -> Path:
    """L0 vs y_key, one line per architecture, the Pareto frontier over all runs drawn and ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(r, _num(r.get("l0")), _num(r.get(y_key))) for r in rows]
    pts = [p for p in pts if not (math.isnan(p[1]) or math.isnan(p[2]))]
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for arch in sorted({str(r.get("arch")) for r, _, _ in pts}):
        xs_ys = sorted((x, y) for r, x, y in pts if str(r.get("arch")) == arch)
        ax.plot([x for x, _ in xs_ys], [y for _, y in xs_ys], marker="o", label=arch)
    flags = pareto_mask([x for _, x, _ in pts], [y for _, _, y in pts], higher_is_better)
    front = sorted((x, y) for (_, x, y), f in zip(pts, flags, strict=True) if f)
    if front:
        ax.plot(
            [x for x, _ in front],
            [y for _, y in front],
            "k--",
            lw=1,
            drawstyle="steps-post",
            label="Pareto frontier",
            zorder=1,
        )
        ax.scatter(
            [x for x, _ in front], [y for _, y in front], s=140, facecolors="none", edgecolors="k", zorder=3
        )
    xs = [x for _, x, _ in pts]
    if xs and min(xs) > 0 and max(xs) / min(xs) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("L0 (mean active latents per token)")
    ax.set_ylabel(y_key.replace("_", " "))
    ax.set_title(f"L0 vs {y_key.replace('_', ' ')} ({'higher' if higher_is_better else 'lower'} is better)")
    ax.grid(alpha=0.3)
    if pts:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def write_sweep(folder: Path, rows: list[dict] | None = None) -> dict[str, Path]:
    """Write the tables and both Pareto plots into folder; returns {name: path}."""
    folder = Path(folder)
    rows = add_pareto_flags(collect_rows(folder) if rows is None else list(rows))
    if not rows:
        raise UserError(f"no {layout.EVAL}/{layout.METRICS} found under {folder}: run sae-eval on it first.")
    csv_path, md_path = write_tables(rows, folder)
    return {
        "csv": csv_path,
        "md": md_path,
        "loss_plot": plot_pareto(rows, "loss_recovered", folder / layout.PARETO_LOSS_PLOT, True),
        "fvu_plot": plot_pareto(rows, "fvu", folder / layout.PARETO_FVU_PLOT, False),
    }
