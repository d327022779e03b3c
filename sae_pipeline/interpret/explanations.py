"""The explain folder's records (sae-explain writes them, the feature browser and W&B show them).

Records are JSON lines appended one latent at a time and flushed to disk, so a killed run loses at most
the line it was writing: `read` drops a last line cut short, and the rerun writes that latent again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sae_pipeline import layout
from sae_pipeline.tracking import start_wandb

SCORES = ("detection", "fuzzing", "detection_shuffled", "fuzzing_shuffled")


def read(path: Path) -> list[dict]:
    """Every complete record of a JSON-lines file (none when it does not exist)."""
    if not Path(path).is_file():
        return []
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # the line a killed run was writing
    return out


def append(path: Path, record: dict) -> None:
    """Add one record as a line, on disk before this returns."""
    with open(path, "a+b") as f:
        if f.tell():
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")  # close a line cut short by a kill, so the new record stays readable
        f.write((json.dumps(record, ensure_ascii=False) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def summary(records: list[dict]) -> dict:
    """n_latents and the mean of each score over the latents (the card of sae-eval reads these keys)."""
    n = len(records)
    return {"n_latents": n, **{k: (sum(r[k] for r in records) / n if n else 0.0) for k in SCORES}}


def attach(report: dict, records: list[dict]) -> dict:
    """The browser report with each latent's explanation and scores under `explanation`."""
    by_latent = {r["latent"]: r for r in records}
    for rec in report["latents"]:
        r = by_latent.get(rec["id"])
        if r is not None:
            rec["explanation"] = {"text": r["explanation"], **{k: r[k] for k in SCORES}}
    return report


def read_for_browser(run_dir: Path) -> list[dict]:
    return read(Path(run_dir) / layout.EXPLAIN_DIR / layout.EXPLANATIONS)


def log_wandb(logger_cfg, out_dir: Path, name: str) -> None:
    """What the explain folder holds for its chosen latents, as one W&B run (job type `explain`) under
    <out_dir>/wandb: the mean scores as `explain/<score>` in its summary, and every explanation with its
    scores as the table `explain/explanations`."""
    if not logger_cfg.wandb:
        return
    import wandb

    settings = json.loads((Path(out_dir) / layout.EXPLAIN_SETTINGS).read_text())
    chosen = set(settings["latent_ids"])
    records = [r for r in read(Path(out_dir) / layout.EXPLANATIONS) if r["latent"] in chosen]
    run_name = logger_cfg.name or f"explain-{name}"
    run = start_wandb(logger_cfg, out_dir, run_name, logger_cfg.group, settings, job_type="explain")
    columns = ["latent", "explanation", *SCORES]
    run.log(
        {
            "explain/explanations": wandb.Table(
                columns=columns, data=[[r[c] for c in columns] for r in records]
            )
        }
    )
    run.summary.update({f"explain/{k}": v for k, v in summary(records).items()})
    run.finish()
