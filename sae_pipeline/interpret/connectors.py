"""Feature connectors (seeds/002): a sparse map from one SAE's features to the next layer's SAE's features.

Two consecutive layers L2 = ReLU(L1 W^T + b), each unwrapped by an SAE (F_i = encode_i(L_i), L_i ~ decode_i(F_i)).
The connector learns
    F2 ~ ReLU(F1 @ W_IO + b_O)          loss = sum_O (F2_hat - F2)^2 (mean over rows) + l1 * sum |W_IO|
I and O are the input and output dictionary sizes. Two initialisations are offered:
    random  small Gaussian W_IO, zero b_O (the seed found this reaches a lower loss)
    e2wd1   the seed's "ignore the inner ReLU" guess W2 = E2 W D1, b2 = E2 b + e2, written in our row-vector
            convention (see `e2wd1_init`); with identity SAEs it equals the layer exactly.

    conn, metrics = train_connector(f1_NI, f2_NO, ConnectorConfig(l1_coefficient=3e-4))
    print(format_connections(conn.W_IO, n_outputs=5))
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from sae_pipeline.errors import UserError

CONNECTOR_INITS = ("random", "e2wd1")


@dataclass
class ConnectorConfig:
    """How a feature connector is trained (full-batch or mini-batch Adam on in-memory feature pairs)."""

    l1_coefficient: float = 3e-4  # weight of sum |W_IO| (summed over entries) against the summed-over-O MSE
    init: str = "random"  # random | e2wd1 (needs the layer's weight and bias; see e2wd1_init)
    init_std: float = 0.01  # std of the random init of W_IO
    lr: float = 3e-3  # Adam learning rate, decayed linearly to 0 over the steps
    steps: int = 2000  # optimizer steps
    batch_size: int = 0  # rows per step; 0 = all rows (full batch)
    # |w| below prune_fraction * max|W| counts as no connection in the density and connection lists
    prune_fraction: float = 0.01
    # train on F1 * s1 and F2 * s2, each scaled to mean row norm 1, so l1_coefficient means the same for any
    # model's feature magnitudes; W_IO and b_O are returned (and scored) in raw feature units
    normalize: bool = True
    seed: int = 0

    def validate(self) -> None:
        if self.init not in CONNECTOR_INITS:
            raise UserError(f"connect.init must be one of {', '.join(CONNECTOR_INITS)}, got {self.init!r}.")
        for name in ("l1_coefficient", "prune_fraction", "init_std"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise UserError(f"connect.{name} must be a finite number >= 0, got {value}.")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"connect.lr must be a finite number > 0, got {self.lr}.")
        if self.steps < 1:
            raise UserError(f"connect.steps must be >= 1, got {self.steps}.")
        if self.batch_size < 0:
            raise UserError(f"connect.batch_size must be >= 0 (0 = full batch), got {self.batch_size}.")


class FeatureConnector(nn.Module):
    """F2_hat = ReLU(F1 @ W_IO + b_O)."""

    def __init__(self, d_in_features: int, d_out_features: int):
        super().__init__()
        self.W_IO = nn.Parameter(torch.zeros(d_in_features, d_out_features))
        self.b_O = nn.Parameter(torch.zeros(d_out_features))

    def forward(self, f1_BI: Tensor) -> Tensor:
        return torch.addmm(self.b_O, f1_BI, self.W_IO).relu()


@torch.no_grad()
def e2wd1_init(sae_in, sae_out, weight_HD: Tensor, bias_H: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(W_IO, b_O): the seed's W2 = E2 W D1, b2 = E2 b + e2 for layers L2 = ReLU(L1 @ weight^T + bias).

    With x_hat1 = F1 @ W_dec1 + b_dec1 and F2 = ReLU((L2 - b_dec2) @ W_enc2 + b_enc2), dropping the inner ReLU:
        W_IO = W_dec1 @ weight^T @ W_enc2
        b_O  = (b_dec1 @ weight^T + bias - b_dec2) @ W_enc2 + b_enc2
    `weight_HD` is an nn.Linear weight [d_out_layer, d_in_layer]. Only ReLU-type SAEs (encode = ReLU(pre_acts))
    fit the seed's formula; for others this is still a reasonable starting point.
    """
    W_dec1_ID, b_dec1_D = sae_in.W_dec_FD.float(), sae_in.b_dec_D.float()
    W_enc2_HO, b_dec2_H = sae_out.W_enc_DF.float(), sae_out.b_dec_D.float()
    weight_HD = weight_HD.float()
    if weight_HD.shape != (sae_out.d_in, sae_in.d_in):
        raise UserError(
            f"the layer weight has shape {list(weight_HD.shape)}; the SAEs need [{sae_out.d_in}, {sae_in.d_in}]."
        )
    bias_H = torch.zeros(weight_HD.shape[0]) if bias_H is None else bias_H.float()
    W_IO = W_dec1_ID @ weight_HD.t() @ W_enc2_HO
    b_O = (b_dec1_D @ weight_HD.t() + bias_H - b_dec2_H) @ W_enc2_HO + sae_out.b_enc_F.float()
    return W_IO, b_O


