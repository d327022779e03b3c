"""One latent shard of an SAE: the training step when the F latents are split over S ranks.

A shard is an ordinary TopK, BatchTopK or ReLU module whose W_enc columns, b_enc entries and W_dec rows
are its own F/S latents (shard s holds latents [s*F/S, (s+1)*F/S)); b_dec and every other parameter or
buffer is replicated. `shard_module` turns a whole SAE into shard s; training/latent_shards.py gathers
the shards back into one ordinary SAE. The ranks holding the S shards of one replica call
`training_forward` together; `latent` (set by `shard_module`) is their communicator:

    latent.shard, latent.n_shards     this shard's index, S
    latent.gather_latent(t)           [S, *t.shape]: every shard's t, shard 0 first (no gradient)
    latent.sum_latent(t)              the sum over shards (no gradient)
    latent.gather_world(t)            every rank's t concatenated (all replicas' shards; BatchTopK threshold)
    latent.data_size                  how many data-parallel replicas split the global batch

Each step is exactly the whole SAE's, up to the order of float additions:
- pre-activations are local (x @ W_enc[:, shard] + bias[shard]);
- TopK: each shard proposes its rows' top min(k, F/S) candidates, the candidates' values are
  all-gathered and every shard takes the same global top k of them; a shard keeps its own winners
  (a losing candidate's value is multiplied by 0, so it adds exactly 0 to the decode and the gradients);
- BatchTopK: the threshold is the (k*B)-th largest pre-activation of the global batch over all shards
  (every rank's local top k*B values, all-gathered); AuxK picks the global top aux_k among all dead latents
  the same way as TopK;
- x_hat = sum over shards of the shard's partial decode, + b_dec: the sum's backward is the identity, since
  every shard computes the same loss from the same x_hat; b_dec's gradient through the encoder bias
  (-W_enc^T grad_bias) is summed over shards (its decoder gradient is already the same on every shard);
- ReLU: the L1 term is the sum of the shards' terms, with the same identity backward.
Decoder-norm constraints are per latent, so they stay local; the clipping norm, the logged L0 and dead
counts are reduced by the trainer (training/latent_shards.py).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import Parameter

from .base import SparseCode, TrainOutput
from .batch_reduce import centered_sq_sum
from .batchtopk import BatchTopKSAE
from .kernels import gather_encode, sparse_decode
from .relu import ReLUSAE
from .topk import TopKSAE

SHARDABLE = (TopKSAE, BatchTopKSAE, ReLUSAE)  # exact classes: subclasses (Matryoshka, ...) are not shardable
LATENT_PARAMS = {"W_enc_DF": 1, "b_enc_F": 0, "W_dec_FD": 0}  # name -> its latent dimension


class _SumPartials(torch.autograd.Function):
    """Forward: the sum of every shard's partial; backward: the identity (each shard's loss is the same)."""

    @staticmethod
    def forward(ctx, t: Tensor, latent) -> Tensor:
        return latent.sum_latent(t)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _SumGradients(torch.autograd.Function):
    """Forward: the identity; backward: the gradient summed over shards (a replicated input of local terms)."""

    @staticmethod
    def forward(ctx, t: Tensor, latent) -> Tensor:
        ctx.latent = latent
        return t.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return ctx.latent.sum_latent(grad.contiguous()), None


def shard_module(sae, latent):
    """Turn the whole SAE `sae` into its shard `latent.shard` of `latent.n_shards`, in place; returns it."""
    n, s = latent.n_shards, latent.shard
    per = sae.d_sae // n
    with torch.no_grad():
        for name, dim in LATENT_PARAMS.items():
            part = getattr(sae, name).narrow(dim, s * per, per)
            setattr(sae, name, Parameter(part.clone(memory_format=torch.contiguous_format)))
    sae.__class__ = _sharded_class(type(sae))
    sae.latent, sae.d_local = latent, per
    return sae


_CLASSES: dict[type, type] = {}


def _sharded_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Sharded{cls.__name__}", (LatentShard, cls), {})
    return _CLASSES[cls]


class LatentShard:
    """Mixed in before the architecture's class: the collective training step of one shard."""

    latent = None
    d_local = 0

    def encode(self, x_BD):
        raise RuntimeError("a latent shard holds only some latents; gather the shards into one SAE to encode")

    forward = decode = encode_sparse = encode

    def _shard_pre(self, x_BD: Tensor, grad: bool = False) -> tuple[Tensor, Tensor]:
        """(bias_F, pre_BF) of this shard's latents; b_dec's encoder gradient is summed over shards."""
        b_dec_D = _SumGradients.apply(self.b_dec_D, self.latent)
        bias_F = torch.addmv(self.b_enc_F, self.W_enc_DF.t(), b_dec_D, alpha=-1.0)
        with torch.set_grad_enabled(grad):
            return bias_F, torch.addmm(bias_F, x_BD, self.W_enc_DF)

    def _select_global(self, cand_BC: Tensor, k: int) -> Tensor:
        """Which of this shard's C candidates per row are among the global top k of every shard's C."""
        n_rows, c = cand_BC.shape
        all_BX = self.latent.gather_latent(cand_BC.contiguous()).permute(1, 0, 2).reshape(n_rows, -1)
        won_BX = torch.zeros(all_BX.shape, dtype=torch.bool, device=cand_BC.device)
        won_BX.scatter_(1, all_BX.topk(k, dim=1, sorted=False).indices, True)
        return won_BX[:, self.latent.shard * c : (self.latent.shard + 1) * c]

    def _reconstruct(self, partial_BD: Tensor) -> Tensor:
        return _SumPartials.apply(partial_BD, self.latent) + self.b_dec_D

    def training_forward(self, x_BD, sparsity_scale=1.0, dead_mask_F=None, target_BD=None) -> TrainOutput:
        y_BD = self._target(x_BD, target_BD)
        if isinstance(self, ReLUSAE):
            return self._relu_step(x_BD, y_BD, sparsity_scale)
        bias_F, pre_BF = self._shard_pre(x_BD)
        if isinstance(self, BatchTopKSAE):
            x_hat_BD, code = self._batchtopk_code(x_BD, bias_F, pre_BF)
        else:
            with torch.no_grad():
                cand_BC, idx_BC = pre_BF.topk(min(self.cfg.k, self.d_local), dim=1, sorted=False)
                won_BC = self._select_global(cand_BC, self.cfg.k)
            vals_BC = gather_encode(x_BD, self.W_enc_DF, bias_F, pre_BF, idx_BC).relu() * won_BC
            x_hat_BD = self._reconstruct(sparse_decode(idx_BC, vals_BC, self.W_dec_FD, None))
            code = SparseCode(idx_BC, vals_BC.detach(), self.d_local, x_BD.shape[0])
        mse = self.mse(x_hat_BD, y_BD)
        loss, parts = mse, {"mse": mse.detach()}
        if self.cfg.aux_k_coefficient > 0 and dead_mask_F is not None:
            aux = self._shard_aux_k(x_BD, y_BD, x_hat_BD.detach(), pre_BF, bias_F, dead_mask_F)
            loss = loss + self.cfg.aux_k_coefficient * aux
            parts["aux_k"] = aux.detach()
        return TrainOutput(loss=loss, parts=parts, x_hat_BD=x_hat_BD.detach(), sparse=code)

    def _batchtopk_code(self, x_BD, bias_F, pre_BF) -> tuple[Tensor, SparseCode]:
        n_rows = pre_BF.shape[0]
        with torch.no_grad():
            n_keep = self.cfg.k * n_rows * self.latent.data_size  # of the global batch
            local = pre_BF.reshape(-1).topk(min(n_keep, pre_BF.numel()), sorted=False).values
            t = self.latent.gather_world(local).topk(n_keep, sorted=False).values.min()
            self._update_threshold(t)
            keep_BF = (pre_BF >= t) & (pre_BF > 0)
            rows_N, idx_N = keep_BF.nonzero().unbind(1)  # row-major: entries grouped by row
            offsets_B = torch.zeros(n_rows, dtype=idx_N.dtype, device=idx_N.device)
            torch.cumsum(keep_BF.sum(1)[:-1], 0, out=offsets_B[1:])
        vals_N = gather_encode(x_BD, self.W_enc_DF, bias_F, pre_BF, idx_N, rows_N, offsets_B)
        x_hat_BD = self._reconstruct(sparse_decode(idx_N, vals_N, self.W_dec_FD, None, offsets_B))
        return x_hat_BD, SparseCode(idx_N, vals_N.detach(), self.d_local, n_rows, rows_N)

    def _shard_aux_k(self, x_BD, y_BD, x_hat_BD, pre_BF, bias_F, dead_mask_F) -> Tensor:
        """AuxK over the dead latents of every shard: the global top aux_k of them per row."""
        dead_idx = dead_mask_F.to(pre_BF.device).nonzero().squeeze(1)
        n_dead = int(self.latent.sum_latent(torch.tensor(dead_idx.numel(), device=pre_BF.device)))
        if n_dead == 0:
            return pre_BF.new_zeros(())
        k_aux, n_rows = min(self.aux_k, n_dead), pre_BF.shape[0]
        with torch.no_grad():  # this shard's candidates, padded with -inf to k_aux (never among the winners)
            cand_BA = pre_BF.new_full((n_rows, k_aux), float("-inf"))
            idx_BA = torch.zeros(n_rows, k_aux, dtype=torch.long, device=pre_BF.device)
            c = min(k_aux, dead_idx.numel())
            if c:
                top = pre_BF.index_select(1, dead_idx).topk(c, dim=1, sorted=False)
                cand_BA[:, :c], idx_BA[:, :c] = top.values, dead_idx[top.indices]
            won_BA = self._select_global(cand_BA, k_aux)
        vals_BA = gather_encode(x_BD, self.W_enc_DF, bias_F, pre_BF, idx_BA).relu() * won_BA
        resid_BD = y_BD - x_hat_BD
        resid_hat_BD = _SumPartials.apply(sparse_decode(idx_BA, vals_BA, self.W_dec_FD, None), self.latent)
        denom = centered_sq_sum(self.collective, resid_BD).clamp_min(1e-12)  # over the global batch
        return (resid_hat_BD - resid_BD).pow(2).sum() / denom

    def _relu_step(self, x_BD, y_BD, sparsity_scale: float) -> TrainOutput:
        _, pre_BF = self._shard_pre(x_BD, grad=True)
        acts_BF = pre_BF.relu()
        x_hat_BD = self._reconstruct(acts_BF @ self.W_dec_FD)
        mse = self.mse(x_hat_BD, y_BD)
        if self.cfg.sparsity_penalty == "l1_decoder_norm":
            l1 = torch.mv(acts_BF, self.decoder_norms_F().to(acts_BF.dtype)).mean()
        else:
            l1 = acts_BF.sum() / x_BD.shape[0]
        l1 = _SumPartials.apply(l1, self.latent)
        loss = mse + (self.cfg.l1_coefficient * sparsity_scale) * l1
        return TrainOutput(
            loss=loss, parts={"mse": mse.detach(), "l1": l1.detach()}, acts_BF=acts_BF.detach(),
            x_hat_BD=x_hat_BD.detach(),
        )  # fmt: skip
