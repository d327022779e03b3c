"""sae-features: a static latent browser for one SAE (max-activating contexts, histograms, logit lens).

    sae-features sae_path=runs/demo/topk                       # writes runs/demo/topk/features/index.html
    sae-features sae_path=... features.n_tokens=65536 features.top_k=30 features.max_latents=512

ONE pass over the store's held-out text (which harvest never saw): each batch of contexts is run to the
hook (early exit), encoded, and merged into per-latent running statistics (`feature_stats.py`): top
contexts with their token windows, a uniform sample of weaker firings, an exact histogram, density.
Logit lens ("promoted / suppressed tokens"): W_U @ (g * W_dec[f]), where g is the final norm's scale (the
norm's centring and division by the RMS are left out: a direction has no meaningful norm statistics, so this
is the usual direct-logit approximation: it ranks tokens by how adding the row would move their logits).
Writes <run>/features/{features_data.js, index.html}; open index.html from disk
(Python reads the data back with sae_pipeline.interpret.browser.read_report).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from sae_pipeline import layout, locks
from sae_pipeline.errors import report_config_errors, report_user_errors
from sae_pipeline.interpret import browser, explanations
from sae_pipeline.interpret.feature_report import build_latents, select_latents
from sae_pipeline.interpret.feature_stats import collect
from sae_pipeline.interpret.logit_lens import top_logit_tokens
from sae_pipeline.model.loading import token_strings
from sae_pipeline.runs import heldout_text, load_all
from sae_pipeline.schema import register_configs
from sae_pipeline.schema.features import check_features_config

# ----------------------------------------------------------------------------- loading


def run(cfg: DictConfig) -> Path:
    """Build the latent browser of the SAE at cfg.sae_path; returns the folder holding index.html."""
    f = cfg.features
    check_features_config(f)
    target, spec, model, tokenizer, sae, hook = load_all(cfg.sae_path, f.device, cfg.source)
    latents = select_latents(f, sae.d_sae)
    ids_NT, mask_NT, text_desc = heldout_text(spec, tokenizer, int(f.n_tokens))
    started = time.perf_counter()
    stats = collect(model, hook, sae, ids_NT, mask_NT, latents, f)
    logit = top_logit_tokens(model, sae.W_dec_FD[latents.to(sae.W_dec_FD.device)], int(f.n_logit_tokens))
    records = build_latents(stats, latents, ids_NT, f, logit)
    wall = time.perf_counter() - started
    used = {t for r in records for ex in r["top"] + r["weak"] + r["silent"] for t in ex["toks"]}
    used |= {t for r in records for t, _ in r.get("promoted", []) + r.get("suppressed", [])}
    report = {
        "format_version": 1,
        "run": str(target.run_dir),
        "sae_dir": str(target.sae_dir),
        "sae": {"arch": sae.cfg.arch, "d_in": sae.d_in, "d_sae": sae.d_sae},
        "hook": hook.name,
        "model": spec.model_cfg,
        "store": str(spec.store),
        "text": text_desc,
        "n_tokens": stats.n_tokens,
        "n_contexts": int(ids_NT.shape[0]),
        "context_size": int(ids_NT.shape[1]),
        "settings": OmegaConf.to_container(f, resolve=True),
        "logit_lens": None
        if logit is None
        else "W_U @ (final-norm scale * W_dec[f]); no centring, no RMS division",
        "n_dead": sum(r["dead"] for r in records),
        "wall_s": round(wall, 3),
        "tokens": {str(t): s for t, s in token_strings(tokenizer, used).items()},
        "latents": records,
    }
    out_dir = Path(f.out_dir) if f.out_dir else target.run_dir / layout.FEATURES
    explanations.attach(report, explanations.read_for_browser(target.run_dir))  # from sae-explain, if run
    with locks.hold(out_dir, "the feature browser folder", "rerun it when that one has ended"):
        browser.write_browser(out_dir, report)
    print(
        f"{len(records)} latents ({report['n_dead']} dead) over {stats.n_tokens} held-out tokens in {wall:.1f}s: "
        f"{out_dir / layout.FEATURES_HTML}",
        file=sys.stderr,
    )
    return out_dir


register_configs()


@report_config_errors  # outside hydra.main: an override it cannot compose is one line too
@hydra.main(version_base="1.3", config_path="conf", config_name="features")
@report_user_errors  # inside hydra.main, so a UserError is one line instead of Hydra's traceback
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
