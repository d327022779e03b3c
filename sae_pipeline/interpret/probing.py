"""Probing: are an SAE's latents useful features for predicting labels, next to the dense activations?

    acts_NTD = dense_activations(model, hook, ctx, batch_size)      # one forward per batch (early exit)
    split = split_groups(ctx, 0.3, seed)                             # documents, never contexts, are split
    sets = sequence_features(acts_NTD, ctx.valid_NT, sae)            # {"mean": (dense, latents), "max": ...}
    results = probe_all(sets, ..., ks=[1, 2, 5])

Probes are L2-regularised logistic regressions on features scaled to unit variance on probe-train,
class-weighted so that every class counts equally; C is chosen by cross-validated log loss on the training
split only, with folds that keep documents together. k-sparse probes use the k latents with the largest
difference of class means on the training split (SAEBench's sparse probing; several classes: the largest
one-vs-rest difference of any class). Scores on the test split come with bootstrap percentile intervals,
resampling test documents when there are >= MIN_CLUSTERS of them, else test examples.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from sae_pipeline.errors import UserError
from sae_pipeline.interpret.probe_tasks import IGNORE, Contexts
from sae_pipeline.model.activations import capture

MIN_CLUSTERS = 10
METRICS = ("accuracy", "balanced_accuracy", "auroc")

# ----------------------------------------------------------------------------- features


def dense_activations(model, hook, ctx: Contexts, batch_size: int) -> Tensor:
    """[N, T, D] float32 activations at the hook for every context (CPU)."""
    out = []
    for i in range(0, ctx.ids_NT.shape[0], batch_size):
        acts = capture(model, ctx.ids_NT[i : i + batch_size], ctx.attention_NT[i : i + batch_size], [hook])
        out.append(acts[hook.name].float().cpu())
    return torch.cat(out)


def _encode(sae, x_ND: Tensor) -> Tensor:
    p = next(sae.parameters())
    with torch.no_grad():
        return sae.encode(x_ND.to(device=p.device, dtype=p.dtype)).float().cpu()


def _pool(x_NTF: Tensor, valid_NT: Tensor) -> dict[str, Tensor]:
    m_NT1 = valid_NT.unsqueeze(-1).to(x_NTF.dtype)
    mean = (x_NTF * m_NT1).sum(1) / m_NT1.sum(1).clamp_min(1)
    mx = x_NTF.masked_fill(~valid_NT.unsqueeze(-1), float("-inf")).amax(1)
    return {"mean": mean, "max": mx}


def sequence_features(acts_NTD: Tensor, valid_NT: Tensor, sae, chunk: int = 16) -> dict[str, tuple]:
    """Mean- and max-pooled (over valid, non-BOS tokens) dense activations and SAE latents per context."""
    if not bool(valid_NT.any(1).all()):
        raise UserError(
            "a probe context has no token besides BOS; raise probe.context_size or drop empty texts."
        )
    dense = _pool(acts_NTD, valid_NT)
    lat: dict[str, list[Tensor]] = {"mean": [], "max": []}
    for i in range(0, acts_NTD.shape[0], chunk):
        a_NTD = acts_NTD[i : i + chunk]
        z_NTF = _encode(sae, a_NTD.reshape(-1, a_NTD.shape[-1])).reshape(*a_NTD.shape[:2], -1)
        for k, v in _pool(z_NTF, valid_NT[i : i + chunk]).items():
            lat[k].append(v)
    return {k: (dense[k], torch.cat(lat[k])) for k in ("mean", "max")}


def token_features(acts_NTD: Tensor, rows: Tensor, sae) -> dict[str, tuple]:
    """Each selected token's own row: rows is [M, 2] (context, position)."""
    x_MD = acts_NTD[rows[:, 0], rows[:, 1]]
    return {"token": (x_MD, _encode(sae, x_MD))}


# ----------------------------------------------------------------------------- splits


@dataclass
class Split:
    train_groups: list[str]
    test_groups: list[str]

    def mask(self, group_N: list[str], side: str) -> np.ndarray:
        chosen = set(self.train_groups if side == "train" else self.test_groups)
        return np.array([g in chosen for g in group_N])


