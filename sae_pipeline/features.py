"""sae-features: a static latent browser for one SAE (max-activating contexts, histograms, logit lens).

    sae-features sae_path=runs/demo/topk                       # writes runs/demo/topk/features/index.html
    sae-features sae_path=... features.n_tokens=65536 features.top_k=30 features.max_latents=512

ONE pass over the store's held-out text (which harvest never saw): each batch of contexts is run to the
hook (early exit), encoded, and merged into per-latent running statistics (`feature_stats.py`): top
contexts with their token windows, a uniform sample of weaker firings, an exact histogram, density.
Logit lens ("promoted / suppressed tokens"): W_U @ (g * W_dec[f]), where g is the final norm's scale (the
norm's centring and division by the RMS are left out: a direction has no meaningful norm statistics, so this
is the usual direct-logit approximation: it ranks tokens by how adding the row would move their logits).
Writes <run>/features/{features.json, features_data.js, index.html}; open index.html from disk.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from sae_pipeline import browser, paths, text
from sae_pipeline.config import register_configs
from sae_pipeline.errors import UserError, report_user_errors
from sae_pipeline.eval import Spec, Target, find_targets, load_spec
from sae_pipeline.feature_stats import FeatureStats, collect
from sae_pipeline.features_config import check_features_config
from sae_pipeline.hooks import resolve_hook
from sae_pipeline.models import load_model, resolve_device
from sae_pipeline.sae import load_sae

_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_norm", "norm_f")


# ----------------------------------------------------------------------------- loading


def single_target(sae_path: str) -> tuple[Target, Spec]:
    """The one SAE at sae_path (a run folder or an SAE folder) and what it was trained on."""
    targets, _ = find_targets(Path(sae_path))
    if len(targets) != 1:
        raise UserError(
            f"sae_path {sae_path} holds {len(targets)} SAEs; point it at one run folder "
            f"(e.g. {targets[0].run_dir})."
        )
    return targets[0], load_spec(targets[0])


def load_all(sae_path: str, device_name: str):
    """(target, spec, model, tokenizer, sae, hook point) for the SAE at sae_path."""
    target, spec = single_target(sae_path)
    device = resolve_device(device_name)
    sae = load_sae(target.sae_dir, map_location=device).eval().requires_grad_(False)
    model, tokenizer = load_model(spec.model_cfg, device)
    hook = resolve_hook(model, spec.hook_name)
    d_store = spec.manifest.get("d_in", sae.d_in)
    if sae.d_in != d_store:
        raise UserError(f"the SAE in {target.sae_dir} has d_in={sae.d_in} but its store has d_in={d_store}.")
    return target, spec, model, tokenizer, sae, hook


def token_strings(tokenizer, ids) -> dict[int, str]:
    """id -> the text the token decodes to on its own (byte fragments may show as U+FFFD)."""
    ids = sorted({int(i) for i in ids})
    texts = tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)
    return dict(zip(ids, texts, strict=True))


# ----------------------------------------------------------------------------- logit lens


def final_norm_scale(model) -> Tensor | None:
    """The final norm's elementwise scale g (None when the model has no recognisable final norm)."""
    base = getattr(model, "base_model", model)
    for name in _FINAL_NORM_NAMES:
        norm = getattr(base, name, None)
        weight = getattr(norm, "weight", None)
        if isinstance(weight, Tensor):
            g = weight.detach().float()
            # Gemma-style RMSNorm multiplies by (1 + weight)
            return g + 1.0 if "gemma" in type(norm).__name__.lower() else g
    return None


def logit_effects(model, W_dec_FD: Tensor) -> Tensor | None:
    """[F, V] direct effect of each decoder row on the logits: W_U @ (g * W_dec[f]); None if D mismatches."""
    head = model.get_output_embeddings()
    if head is None or head.weight.shape[1] != W_dec_FD.shape[1]:
        return None  # e.g. an MLP-internal hook: its rows do not live in the residual stream
    W_U_VD = head.weight.detach().float()
    dirs_FD = W_dec_FD.detach().float().to(W_U_VD.device)
    g = final_norm_scale(model)
    if g is not None:
        dirs_FD = dirs_FD * g.to(W_U_VD.device)
    return dirs_FD @ W_U_VD.T


def top_logit_tokens(model, W_dec_FD: Tensor, n: int, chunk: int = 256):
    """(promoted ids, values, suppressed ids, values), each [F, n] strongest first; None if no logit lens.

    Computed in chunks of latents so a large dictionary never materialises the full [F, vocab] matrix."""
    if n == 0 or logit_effects(model, W_dec_FD[:1]) is None:
        return None
    parts = []
    for start in range(0, W_dec_FD.shape[0], chunk):
        eff_FV = logit_effects(model, W_dec_FD[start : start + chunk])
        m = min(n, eff_FV.shape[1])
        up, down = eff_FV.topk(m, dim=1), eff_FV.topk(m, dim=1, largest=False)
        parts.append((up.indices, up.values, down.indices, down.values))
    return tuple(torch.cat(p).cpu() for p in zip(*parts, strict=True))


# ----------------------------------------------------------------------------- assembling the report


def _r(x: float) -> float:
    return float(f"{float(x):.4g}")


def _example(
    tok: int, window: list[float], ids: list[list[int]], before: int, after: int, extra: dict
) -> dict:
    T = len(ids[0])
    ctx, pos = divmod(tok, T)
    lo, hi = max(0, pos - before), min(T, pos + after + 1)
    acts = window[lo - (pos - before) : hi - (pos - before)]
    return {"ctx": ctx, "pos": pos, "start": lo, "peak": pos - lo, "toks": ids[ctx][lo:hi],
            "acts": [_r(a) for a in acts], **extra}  # fmt: skip