def connector_loss(conn: FeatureConnector, f1_BI: Tensor, f2_BO: Tensor, l1: float) -> tuple[Tensor, dict]:
    """The seed's loss: squared error summed over O, mean over rows, plus l1 * sum |W_IO|."""
    mse = (conn(f1_BI) - f2_BO).pow(2).sum() / f1_BI.shape[0]
    sparsity = conn.W_IO.abs().sum()
    return mse + l1 * sparsity, {"mse": mse.detach(), "l1": sparsity.detach()}


@torch.no_grad()
def connector_metrics(conn: FeatureConnector, f1_NI: Tensor, f2_NO: Tensor, prune_fraction: float) -> dict:
    """MSE, FVU of F2, the L1 of W, and the density of W's entries above prune_fraction * max|W|."""
    f2_hat_NO = conn(f1_NI)
    mse = (f2_hat_NO - f2_NO).pow(2).sum() / max(1, f1_NI.shape[0])
    total = (f2_NO - f2_NO.mean(0)).pow(2).sum() / max(1, f1_NI.shape[0])
    W_abs_IO = conn.W_IO.abs()
    cut = prune_fraction * float(W_abs_IO.max()) if W_abs_IO.numel() else 0.0
    strong_IO = W_abs_IO > cut
    return {
        "mse": float(mse),
        "fvu": float(mse / total) if total > 0 else float("nan"),
        "l1_W": float(W_abs_IO.sum()),
        "density_W": float(strong_IO.float().mean()),
        "inputs_per_output": float(strong_IO.sum(0).float().mean()),
    }


def _unit_mean_norm_scale(f_NF: Tensor) -> float:
    mean_norm = float(f_NF.norm(dim=1).mean())
    return 1.0 / mean_norm if mean_norm > 0 and math.isfinite(mean_norm) else 1.0


