"""Shared parts of every SAE architecture: config base, module base, init, decoder norms, scale folding.

Shapes: B batch, D input (model) dimension, F dictionary size, K active latents kept per row, O the output
dimension of a transcoder (= D for an SAE).

Transcoders: built with `d_out` (even when it equals d_in), an SAE's decoder predicts another hook's
activations y [B, O] from x [B, D]: y_hat = decode(encode(x)) (+ x @ W_skip_DO with `skip`: a skip
transcoder). The encoder then does not subtract b_dec (it lives in the output space): pre = x @ W_enc + b_enc.
`training_forward(x, target_BD=y)` scores y_hat against y; without a target it scores against x.

Every architecture trains on inputs that the trainer multiplied by `s` (see `input_scale_factor`), with
reconstruction loss = squared error summed over D, averaged over B.  The encoder is written as
`x @ W_enc + (b_enc - b_dec @ W_enc)`, which equals `(x - b_dec) @ W_enc + b_enc` but lets autograd skip
the dense B x D input-gradient matmul (the b_dec gradient through the encoder becomes a matvec).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from sae_pipeline.errors import UserError

from .kernels import scatter_dense

B_DEC_INITS = ("geometric_median", "mean", "zeros")


@dataclass
class SAEConfig:
    """Settings shared by every architecture (plain dataclass: usable as a Hydra/OmegaConf schema)."""

    arch: str = "relu"  # registry name of the architecture
    expansion_factor: float = 8.0  # d_sae = round(expansion_factor * d_in) unless d_sae > 0
    d_sae: int = 0  # absolute dictionary width; 0 means use expansion_factor
    # how init_from_data sets b_dec: geometric_median | mean | zeros
    b_dec_init: str = "geometric_median"
    # train on x * s where s makes the mean ||x|| equal sqrt(d_in); folded into the weights at save
    normalize_input: bool = True
    # transcoders only: add a learned linear map of the input, y_hat = decode(encode(x)) + x @ W_skip
    skip: bool = False

    def validate(self) -> None:
        """Raise UserError naming the first bad key; subclasses extend this."""
        if self.d_sae < 0:
            raise UserError(f"sae.d_sae must be >= 0 (0 means use expansion_factor), got {self.d_sae}.")
        if self.d_sae == 0 and not self.expansion_factor > 0:
            raise UserError(
                f"sae.expansion_factor must be > 0 when sae.d_sae is 0, got {self.expansion_factor}."
            )
        if self.b_dec_init not in B_DEC_INITS:
            raise UserError(
                f"sae.b_dec_init must be one of {', '.join(B_DEC_INITS)}, got {self.b_dec_init!r}."
            )

    def resolve_d_sae(self, d_in: int) -> int:
        return self.d_sae if self.d_sae > 0 else max(1, round(self.expansion_factor * d_in))

    @staticmethod
    def _check_nonnegative(name: str, value: float) -> None:
        if not (value >= 0 and math.isfinite(value)):
            raise UserError(f"sae.{name} must be a finite number >= 0, got {value}.")

    @staticmethod
    def _check_positive(name: str, value: float) -> None:
        if not (value > 0 and math.isfinite(value)):
            raise UserError(f"sae.{name} must be a finite number > 0, got {value}.")


@dataclass
class SparseCode:
    """The kept entries of a batch's latent activations (detached): `idx` latent indices and `vals` their
    activations, [B, K] per row, or flat [N] with `rows_N` naming each entry's row (BatchTopK)."""

    idx: Tensor
    vals: Tensor
    d_sae: int
    n_rows: int
    rows_N: Tensor | None = None

    def dense(self) -> Tensor:
        """The [B, F] activations (a B x F scatter: what the trainer's statistics avoid)."""
        return scatter_dense(self.idx, self.vals, self.d_sae, self.rows_N, self.n_rows)


class TrainOutput:
    """What `SAE.training_forward` returns.

    loss: scalar to backpropagate (sum of the weighted parts); parts: loss terms before the sparsity warm-up
    weighting ("mse", "l1", ...); x_hat_BD: the reconstruction (detached). The activations come as dense
    `acts_BF` or, for architectures that keep K latents per row, as a `sparse` code; `acts_BF` of a sparse
    output is built (and cached) on first access only, so the training loop never pays for it."""

    def __init__(
        self,
        loss: Tensor,
        parts: dict[str, Tensor] | None = None,
        acts_BF: Tensor | None = None,
        x_hat_BD: Tensor | None = None,
        sparse: SparseCode | None = None,
    ):
        self.loss, self.parts, self.x_hat_BD, self.sparse = loss, parts or {}, x_hat_BD, sparse
        self._acts_BF = acts_BF

    @property
    def acts_BF(self) -> Tensor | None:
        """Dense latent activations (detached)."""
        if self._acts_BF is None and self.sparse is not None:
            self._acts_BF = self.sparse.dense()
        return self._acts_BF


