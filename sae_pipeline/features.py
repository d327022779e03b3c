"""sae-features: a static latent browser for one SAE (max-activating contexts, histograms, logit lens).

    sae-features sae_path=runs/demo/topk                       # writes runs/demo/topk/features/index.html
    sae-features sae_path=... features.n_tokens=65536 features.top_k=30 features.max_latents=512

ONE pass over the store's held-out text (which harvest never saw): each batch of contexts is run to the
hook (early exit), encoded, and merged into per-latent running statistics held as [F, k] tensors:
  - top contexts: each context's peak activation per latent, streaming top-k over [best, batch] (a context
    appears at most once per latent; the window is centred on its peak token);
  - weak examples: a uniform sample of each latent's firing positions (random priorities, streaming top-r
    on them), shown one per quantile band below the top contexts;
  - histogram: exact counts in linear bins over [0, 2^e_f], e_f growing with the running max (bins merge
    pairwise when the range doubles, so counts stay exact);
  - firing density (fraction of tokens with activation > 0), mean activation when firing, max.
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
from tqdm import tqdm

from sae_pipeline import browser, paths, text
from sae_pipeline.config import register_configs
from sae_pipeline.errors import UserError, report_user_errors
from sae_pipeline.eval import Spec, Target, find_targets, load_spec
from sae_pipeline.features_config import check_features_config
from sae_pipeline.hooks import capture, resolve_hook
from sae_pipeline.models import load_model, resolve_device
from sae_pipeline.sae import SAE, load_sae

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


# ----------------------------------------------------------------------------- streaming statistics


def _accept(best_Fs: Tensor, cand_Fc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Streaming top-s merge without reordering: which candidates replace which slots.

    The s largest of [best, cand] per row survive; each accepted candidate takes the slot of an evicted
    one (their counts are equal per row). Returns (rows, slots, candidate columns) of the replacements, so
    the caller touches only what changed (slots stay unsorted until the end)."""
    F, s = best_Fs.shape
    m = min(s, cand_Fc.shape[1])
    cat = torch.cat([best_Fs, cand_Fc], dim=1)
    keep = torch.zeros_like(cat, dtype=torch.bool).scatter_(1, cat.topk(s, dim=1).indices, True)
    evicted_first = keep[:, :s].to(torch.int8).argsort(dim=1, stable=True)[:, :m]
    accepted_first = (~keep[:, s:]).to(torch.int8).argsort(dim=1, stable=True)[:, :m]
    use = torch.arange(m, device=cat.device)[None, :] < keep[:, s:].sum(1, keepdim=True)
    rows = torch.arange(F, device=cat.device)[:, None].expand(F, m)[use]
    return rows, evicted_first[use], accepted_first[use]