def train_connector(
    f1_NI: Tensor,
    f2_NO: Tensor,
    cfg: ConnectorConfig,
    init: tuple[Tensor, Tensor] | None = None,
    log=None,
) -> tuple[FeatureConnector, dict]:
    """Fit a connector to aligned feature rows (row n of f1 and of f2 come from the same input).

    `init` = (W_IO, b_O) is required for cfg.init == "e2wd1" (from `e2wd1_init`) and ignored for "random".
    `log(step, parts)` is called every steps // 10 steps. Returns the connector and its training metrics.
    """
    cfg.validate()
    if f1_NI.ndim != 2 or f2_NO.ndim != 2 or f1_NI.shape[0] != f2_NO.shape[0]:
        raise UserError(
            f"connector features must be aligned [N, I] and [N, O] tensors, got {list(f1_NI.shape)} "
            f"and {list(f2_NO.shape)}."
        )
    if f1_NI.shape[0] == 0:
        raise UserError("connector training got no rows.")
    raw_f1_NI, raw_f2_NO = f1_NI.float(), f2_NO.float()
    s1, s2 = (
        (_unit_mean_norm_scale(raw_f1_NI), _unit_mean_norm_scale(raw_f2_NO)) if cfg.normalize else (1.0, 1.0)
    )
    f1_NI, f2_NO = raw_f1_NI * s1, raw_f2_NO * s2
    conn = FeatureConnector(f1_NI.shape[1], f2_NO.shape[1]).to(f1_NI.device)  # trains where the rows are
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        if cfg.init == "e2wd1":
            if init is None:
                raise UserError("connect.init=e2wd1 needs the layer's weight and bias (e2wd1_init).")
            conn.W_IO.copy_(init[0] * (s2 / s1))  # F2 s2 = ReLU(F1 s1 (W s2/s1) + b s2)
            conn.b_O.copy_(init[1] * s2)
        else:
            conn.W_IO.copy_(torch.randn(conn.W_IO.shape, generator=gen) * cfg.init_std)
    opt = torch.optim.Adam(conn.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / cfg.steps)
    n = f1_NI.shape[0]
    batch = n if cfg.batch_size == 0 else min(cfg.batch_size, n)
    for step in range(cfg.steps):
        if batch < n:
            idx = torch.randint(0, n, (batch,), generator=gen).to(f1_NI.device)
            x_BI, y_BO = f1_NI[idx], f2_NO[idx]
        else:
            x_BI, y_BO = f1_NI, f2_NO
        loss, parts = connector_loss(conn, x_BI, y_BO, cfg.l1_coefficient)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log is not None and (step % max(1, cfg.steps // 10) == 0 or step == cfg.steps - 1):
            log(step, {k: float(v) for k, v in parts.items()})
    conn.requires_grad_(False)
    conn.W_IO.mul_(s1 / s2)  # back to raw units
    conn.b_O.div_(s2)
    metrics = connector_metrics(conn, raw_f1_NI, raw_f2_NO, cfg.prune_fraction)
    metrics["config"] = asdict(cfg)
    return conn, metrics


def strongest_connections(W_IO: Tensor, output: int, min_fraction: float = 0.1, limit: int = 6):
    """[(input, weight)] of one output feature, largest |w| first, keeping |w| >= min_fraction * max_i |w_i|."""
    col_I = W_IO[:, output].float()
    order = col_I.abs().argsort(descending=True)[:limit]
    top = float(col_I.abs().max()) if col_I.numel() else 0.0
    return [
        (int(i), float(col_I[i])) for i in order if top > 0 and abs(float(col_I[i])) >= min_fraction * top
    ]


def format_connections(
    W_IO: Tensor, n_outputs: int = 8, min_fraction: float = 0.1, limit: int = 6, alive_O: Tensor | None = None
) -> list[str]:
    """Lines `OF_i = 0.26 IF_j + 0.23 IF_k - 0.10 IF_l` for the sparsest strong output features.

    An output's strength is its largest |w|; its sparsity the number of inputs above min_fraction of that.
    Outputs are ranked by fewest such inputs, ties broken by the larger weight; `alive_O` (bool) restricts
    the ranking to output features that ever fire.
    """
    W_abs_IO = W_IO.abs().float()
    peak_O = W_abs_IO.max(0).values
    n_strong_O = (W_abs_IO >= min_fraction * peak_O.clamp_min(1e-30)).sum(0)
    # strong outputs only: the peak must reach the median peak of the live outputs
    live_O = peak_O > 0 if alive_O is None else (peak_O > 0) & alive_O
    if not bool(live_O.any()):
        return []
    strong_O = live_O & (peak_O >= peak_O[live_O].median())
    candidates = [int(o) for o in torch.nonzero(strong_O).flatten()]
    candidates.sort(key=lambda o: (int(n_strong_O[o]), -float(peak_O[o])))
    lines = []
    for o in candidates[:n_outputs]:
        terms = strongest_connections(W_IO, o, min_fraction, limit)
        text = " ".join(
            (f"{'-' if w < 0 else '+'} {abs(w):.2f} IF_{i}" if k else f"{w:.2f} IF_{i}")
            for k, (i, w) in enumerate(terms)
        )
        lines.append(f"OF_{o} = {text}")
    return lines


def plot_connector(W_IO: Tensor, path, title: str = "feature connector W2") -> None:
    """A heat map of W2 (output features as rows, input features as columns) written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    W_OI = W_IO.t().float().cpu().numpy()
    lim = float(abs(W_OI).max()) or 1.0
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(W_OI, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    ax.set_xlabel("input feature (IF)")
    ax.set_ylabel("output feature (OF)")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
