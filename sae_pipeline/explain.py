"""sae-explain: explanations of an SAE's latents written by an instruct model, with detection and fuzzing scores.

    sae-explain sae_path=runs/demo/topk                                  # embedded SmolLM2-135M-Instruct, offline
    sae-explain sae_path=... explain.latents=random explain.n_latents=20 explain.seed=1
    sae-explain sae_path=... 'explain.latents=[3,17,42]' explain.base_url=http://localhost:8000/v1 explain.model=Qwen/Qwen2.5-7B-Instruct

Explains from the feature browser's top and quantile contexts (run sae-features first) and scores each
explanation against contexts it did not see, beside the score of another latent's explanation (the
shuffled baseline). Writes <run>/explain/{explanations.jsonl, summary.json}, adds the explanations to
the browser and logs them with the mean scores to W&B (logger=none: not). A rerun continues an interrupted one (interpret/explain_run.py).
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from sae_pipeline.errors import report_config_errors, report_user_errors
from sae_pipeline.interpret import explanations
from sae_pipeline.interpret.explain_run import run_explain
from sae_pipeline.runs import single_target_only
from sae_pipeline.schema import register_configs
from sae_pipeline.schema.explain import check_explain_job


def run(cfg: DictConfig) -> Path:
    """Explain and score the chosen latents of the SAE at cfg.sae_path; returns <run>/explain."""
    check_explain_job(cfg)
    target, _ = single_target_only(Path(cfg.sae_path))
    out_dir = run_explain(cfg.explain, target.run_dir)
    explanations.log_wandb(cfg.logger, out_dir, target.run_dir.name)
    return out_dir


register_configs()


@report_config_errors  # outside hydra.main: an override it cannot compose is one line too
@hydra.main(version_base="1.3", config_path="conf", config_name="explain")
@report_user_errors  # inside hydra.main, so a UserError is one line instead of Hydra's traceback
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