def scale_for_mean_norm(d_in: int, mean_norm: float) -> float:
    """The factor s with mean ||x * s|| == sqrt(d_in) (what `normalize_input` trains on)."""
    if not (mean_norm > 0 and math.isfinite(mean_norm)):
        raise UserError(f"cannot normalise inputs: the activations' mean norm is {mean_norm}.")
    return math.sqrt(d_in) / mean_norm


def input_scale_factor(x_ND: Tensor) -> float:
    """`scale_for_mean_norm` measured on a sample of activations."""
    return scale_for_mean_norm(x_ND.shape[-1], x_ND.float().norm(dim=-1).mean().item())


def geometric_median(x_ND: Tensor, n_iter: int = 20, eps: float = 1e-6) -> Tensor:
    """Weiszfeld iterations starting from the mean: the point minimising the sum of Euclidean distances."""
    x_ND = x_ND.float()
    median_D = x_ND.mean(0)
    for _ in range(n_iter):
        weights_N = 1.0 / (x_ND - median_D).norm(dim=1).clamp_min(eps)
        new_D = (weights_N @ x_ND) / weights_N.sum()
        if (new_D - median_D).norm() <= 1e-7 * (1.0 + median_D.norm()):
            median_D = new_D
            break
        median_D = new_D
    return median_D


def any_leading_shape(fn):
    """Let a method written for [B, D] rows take [..., D]: leading dimensions are flattened and restored.

    2-D inputs (the trainer's) go straight through. Outputs (a tensor or a tuple of tensors) get the input's
    leading shape back, with their own last dimension.
    """

    @functools.wraps(fn)
    def wrapper(self, x, *args, **kwargs):
        if x.ndim == 2:
            return fn(self, x, *args, **kwargs)
        lead = x.shape[:-1]
        out = fn(self, x.reshape(-1, x.shape[-1]), *args, **kwargs)
        if isinstance(out, tuple):
            return tuple(o.reshape(*lead, o.shape[-1]) for o in out)
        return out.reshape(*lead, out.shape[-1])

    wrapper.any_leading_shape = True
    return wrapper


LEADING_SHAPE_METHODS = ("encode", "encode_sparse", "decode", "forward")


