"""Per-latent records of the feature browser, assembled from one pass of `FeatureStats`.

Each record: firing count and density, mean and max activation, an exact histogram, the top contexts
(a token window around the peak, every token's activation), weaker examples (one per quantile band of a
uniform sample of firings), silent windows (contexts where it never fires) and, where the logit lens applies, the promoted and suppressed tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae_pipeline.errors import UserError
from sae_pipeline.interpret.feature_stats import FeatureStats


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


def _silent(tok: int, ids: list[list[int]], before: int, after: int) -> dict:
    """A window of a context where the latent never fires (every activation is 0, so none are kept)."""
    T = len(ids[0])
    ctx, pos = divmod(tok, T)
    lo, hi = max(0, pos - before), min(T, pos + after + 1)
    return {"ctx": ctx, "pos": pos, "start": lo, "toks": ids[ctx][lo:hi]}


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
        rec["silent"] = [_silent(t, ids, before, after) for t in s["sil_tok_Fz"][i] if t >= 0]
        if lens is not None:
            rec["promoted"] = [[t, _r(v)] for t, v in zip(lens[0][i], lens[1][i], strict=True)]
            rec["suppressed"] = [[t, _r(v)] for t, v in zip(lens[2][i], lens[3][i], strict=True)]
        out.append(rec)
    return out


def select_latents(f_cfg, d_sae: int) -> Tensor:
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