def build_latents(stats: FeatureStats, latents: Tensor, ids_NT: Tensor, f_cfg, logit) -> list[dict]:
    """Per-latent records: stats, histogram, top contexts, weak examples, promoted/suppressed tokens."""
    before, after, n_weak = stats.before, stats.after, int(f_cfg.n_weak)
    s = {k: v.tolist() for k, v in vars(stats).items() if isinstance(v, Tensor)}  # Python lists: fast loops
    s["top_val_Fk"], s["top_tok_Fk"], s["top_win_FkW"] = (x.tolist() for x in stats.sorted_top())
    ids = ids_NT.tolist()
    lens = [x.tolist() for x in logit] if logit is not None else None
    out = []
    for i, f in enumerate(latents.tolist()):
        count = s["count_F"][i]
        rec = {
            "id": f,
            "count": count,
            "density": count / max(stats.n_tokens, 1),
            "mean_act": _r(s["sum_F"][i] / count) if count else 0.0,
            "max_act": _r(s["max_F"][i]),
            "dead": count == 0,
        }
        if count:
            counts = s["hist_Fb"][i]
            while counts and counts[-1] == 0:
                counts.pop()
            rec["hist"] = {"bin_width": _r(2.0 ** s["exp_F"][i] / stats.n_bins), "counts": counts}
        top = [
            (v, t, j)
            for j, (v, t) in enumerate(zip(s["top_val_Fk"][i], s["top_tok_Fk"][i], strict=True))
            if v > 0
        ]
        rec["top"] = [
            _example(t, s["top_win_FkW"][i][j], ids, before, after, {"act": _r(v)}) for v, t, j in top
        ]
        # weak: the uniform sample minus the top peaks (and anything as strong), one per quantile band
        floor = top[-1][0] if len(top) == stats.k else float("inf")
        peaks = {t for _, t, _ in top}
        pool = sorted(
            (v, t, j)
            for j, (v, t) in enumerate(zip(s["res_val_Fr"][i], s["res_tok_Fr"][i], strict=True))
            if t >= 0 and 0 < v < floor and t not in peaks
        )
        n = min(n_weak, len(pool))
        picks = [(pool[int((q + 0.5) * len(pool) / n)], (q + 0.5) / n) for q in range(n)][::-1]
        rec["weak"] = [
            _example(t, s["res_win_FrW"][i][j], ids, before, after, {"act": _r(v), "quantile": _r(q)})
            for (v, t, j), q in picks
        ]
        if lens is not None:
            rec["promoted"] = [[t, _r(v)] for t, v in zip(lens[0][i], lens[1][i], strict=True)]
            rec["suppressed"] = [[t, _r(v)] for t, v in zip(lens[2][i], lens[3][i], strict=True)]
        out.append(rec)
    return out


def _select_latents(f_cfg, d_sae: int) -> Tensor:
    if f_cfg.latents:
        ids = [int(i) for i in f_cfg.latents]
        bad = [i for i in ids if not 0 <= i < d_sae]
        if bad:
            raise UserError(
                f"features.latents has ids {bad} outside 0..{d_sae - 1} (the SAE has {d_sae} latents)."
            )
        return torch.tensor(sorted(set(ids)), dtype=torch.long)
    n = d_sae if f_cfg.max_latents == 0 else min(int(f_cfg.max_latents), d_sae)
    return torch.arange(n)


def run(cfg: DictConfig) -> Path:
    """Build the latent browser of the SAE at cfg.sae_path; returns the folder holding index.html."""
    f = cfg.features
    check_features_config(f)
    target, spec, model, tokenizer, sae, hook = load_all(cfg.sae_path, f.device)
    latents = _select_latents(f, sae.d_sae)
    ids_NT, mask_NT = text.heldout_contexts(spec.manifest, tokenizer, int(f.n_tokens))
    started = time.perf_counter()
    stats = collect(model, hook, sae, ids_NT, mask_NT, latents, f)
    logit = top_logit_tokens(model, sae.W_dec_FD[latents.to(sae.W_dec_FD.device)], int(f.n_logit_tokens))
    records = build_latents(stats, latents, ids_NT, f, logit)
    wall = time.perf_counter() - started
    used = {t for r in records for ex in r["top"] + r["weak"] for t in ex["toks"]}
    used |= {t for r in records for t, _ in r.get("promoted", []) + r.get("suppressed", [])}
    report = {
        "format_version": 1,
        "run": str(target.run_dir),
        "sae_dir": str(target.sae_dir),
        "sae": {"arch": sae.cfg.arch, "d_in": sae.d_in, "d_sae": sae.d_sae},
        "hook": hook.name,
        "model": spec.model_cfg,
        "store": str(spec.store),
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
    out_dir = Path(f.out_dir) if f.out_dir else target.run_dir / paths.FEATURES
    out_dir.mkdir(parents=True, exist_ok=True)
    browser.write_browser(out_dir, report)
    print(
        f"{len(records)} latents ({report['n_dead']} dead) over {stats.n_tokens} held-out tokens in {wall:.1f}s: "
        f"{out_dir / paths.FEATURES_HTML}",
        file=sys.stderr,
    )
    return out_dir


register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="features")
@report_user_errors  # inside hydra.main, so a UserError is one line instead of Hydra's traceback
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
