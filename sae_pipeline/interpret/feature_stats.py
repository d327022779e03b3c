"""One pass of per-latent statistics for the feature browser, held as [F, k] tensors.

    stats = collect(model, hook, sae, ids_NT, mask_NT, latents, f_cfg)   # capture, encode, merge
    values, tokens, windows = stats.sorted_top()

- top contexts: each context's peak activation per latent, streaming top-k over [best, batch] (a context
  appears at most once per latent; the window is centred on its peak token);
- weak examples: a uniform sample of each latent's firing positions (random priorities, streaming top-r
  on them);
- silent contexts: a uniform sample of the contexts where a latent never fires (random priorities, a
  window at a random valid position): the negatives sae-explain's detection scoring needs;
- histogram: exact counts in linear bins over [0, 2^e_f], e_f growing with the running max (bins merge
  pairwise when the range doubles, so counts stay exact);
- firing counts, activation sums and maxima.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae_pipeline.model.activations import capture
from sae_pipeline.progress import progress
from sae_pipeline.sae import SAE


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


class FeatureStats:
    """Per-latent running statistics over a stream of [contexts, positions, F] activation batches.

    Examples carry the activations of their whole token window (W = before + 1 + after), read while the
    context is in memory, so no second pass is needed; token ids come from the kept input ids. Slots are
    replaced in place (see `_accept`) and only new examples' windows are read; `sorted_*` order them.
    """

    def __init__(self, n_latents: int, f_cfg, device):
        F, k, r, z = n_latents, int(f_cfg.top_k), int(f_cfg.advanced.reservoir), int(f_cfg.n_silent)
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
        self.sil_key_Fz = torch.full((F, z), -1.0, device=device)  # random priority; -1 = empty
        self.sil_tok_Fz = torch.full((F, z), -1, dtype=torch.long, device=device)  # ctx * T + window centre
        self.count_F = torch.zeros(F, dtype=torch.long, device=device)
        self.sum_F = torch.zeros(F, dtype=torch.float64, device=device)
        self.max_F = torch.zeros(F, device=device)
        self.exp_F = torch.full((F,), -200, dtype=torch.long, device=device)  # histogram range 2^exp
        self.hist_Fb = torch.zeros((F, self.n_bins), dtype=torch.long, device=device)
        self.n_tokens = 0
        self.gen = torch.Generator(device=device).manual_seed(int(f_cfg.seed))
        # a generator of its own, so the silent sample leaves the weak examples' draws unchanged
        self.sil_gen = torch.Generator(device=device).manual_seed(int(f_cfg.seed) + 1)

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

        self._update_silent(peak_CF, valid_CT, offset)

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

    def _update_silent(self, peak_CF: Tensor, valid_CT: Tensor, offset: int) -> None:
        """Contexts whose peak is 0 for a latent compete for its silent slots by random priority."""
        C, T = valid_CT.shape
        if self.sil_key_Fz.shape[1] == 0:
            return
        keys_CT = torch.rand((C, T), generator=self.sil_gen, device=valid_CT.device)
        centre_C = keys_CT.masked_fill(~valid_CT, -1.0).argmax(dim=1)  # a random valid position
        prio_CF = 1.0 - torch.rand(peak_CF.shape, generator=self.sil_gen, device=peak_CF.device)
        silent_CF = (peak_CF <= 0) & valid_CT.any(dim=1, keepdim=True)
        rows, slots, cols = _accept(self.sil_key_Fz, torch.where(silent_CF, prio_CF, -2.0).T)
        self.sil_key_Fz[rows, slots] = prio_CF[cols, rows]
        self.sil_tok_Fz[rows, slots] = offset + cols * T + centre_C[cols]

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
def collect(model, hook, sae: SAE, ids_NT: Tensor, mask_NT: Tensor, latents: Tensor, f_cfg) -> FeatureStats:
    """One pass over ids_NT: capture at the hook (early exit), encode, merge into FeatureStats."""
    device = sae.W_dec_FD.device
    stats = FeatureStats(len(latents), f_cfg, device)
    latents = latents.to(device)
    everything = len(latents) == sae.d_sae and bool((latents == torch.arange(sae.d_sae, device=device)).all())
    bs = int(f_cfg.batch_size)
    bar = progress(int(mask_NT.sum()), "features")
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
