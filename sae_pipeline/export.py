"""sae-export: write an SAE in another library's format.

    sae-export sae_path=runs/train/<run>                                   # -> <run>/export/saelens/
    sae-export sae_path=runs/train/<run> export.out=/tmp/my_sae export.model_name=gpt2-small

Format `saelens` writes cfg.json + sae_weights.safetensors as sae_lens 5.x saves them (sae_lens 6.x loads
them too): `sae_lens.SAE.load_from_disk(<out>)`. BatchTopK SAEs are written in their inference form, a
JumpReLU with one threshold; every other architecture keeps its own (relu -> standard). The model, hook,
context size and dataset come from the run and its store; the weights are in raw activation units
(normalize_activations="none"). sae_path may also be a SAELens folder or a bare .safetensors file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from sae_pipeline import layout, locks
from sae_pipeline.errors import UserError, report_config_errors, report_user_errors
from sae_pipeline.runs import training_metadata
from sae_pipeline.sae import read_sae, write_saelens
from sae_pipeline.schema import register_configs
from sae_pipeline.schema.export import check_export_config


def run(cfg: DictConfig) -> Path:
    """Export the SAE at cfg.sae_path; returns the folder written."""
    check_export_config(cfg)
    e = cfg.export
    sae = read_sae(cfg.sae_path).eval()
    meta, home = training_metadata(cfg.sae_path)
    if e.model_name:
        meta["model_name"] = e.model_name
    if e.neuronpedia_id:
        meta["neuronpedia_id"] = e.neuronpedia_id
    out = Path(e.out) if e.out else home / layout.EXPORT / e.format
    with locks.hold(out, "the export folder", "rerun it when that one has ended"):
        existing = [out / n for n in (layout.SAELENS_CONFIG, layout.SAELENS_WEIGHTS) if (out / n).exists()]
        if existing and not e.overwrite:
            raise UserError(
                f"export.out={out} already holds {existing[0].name}; pass export.overwrite=true to replace it."
            )
        write_saelens(sae, out, meta)
    if str(meta.get("model_name", "")).startswith("embedded:") and not e.model_name:
        print(
            f"note: cfg.json names model_name={meta['model_name']!r}, which only this pipeline can load; "
            "pass export.model_name=<hub id> for SAELens",
            file=sys.stderr,
        )
    missing = [k for k in ("model_name", "hook_name") if not meta.get(k)]
    if missing:
        print(
            f"warning: cfg.json has no {' or '.join(missing)} (not known for {cfg.sae_path})", file=sys.stderr
        )
    print(f"wrote {out} ({sae.cfg.arch} -> SAELens, d_in={sae.d_in}, d_sae={sae.d_sae})")
    return out


register_configs()


@report_config_errors  # outside hydra.main: an override it cannot compose is one line too
@hydra.main(version_base="1.3", config_path="conf", config_name="export")
@report_user_errors  # inside hydra.main, so a UserError is one line instead of Hydra's traceback
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