def split_groups(ctx: Contexts, test_fraction: float, seed: int, token_task: bool) -> Split:
    """Documents to probe-train and probe-test; stratified by label for sequence tasks."""
    rng = random.Random(seed)
    by_class: dict[int, list[str]] = {}
    for g, y in zip(ctx.group_N, ctx.label_N.tolist(), strict=True):
        key = 0 if token_task else y
        if g not in by_class.setdefault(key, []):
            by_class[key].append(g)
    train, test = [], []
    for key, groups in sorted(by_class.items()):
        if len(groups) < 2:
            name = "documents" if token_task else f"class {ctx.classes[key]!r}"
            raise UserError(
                f"{name} has {len(groups)} document(s); a document split needs >= 2 of each class."
            )
        groups = sorted(groups)
        rng.shuffle(groups)
        n_test = min(len(groups) - 1, max(1, round(test_fraction * len(groups))))
        test += groups[:n_test]
        train += groups[n_test:]
    return Split(sorted(train), sorted(test))


def token_rows(ctx: Contexts, split: Split, side: str, max_examples: int, seed: int) -> Tensor:
    """[M, 2] (context, position) of labelled tokens in the side's documents, a seeded sample of <= max."""
    in_side = torch.from_numpy(split.mask(ctx.group_N, side))
    keep_NT = (ctx.token_label_NT != IGNORE) & ctx.valid_NT & in_side.unsqueeze(1)
    rows = keep_NT.nonzero()
    if rows.shape[0] > max_examples > 0:
        g = torch.Generator().manual_seed(seed)
        rows = rows[torch.randperm(rows.shape[0], generator=g)[:max_examples].sort().values]
    return rows


# ----------------------------------------------------------------------------- probes