class SAE(nn.Module):
    """Base class: parameters W_enc_DF, b_enc_F, W_dec_FD, b_dec_D plus whatever the architecture adds.

    encode / encode_sparse / decode / forward take any leading shape `[..., D]` (`any_leading_shape` wraps
    them in every subclass too), so architectures write them for [B, D] rows only.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in LEADING_SHAPE_METHODS:
            fn = cls.__dict__.get(name)
            if fn is not None and not getattr(fn, "any_leading_shape", False):
                setattr(cls, name, any_leading_shape(fn))

    config_class: ClassVar[type[SAEConfig]] = SAEConfig
    # Initial encoder = this scale times the decoder transpose (decoder rows: random directions, norm
    # `_init_row_norm()`).
    encoder_init_scale: ClassVar[float] = 1.0
    # The default peak learning rate (train.lr unset) is this times 2e-4 / sqrt(d_sae / 2**14) (training/schedule.py).
    default_lr_scale: ClassVar[float] = 1.0
    # Data-parallel training: the trainer sets this to the job's ranks (see sae/batch_reduce.py); None = one process.
    collective = None

    def default_dead_tokens(self) -> int:  # dead after this many silent tokens (train.dead_tokens unset)
        return 500_000

    def __init__(self, cfg: SAEConfig, d_in: int, seed: int | None = None, d_out: int | None = None):
        super().__init__()
        if not isinstance(cfg, self.config_class):
            raise UserError(
                f"sae.arch {cfg.arch!r} needs a {self.config_class.__name__}, got {type(cfg).__name__}."
            )
        cfg.validate()
        if d_in <= 0:
            raise UserError(f"d_in must be a positive integer, got {d_in}.")
        if d_out is not None and d_out <= 0:
            raise UserError(f"d_out must be a positive integer, got {d_out}.")
        if cfg.skip and d_out is None:
            raise UserError(
                "sae.skip=true needs a transcoder (train.target_store=<store of the target hook>): "
                "the skip connection maps the input to another hook's activations."
            )
        self.cfg = cfg
        self.d_in = int(d_in)
        self.transcoder = d_out is not None
        self.d_out = int(d_out) if d_out is not None else self.d_in
        self.d_sae = cfg.resolve_d_sae(d_in)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        W_dec_FD = torch.randn(self.d_sae, self.d_out, generator=gen)
        W_dec_FD /= W_dec_FD.norm(dim=1, keepdim=True)
        # multiplied only when needed, so unit rows stay bit-identical to the previous versions' init
        if self._init_row_norm() != 1.0:
            W_dec_FD *= self._init_row_norm()
        if self.transcoder:  # input and output spaces differ: the encoder gets its own unit directions
            W_enc_DF = torch.randn(self.d_in, self.d_sae, generator=gen)
            W_enc_DF /= W_enc_DF.norm(dim=0, keepdim=True)
        else:
            W_enc_DF = W_dec_FD.t().contiguous()
        self.W_enc_DF = nn.Parameter(W_enc_DF * self.encoder_init_scale)
        self.b_enc_F = nn.Parameter(torch.zeros(self.d_sae))
        self._init_decoder(W_dec_FD)
        self.b_dec_D = nn.Parameter(torch.zeros(self.d_out))
        self.W_skip_DO = nn.Parameter(torch.zeros(self.d_in, self.d_out)) if cfg.skip else None
        self._init_extra()

    # ----- hooks for subclasses -----
    def _init_decoder(self, W_dec_FD: Tensor) -> None:
        """Register the decoder (a tied architecture keeps none: its W_dec_FD is a view of W_enc_DF)."""
        self.W_dec_FD = nn.Parameter(W_dec_FD)

    def _init_row_norm(self) -> float:
        """The norm of every initial decoder row (random directions); unit unless the architecture says."""
        return 1.0

    def _init_extra(self) -> None:
        """Create architecture-specific parameters/buffers."""

    @property
    def unit_norm_decoder(self) -> bool:
        """Whether decoder rows are constrained to unit norm (gradient projection + renormalisation)."""
        return True

    def _fold_extra(self, s: float) -> None:
        """Rescale architecture-specific pre-activation quantities (biases, thresholds) by 1/s."""

    def _fold_factors(self, s_in: float, s_out: float) -> tuple[float, float]:
        """(factor on W_enc, factor on everything on the pre-activation scale) that fold input scale s_in and
        target scale s_out: pre' (x) = pre(x * s_in) / s_out, so activations come out in target units."""
        return s_in / s_out, 1.0 / s_out

    # ----- shared pieces -----
    def _enc_bias_F(self, b_F: Tensor) -> Tensor:
        """b - b_dec @ W_enc, so that x @ W_enc + this == (x - b_dec) @ W_enc + b (a transcoder: b)."""
        if self.transcoder:
            return b_F
        return torch.addmv(b_F, self.W_enc_DF.t(), self.b_dec_D, alpha=-1.0)

    def _enc_shift_F(self) -> Tensor:
        """b_dec @ W_enc, what the encoder subtracts (zero for a transcoder: b_dec is in the output space)."""
        if self.transcoder:
            return self.b_enc_F.new_zeros(self.d_sae)
        return self.b_dec_D @ self.W_enc_DF

    def _with_skip(self, x_BD: Tensor, y_hat_BO: Tensor) -> Tensor:
        """y_hat + x @ W_skip for a skip transcoder, else y_hat."""
        if self.W_skip_DO is None:
            return y_hat_BO
        return y_hat_BO + (x_BD @ self.W_skip_DO).to(y_hat_BO.dtype)

    def _target(self, x_BD: Tensor, target_BD: Tensor | None) -> Tensor:
        """What the reconstruction is scored against: the target rows of a transcoder, else x itself."""
        if target_BD is None:
            if self.transcoder:
                raise UserError("a transcoder's training_forward needs target_BD (the target hook's rows).")
            return x_BD
        if target_BD.shape != (x_BD.shape[0], self.d_out):
            raise UserError(
                f"target_BD has shape {list(target_BD.shape)}, expected [{x_BD.shape[0]}, {self.d_out}]."
            )
        return target_BD

    def decode_from(self, acts_BF: Tensor, x_BD: Tensor) -> Tensor:
        """decode(acts) plus the skip term of the input x that produced them (a skip transcoder's output)."""
        return self._with_skip(x_BD, self.decode(acts_BF))

    def pre_acts(self, x_BD: Tensor) -> Tensor:
        """(x - b_dec) @ W_enc + b_enc, computed as one addmm."""
        return torch.addmm(self._enc_bias_F(self.b_enc_F), x_BD, self.W_enc_DF)

    @any_leading_shape
    def encode(self, x_BD: Tensor) -> Tensor:
        raise NotImplementedError

    @any_leading_shape
    def encode_sparse(self, x_BD: Tensor) -> tuple[Tensor, Tensor]:
        """(idx_BK, vals_BK): each row's active latents, largest first; K is the most any row has (>= 1) and
        shorter rows are padded with value 0, so sum_k vals[b, k] * W_dec[idx[b, k]] + b_dec == decode."""
        acts_BF = self.encode(x_BD)  # activations are >= 0 in every architecture
        k = max(1, int((acts_BF > 0).sum(1).max())) if acts_BF.shape[0] else 1
        vals_BK, idx_BK = acts_BF.topk(min(k, self.d_sae), dim=1)
        return idx_BK, vals_BK

    @any_leading_shape
    def decode(self, acts_BF: Tensor) -> Tensor:
        return torch.addmm(self.b_dec_D, acts_BF, self.W_dec_FD)

    @any_leading_shape
    def forward(self, x_BD: Tensor) -> Tensor:
        return self.decode_from(self.encode(x_BD), x_BD)

    def training_forward(
        self,
        x_BD: Tensor,
        sparsity_scale: float = 1.0,
        dead_mask_F: Tensor | None = None,
        target_BD: Tensor | None = None,
    ) -> TrainOutput:
        """Loss of reconstructing target_BD (default x_BD) from x_BD; see TrainOutput."""
        raise NotImplementedError

    @staticmethod
    def mse(x_hat_BD: Tensor, x_BD: Tensor) -> Tensor:
        """Squared error summed over D, mean over B (the seed's reconstruction loss)."""
        diff_BD = x_hat_BD - x_BD
        return diff_BD.pow(2).sum() / x_BD.shape[0]

    def decoder_norms_F(self) -> Tensor:
        return self.W_dec_FD.norm(dim=1)

    @torch.no_grad()
    def init_from_data(self, x_ND: Tensor, target_ND: Tensor | None = None) -> None:
        """Set b_dec from a data sample (already scaled the way training inputs are); for a transcoder from
        its target rows, since b_dec lives in the output space."""
        if self.transcoder:
            if target_ND is None:
                raise UserError("init_from_data of a transcoder needs its target rows (target_ND).")
            x_ND = target_ND
        if x_ND.ndim != 2 or x_ND.shape[1] != self.d_out:
            raise UserError(
                f"init_from_data expects a sample of shape [N, {self.d_out}], got {list(x_ND.shape)}."
            )
        x_ND = x_ND.to(self.b_dec_D.device, torch.float32)
        if self.cfg.b_dec_init == "geometric_median":
            self.b_dec_D.copy_(geometric_median(x_ND))
        elif self.cfg.b_dec_init == "mean":
            self.b_dec_D.copy_(x_ND.mean(0))
        else:
            self.b_dec_D.zero_()

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Remove the gradient component parallel to each (unit-norm) decoder row."""
        if not self.unit_norm_decoder or self.W_dec_FD.grad is None:
            return
        W_FD, grad_FD = self.W_dec_FD, self.W_dec_FD.grad
        parallel_F1 = (grad_FD * W_FD).sum(dim=1, keepdim=True)
        grad_FD.addcmul_(parallel_F1, W_FD, value=-1.0)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Renormalise decoder rows to unit norm where the architecture constrains them."""
        if self.unit_norm_decoder:
            self.W_dec_FD.div_(self.W_dec_FD.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def fold_input_scale(self, s: float, s_out: float | None = None) -> None:
        """The SAE was trained on x * s; afterwards it takes raw x and returns raw-unit x_hat.

        Decoder directions (and their norms) are kept, so activations come out in raw units: for raw x,
        new encode(x) == old encode(x * s) / s and new forward(x) == old forward(x * s) / s exactly (up to
        rounding). Everything on the pre-activation scale (b_enc, thresholds, gate/magnitude biases) and b_dec
        are divided by s; W_enc, W_dec and multiplicative parameters are unchanged.

        A transcoder trained to map x * s to y * s_out: new forward(x) == old forward(x * s) / s_out. W_enc is
        multiplied by s / s_out and the pre-activation scale divided by s_out (activations in target units),
        b_dec divided by s_out and W_skip multiplied by s / s_out.
        """
        s_out = s if s_out is None else s_out
        for value in (s, s_out):
            if not (value > 0 and math.isfinite(value)):
                raise UserError(f"input scale factor must be a finite number > 0, got {value}.")
        enc, pre = self._fold_factors(float(s), float(s_out))
        if enc != 1.0:
            self.W_enc_DF.mul_(enc)
        self.b_dec_D.mul_(1.0 / float(s_out))
        self.b_enc_F.mul_(pre)
        self._fold_extra(pre)
        if self.W_skip_DO is not None:
            self.W_skip_DO.mul_(float(s) / float(s_out))

    def extra_repr(self) -> str:
        out = f"arch={self.cfg.arch}, d_in={self.d_in}, d_sae={self.d_sae}"
        return out + (f", d_out={self.d_out} (transcoder)" if self.transcoder else "")