class LatentStats:
    """Per-latent running statistics over a stream of [contexts, positions, F] activation batches.

    Examples carry the activations of their whole token window (W = before + 1 + after), read while the
    context is in memory, so no second pass is needed; token ids come from the kept input ids. Slots are
    replaced in place (see `_accept`) and only new examples' windows are read; `sorted_*` order them.
    """

    def __init__(self, n_latents: int, f_cfg, device):
        F, k, r = n_latents, int(f_cfg.top_k), int(f_cfg.reservoir)
        self.k, self.r, self.n_bins = k, r, int(f_cfg.n_bins)
        self.before, self.after = int(f_cfg.window_before), int(f_cfg.window_after)
        W = self.before + 1 + self.after
        self.top_val_Fk = torch.full((F, k), -1.0, device=device)  # -1 = empty slot
        self.top_tok_Fk = torch.full((F, k), -1, dtype=torch.long, device=device)  # ctx * T + pos
        self.top_win_FkW = torch.zeros((F, k, W), device=device)
        self.res_key_Fr = torch.full((F, r), -1.0, device=device)  # random priority in (0, 1]; -1 = empty
        self.res_tok_Fr = torch.full((F, r), -1, dtype=torch.long, device=device)
        self.res_val_Fr = torch.zeros((F, r), device=device)
        self.res_win_FrW = torch.zeros((F, r, W), device=device)
        self.count_F = torch.zeros(F, dtype=torch.long, device=device)
        self.sum_F = torch.zeros(F, dtype=torch.float64, device=device)
        self.max_F = torch.zeros(F, device=device)
        self.exp_F = torch.full((F,), -200, dtype=torch.long, device=device)  # histogram range 2^exp
        self.hist_Fb = torch.zeros((F, self.n_bins), dtype=torch.long, device=device)
        self.n_tokens = 0
        self.gen = torch.Generator(device=device).manual_seed(int(f_cfg.seed))

    def _windows(self, acts_CTF: Tensor, c: Tensor, p: Tensor, f: Tensor) -> Tensor:
        """[n, W] activations of latent f[i] around position p[i] of context c[i] (zeros off the edges)."""
        T = acts_CTF.shape[1]
        pos = p[:, None] + torch.arange(-self.before, self.after + 1, device=p.device)
        inside = (pos >= 0) & (pos < T)
        vals = acts_CTF[c[:, None], pos.clamp(0, T - 1), f[:, None]]
        return torch.where(inside, vals, 0.0)

    def update(self, acts_CTF: Tensor, valid_CT: Tensor, first_ctx: int) -> None:
        C, T, F = acts_CTF.shape
        acts_CTF = acts_CTF.float().masked_fill(~valid_CT[..., None], 0.0)  # BOS positions never fire
        self.n_tokens += int(valid_CT.sum())
        self.sum_F += acts_CTF.sum((0, 1), dtype=torch.float64)
        batch_max_F = acts_CTF.amax((0, 1))
        self.max_F = torch.maximum(self.max_F, batch_max_F)
        offset = first_ctx * T

        # top contexts: each context's peak per latent competes for the latent's k slots
        peak_CF, pos_CF = acts_CTF.max(dim=1)
        rows, slots, cols = _accept(self.top_val_Fk, torch.where(peak_CF > 0, peak_CF, -2.0).T)  # -2 < empty
        pos = pos_CF[cols, rows]
        self.top_val_Fk[rows, slots] = peak_CF[cols, rows]
        self.top_tok_Fk[rows, slots] = offset + cols * T + pos
        self.top_win_FkW[rows, slots] = self._windows(acts_CTF, cols, pos, rows)

        # every firing, sparse: counts, the histogram and a uniform sample (random priorities, top r)
        n_idx, f_idx = (acts_CTF.view(C * T, F) > 0).nonzero(as_tuple=True)
        self.count_F += torch.bincount(f_idx, minlength=F)
        vals = acts_CTF.view(C * T, F)[n_idx, f_idx]
        self._update_histogram(f_idx, vals, batch_max_F)
        if f_idx.numel() == 0:
            return
        prio = 1.0 - torch.rand(f_idx.shape, generator=self.gen, device=f_idx.device)  # (0, 1]
        order = torch.argsort(f_idx.double() * 2.0 - prio.double())  # by latent, then priority descending
        f_s = f_idx[order]
        counts_F = torch.bincount(f_s, minlength=F)
        rank = torch.arange(len(f_s), device=f_s.device) - (counts_F.cumsum(0) - counts_F)[f_s]
        take = rank < self.r
        sel, f_t, rank_t = order[take], f_s[take], rank[take]
        cand_prio = torch.full((F, self.r), -2.0, device=f_idx.device)  # -2: no candidate
        cand_prio[f_t, rank_t] = prio[sel]
        cand_n = torch.zeros((F, self.r), dtype=torch.long, device=f_idx.device)
        cand_n[f_t, rank_t] = n_idx[sel]
        rows, slots, cols = _accept(self.res_key_Fr, cand_prio)
        n = cand_n[rows, cols]
        self.res_key_Fr[rows, slots] = cand_prio[rows, cols]
        self.res_tok_Fr[rows, slots] = offset + n
        self.res_val_Fr[rows, slots] = acts_CTF.view(C * T, F)[n, rows]
        self.res_win_FrW[rows, slots] = self._windows(acts_CTF, n // T, n % T, rows)

    def _update_histogram(self, f_idx: Tensor, vals: Tensor, batch_max_F: Tensor) -> None:
        """Linear bins over [0, 2^exp_f]; when exp_f grows by s, old bin j moves to j >> s (exact)."""
        nb = self.n_bins
        need_F = torch.ceil(torch.log2(batch_max_F.clamp_min(1e-30))).long()
        new_exp_F = torch.where(batch_max_F > 0, torch.maximum(self.exp_F, need_F), self.exp_F)
        shift_F = (new_exp_F - self.exp_F).clamp(max=62)
        if bool((shift_F > 0).any()):
            target_Fb = torch.arange(nb, device=shift_F.device)[None, :] >> shift_F[:, None]
            self.hist_Fb = torch.zeros_like(self.hist_Fb).scatter_add_(1, target_Fb, self.hist_Fb)
        self.exp_F = new_exp_F
        if f_idx.numel() == 0:
            return
        width = torch.exp2(new_exp_F[f_idx].double()) / nb
        bins = (vals.double() / width).floor().long().clamp_(0, nb - 1)
        self.hist_Fb += torch.bincount(f_idx * nb + bins, minlength=self.hist_Fb.numel()).view_as(
            self.hist_Fb
        )

    def sorted_top(self) -> tuple[Tensor, Tensor, Tensor]:
        """(values, token indices, windows) of the top contexts, strongest first (empty slots last)."""
        order = self.top_val_Fk.argsort(dim=1, descending=True, stable=True)
        idx_W = order[..., None].expand(-1, -1, self.top_win_FkW.shape[2])
        return (
            self.top_val_Fk.gather(1, order),
            self.top_tok_Fk.gather(1, order),
            self.top_win_FkW.gather(1, idx_W),
        )


@torch.no_grad()
def collect(model, hook, sae: SAE, ids_NT: Tensor, mask_NT: Tensor, latents: Tensor, f_cfg) -> LatentStats:
    """One pass over ids_NT: capture at the hook (early exit), encode, merge into LatentStats."""
    device = sae.W_dec_FD.device
    stats = LatentStats(len(latents), f_cfg, device)
    latents = latents.to(device)
    everything = len(latents) == sae.d_sae and bool((latents == torch.arange(sae.d_sae, device=device)).all())
    bs = int(f_cfg.batch_size)
    bar = tqdm(total=int(mask_NT.sum()), unit="tok", unit_scale=True, desc="features", disable=None)
    for start in range(0, ids_NT.shape[0], bs):
        x_CTD = capture(model, ids_NT[start : start + bs].to(device), None, [hook])[hook.name]
        C, T, D = x_CTD.shape
        acts_NF = sae.encode(x_CTD.reshape(C * T, D).to(sae.W_dec_FD.dtype))
        if not everything:
            acts_NF = acts_NF[:, latents]
        valid_CT = mask_NT[start : start + bs].to(device)
        stats.update(acts_NF.reshape(C, T, -1), valid_CT, start)
        bar.update(int(valid_CT.sum()))
    bar.close()
    return stats


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


def build_latents(stats: LatentStats, latents: Tensor, ids_NT: Tensor, f_cfg, logit) -> list[dict]:
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
