"""The probes of SAEBench's absorption eval, trained the way it trains them (written for this project):

    W_CD, b_C = adam_probes(x_ND, letter_N, 26, GROUND_TRUTH, seed=0)        # ground truth, dense activations
    W_CF, _ = adam_probes(z_NF, letter_N, 26, l1_ranking(z_NF.shape[0]), seed=0)  # L1 probe ranking latents
    order = np.argsort(-W_CF[c].numpy())                                      # letter c's latents, best first
    main, f1s = ranked_main_latents(order, z_tr, y_tr, z_te, y_te, 10, 0.03, standardise=False)

All letters at once: one-vs-rest logistic probes as one linear layer, a class-weighted binary cross-entropy
(negatives / positives per letter), Adam with weight decay, the learning rate decayed exponentially from
1e-2 to 1e-5 over the epochs, shuffled mini-batches. The weights start at zero (SAEBench: torch's random
init): the loss is convex, and a dimension no training row uses then keeps exactly zero weight.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace

import numpy as np
import torch


@dataclass(frozen=True)
class ProbeTraining:
    batch_size: int = 64
    epochs: int = 50
    lr: float = 1e-2
    end_lr: float = 1e-5
    weight_decay: float = 1e-6
    l1: float = 0.0  # times the mean over letters of sum |w|


GROUND_TRUTH = ProbeTraining()  # SAEBench's train_linear_probe_for_task settings
L1_PROBE = ProbeTraining(batch_size=4096, l1=0.01)  # its k-sparse probing's L1 probe
FULL_VOCAB_STEPS = 10  # batches an epoch of SAEBench's L1 probe on a full vocabulary (~38k words / 4096)


def l1_ranking(n_rows: int) -> ProbeTraining:
    """The L1 probe's settings for n_rows training words: batch 4096 (SAEBench) when that still gives ~10
    batches an epoch as on a full vocabulary, smaller otherwise, so that it trains as many steps as there
    (at 4096 on 1,000 words it would take one step an epoch and stay undertrained)."""
    return replace(
        L1_PROBE, batch_size=min(L1_PROBE.batch_size, max(1, math.ceil(n_rows / FULL_VOCAB_STEPS)))
    )


def dense(m) -> np.ndarray:
    """A scipy sparse matrix as a dense array; a dense array or tensor as it is."""
    return m.toarray() if hasattr(m, "toarray") else m


def adam_probes(x_ND, label_N: np.ndarray, n_classes: int, t: ProbeTraining, seed: int):
    """(W [C, D], b [C]) of n_classes one-vs-rest probes on float32 rows (a tensor, or a scipy sparse
    matrix whose batches are made dense one at a time: the same numbers, without N x D dense); a class
    without training rows gets weight 1 for its (absent) positives and stays an all-negative probe."""
    y_NC = torch.nn.functional.one_hot(torch.as_tensor(label_N, dtype=torch.long), n_classes).float()
    pos_C = y_NC.sum(0)
    pos_weight_C = torch.where(pos_C > 0, (len(y_NC) - pos_C) / pos_C.clamp_min(1), torch.ones_like(pos_C))
    W_CD = torch.zeros(n_classes, x_ND.shape[1], requires_grad=True)
    b_C = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.Adam([W_CD, b_C], lr=t.lr, weight_decay=t.weight_decay)
    gamma = math.exp(math.log(t.end_lr / t.lr) / t.epochs)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(t.epochs):
        for idx in torch.randperm(x_ND.shape[0], generator=gen).split(t.batch_size):
            logits = torch.as_tensor(dense(x_ND[idx.numpy()])).float() @ W_CD.T + b_C
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, y_NC[idx], pos_weight=pos_weight_C
            )
            if t.l1:
                loss = loss + t.l1 * W_CD.abs().sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        for group in opt.param_groups:
            group["lr"] *= gamma
    return W_CD.detach(), b_C.detach()


def f1_score(y: np.ndarray, pred: np.ndarray) -> float:
    tp = int((pred & y).sum())
    denom = int(pred.sum()) + int(y.sum())
    return 2 * tp / denom if denom else 0.0


def fit_logistic(X: np.ndarray, y: np.ndarray, C: float = 1.0, standardise: bool = True):
    """A class-balanced logistic regression; standardised features (the default) let lbfgs converge in a
    few steps on raw activations, and the scaler stays in the pipeline so directions map back."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lbfgs' convergence warnings
        if not standardise:  # SAEBench's k-sparse probes: raw latents, 500 iterations
            return LogisticRegression(C=C, class_weight="balanced", max_iter=500).fit(X, y)
        model = LogisticRegression(C=C, class_weight="balanced", max_iter=1000)
        return make_pipeline(StandardScaler(), model).fit(X, y)


def ranked_main_latents(
    order_F: np.ndarray, z_tr, y_tr, z_te, y_te, max_k: int, f1_jump: float, standardise: bool
) -> tuple[list[int], list[float]]:
    """(main latents, F1 of the k-sparse probe for each k tried): a probe on the first k latents of
    `order_F` for k = 1, 2, ...; k grows while the test F1 rises by more than f1_jump (SAEBench's
    feature-split rule), and the main latents are the first k kept."""
    best, chosen, f1s = -np.inf, [], []
    for k in range(1, min(max_k, z_tr.shape[1]) + 1):
        idx = order_F[:k]
        cols_tr = dense(z_tr[:, idx])
        if not np.any(cols_tr):
            f1 = 0.0
        else:
            probe = fit_logistic(cols_tr, y_tr, standardise=standardise)
            f1 = f1_score(y_te, probe.decision_function(dense(z_te[:, idx])) > 0)
        f1s.append(round(f1, 5))
        if f1 <= best + f1_jump:
            break
        best, chosen = f1, idx.tolist()
    return chosen, f1s
