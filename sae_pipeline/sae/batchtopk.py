"""BatchTopK SAE (Bussmann et al. 2024): training keeps the k*B largest activations of the whole batch.

Training selection is exact but cheap: take each row's top-m candidates (m = 4k, doubled when needed), find
the (k*B)-th largest candidate value t, and keep every candidate >= t and > 0. This equals the global batch
top-k whenever no row has its m-th candidate >= t (then no element outside the candidates can reach t);
otherwise m doubles and we retry.

Inference (`encode`) must not couple rows, so it uses one learned scalar threshold: a buffer holding the
exponential moving average (momentum `threshold_momentum`) of the per-batch threshold t, i.e. the smallest
activation kept by batch top-k in that training batch (the first batch sets it directly). At inference a
latent is active iff its pre-activation exceeds that threshold, so each row's code depends on that row only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sae_pipeline.errors import UserError

from .base import SAE, SparseCode, TrainOutput
from .batch_reduce import kth_largest
from .kernels import gather_encode, sparse_decode
from .native import topk
from .registry import register
from .topk import TopKConfig, TopKSAE


@dataclass
class BatchTopKConfig(TopKConfig):
    """BatchTopK SAE: k is the average number of active latents per row."""

    arch: str = "batchtopk"
    threshold_momentum: float = 0.99  # EMA momentum of the inference threshold estimate (per training step)

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.threshold_momentum < 1.0:
            raise UserError(f"sae.threshold_momentum must be in [0, 1), got {self.threshold_momentum}.")


@register
class BatchTopKSAE(TopKSAE):
    config_class = BatchTopKConfig
    cfg: BatchTopKConfig

    def _init_extra(self) -> None:
        super()._init_extra()
        self.register_buffer("threshold", torch.zeros(()))  # inference threshold (pre-activation units)
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.int64))  # EMA updates so far

    def _fold_extra(self, inv: float) -> None:
        self.threshold.mul_(inv)

    def encode(self, x_BD: Tensor) -> Tensor:
        pre_BF = self.pre_acts(x_BD)
        return torch.where(pre_BF > self.threshold.clamp_min(0), pre_BF, 0.0)

    def forward(self, x_BD: Tensor) -> Tensor:
        return self.decode_from(self.encode(x_BD), x_BD)

    def encode_sparse(self, x_BD: Tensor) -> tuple[Tensor, Tensor]:
        """The thresholded inference code as (indices, values), not TopK's per-row top k."""
        return SAE.encode_sparse(self, x_BD)

    @torch.no_grad()
    def _batch_select(self, pre_BF: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(idx_BM, keep_BM, t): per-row candidate indices, which of them batch top-k keeps, its threshold."""
        n_rows, d_sae = pre_BF.shape
        n_keep = self.cfg.k * n_rows
        if pre_BF.numel() <= 1 << 18 or self.collective is not None:  # exact threshold over all entries
            t = kth_largest(self.collective, pre_BF, n_keep)  # of the global batch when data-parallel
            m_eff = max(1, int(((pre_BF >= t) & (pre_BF > 0)).sum(1).max()))
            vals_BM, idx_BM = topk(pre_BF, m_eff, sorted=True)
            return idx_BM, (vals_BM >= t) & (vals_BM > 0), t
        m = min(4 * self.cfg.k, d_sae)
        while True:
            cand_vals_BM, cand_idx_BM = topk(pre_BF, m, sorted=True)
            flat = cand_vals_BM.reshape(-1)
            t = flat.kthvalue(flat.numel() - n_keep + 1).values  # n_keep-th largest candidate
            last_B = cand_vals_BM[:, -1]
            if m == d_sae or not bool(((last_B >= t) & (last_B > 0)).any()):
                break
            m = min(2 * m, d_sae)
        keep_BM = (cand_vals_BM >= t) & (cand_vals_BM > 0)
        m_eff = max(1, int(keep_BM.sum(1).max()))  # candidates are sorted, so kept ones form a prefix
        return cand_idx_BM[:, :m_eff], keep_BM[:, :m_eff], t

    @torch.no_grad()
    def _update_threshold(self, t: Tensor) -> None:
        if not t > 0:
            return
        if int(self.threshold_updates) == 0:
            self.threshold.copy_(t)
        else:
            self.threshold.lerp_(t.to(self.threshold.dtype), 1.0 - self.cfg.threshold_momentum)
        self.threshold_updates += 1

    def training_forward(
        self,
        x_BD: Tensor,
        sparsity_scale: float = 1.0,
        dead_mask_F: Tensor | None = None,
        target_BD: Tensor | None = None,
    ) -> TrainOutput:
        y_BD = self._target(x_BD, target_BD)
        bias_F, pre_BF = self._dense_pre(x_BD)
        with torch.no_grad():
            idx_BM, keep_BM, t = self._batch_select(pre_BF)
            self._update_threshold(t)
            # Compact the kept entries (rows own different numbers of them) into flat per-row bags, so the
            # decode and the encoder backward touch only the k*B kept entries, not the padded B x m_eff.
            n_rows = pre_BF.shape[0]
            rows_N = keep_BM.nonzero()[:, 0]  # row-major: entries grouped by row
            idx_N = idx_BM[keep_BM]
            offsets_B = torch.zeros(n_rows, dtype=idx_N.dtype, device=idx_N.device)
            torch.cumsum(keep_BM.sum(1)[:-1], 0, out=offsets_B[1:])
        vals_N = gather_encode(x_BD, self.W_enc_DF, bias_F, pre_BF, idx_N, rows_N, offsets_B)
        x_hat_BD = sparse_decode(idx_N, vals_N, self.W_dec_FD, self.b_dec_D, offsets_B)
        x_hat_BD = self._with_skip(x_BD, x_hat_BD)
        code = SparseCode(idx_N, vals_N.detach(), self.d_sae, n_rows, rows_N)
        return self._output(x_BD, y_BD, x_hat_BD, pre_BF, bias_F, dead_mask_F, code)