def rank_latents(z_NF: np.ndarray, y_N: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Latents by |mean(class) - mean(rest)| on the training split, largest first (ties: lower id)."""
    score_F = np.zeros(z_NF.shape[1])
    for c in range(1 if n_classes == 2 else n_classes):
        pos = y_N == (1 if n_classes == 2 else c)
        score_F = np.maximum(score_F, np.abs(z_NF[pos].mean(0) - z_NF[~pos].mean(0)))
    order = np.argsort(-score_F, kind="stable")
    return order, score_F[order]


def _folds(y: np.ndarray, groups: np.ndarray, n_folds: int, seed: int):
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    per_class = min(len(set(groups[y == c])) for c in np.unique(y))
    if per_class >= 2:
        cv = StratifiedGroupKFold(n_splits=min(n_folds, per_class), shuffle=True, random_state=seed)
        return list(cv.split(np.zeros(len(y)), y, groups)), "documents"
    n = min(n_folds, int(np.bincount(y).min()))
    if n < 2:
        return [], "none"
    cv = StratifiedKFold(n_splits=n, shuffle=True, random_state=seed)
    return list(cv.split(np.zeros(len(y)), y)), "examples"


def _model(C: float, max_iter: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, class_weight="balanced", max_iter=max_iter)


def fit_probe(X_tr, y_tr, g_tr, X_te, n_classes: int, Cs, n_folds: int, seed: int, max_iter: int = 1000):
    """Standardise on train, choose C by grouped CV log loss on train, refit; returns (P_test [N, C], info)."""
    from scipy import sparse
    from sklearn.metrics import log_loss
    from sklearn.preprocessing import StandardScaler

    if X_tr.size and np.count_nonzero(X_tr) < 0.1 * X_tr.size:  # SAE latents: lbfgs costs O(non-zeros)
        X_tr, X_te = sparse.csr_matrix(X_tr), sparse.csr_matrix(X_te)
    # No centring (it would fill sparse latents): with an unpenalised intercept the fit is the same.
    scaler = StandardScaler(with_mean=False).fit(X_tr)
    X_tr, X_te = scaler.transform(X_tr), scaler.transform(X_te)
    folds, unit = _folds(y_tr, g_tr, n_folds, seed)
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lbfgs' convergence warnings at weak regularisation
        for C in Cs:
            loss = 0.0
            for tr, va in folds:
                m = _model(C, max_iter).fit(X_tr[tr], y_tr[tr])
                P = np.zeros((len(va), n_classes))
                P[:, m.classes_] = m.predict_proba(X_tr[va])
                loss += log_loss(y_tr[va], np.clip(P, 1e-7, 1), labels=list(range(n_classes)))
            losses.append(loss)
        best = float(Cs[int(np.argmin(losses))]) if folds else float(Cs[len(Cs) // 2])
        m = _model(best, max_iter).fit(X_tr, y_tr)
    P_te = np.zeros((X_te.shape[0], n_classes))
    P_te[:, m.classes_] = m.predict_proba(X_te)
    return P_te, {"C": best, "cv_unit": unit, "cv_folds": len(folds)}


# ----------------------------------------------------------------------------- scores


def auroc(y: np.ndarray, P: np.ndarray) -> float:
    """Binary: AUROC of P[:, 1]; several classes: macro one-vs-rest mean over classes present (rank formula)."""
    from scipy.stats import rankdata

    classes = [1] if P.shape[1] == 2 else range(P.shape[1])
    out = []
    for c in classes:
        pos = y == c
        n_pos, n_neg = int(pos.sum()), int((~pos).sum())
        if n_pos and n_neg:
            r = rankdata(P[:, c])
            out.append((r[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return float(np.mean(out)) if out else float("nan")


def scores(y: np.ndarray, P: np.ndarray) -> dict[str, float]:
    pred = P.argmax(1)
    recalls = [float((pred[y == c] == c).mean()) for c in np.unique(y)]
    return {
        "accuracy": float((pred == y).mean()),
        "balanced_accuracy": float(np.mean(recalls)),
        "auroc": auroc(y, P),
    }


def bootstrap(y, P, groups, n_boot: int, seed: int) -> tuple[dict[str, list[float]], str]:
    """95% percentile intervals; resamples test documents (clusters) when there are enough of them."""
    rng = np.random.default_rng(seed)
    uniq = np.unique(groups)
    by_cluster = len(uniq) >= MIN_CLUSTERS
    members = [np.flatnonzero(groups == g) for g in uniq] if by_cluster else None
    draws = {m: [] for m in METRICS}
    for _ in range(n_boot):
        if by_cluster:
            idx = np.concatenate([members[i] for i in rng.integers(0, len(uniq), len(uniq))])
        else:
            idx = rng.integers(0, len(y), len(y))
        for m, v in scores(y[idx], P[idx]).items():
            draws[m].append(v)
    ci = {m: [float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5))] for m, v in draws.items()}
    return ci, "documents" if by_cluster else "examples"


def _entry(y_te, P, g_te, info, n_boot, seed) -> dict:
    point = scores(y_te, P)
    ci, unit = bootstrap(y_te, P, g_te, n_boot, seed)
    return {**point, **{f"{m}_ci": ci[m] for m in METRICS}, "bootstrap_unit": unit, **info}


def probe_all(train: dict, test: dict, y_tr, g_tr, y_te, g_te, n_classes: int, p_cfg) -> dict:
    """For each pooling ({pool: (dense [N, D], latents [N, F])} per split): the dense baseline, the
    all-latents baseline and the k-sparse latent probes."""
    Cs = [float(c) for c in p_cfg.Cs]
    fit = dict(n_classes=n_classes, Cs=Cs, n_folds=int(p_cfg.cv_folds), seed=int(p_cfg.seed))
    boot = dict(n_boot=int(p_cfg.n_bootstrap), seed=int(p_cfg.seed))
    out = {}
    for pool in train:
        x_tr, z_tr = (a.numpy() for a in train[pool])
        x_te, z_te = (a.numpy() for a in test[pool])
        res = {}
        P, info = fit_probe(x_tr, y_tr, g_tr, x_te, **fit)
        res["dense"] = _entry(y_te, P, g_te, {**info, "n_features": x_tr.shape[1]}, **boot)
        P, info = fit_probe(z_tr, y_tr, g_tr, z_te, **fit)
        res["sae_all"] = _entry(y_te, P, g_te, {**info, "n_features": z_tr.shape[1]}, **boot)
        order, gap = rank_latents(z_tr, y_tr, n_classes)
        res["sae_k"] = {}
        for k in sorted({min(int(k), z_tr.shape[1]) for k in p_cfg.ks}):
            idx = order[:k]
            P, info = fit_probe(z_tr[:, idx], y_tr, g_tr, z_te[:, idx], **fit)
            extra = {**info, "latents": idx.tolist(), "mean_gap": [round(float(v), 5) for v in gap[:k]]}
            res["sae_k"][str(k)] = _entry(y_te, P, g_te, extra, **boot)
        out[pool] = res
    return out
