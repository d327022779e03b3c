"""Feature absorption on the first-letter task (Chanin et al. 2024; SAEBench's absorption eval).

    report = absorption(x_ND, letter_N, sae, settings)     # x at each word's token, its first letter's index

1. Words are split (seeded, stratified by letter) into probe-train and probe-test (80/20 as SAEBench).
2. Ground-truth probes: per letter, a one-vs-rest logistic probe on the dense activations (class
   balanced); its F1 on probe-test says whether the model represents the letter linearly at this hook.
   Its unit weight vector `w_L` is the letter's direction.
3. k-sparse probing picks the letter's main latents: latents ranked for the letter, a probe on the top k
   for k = 1, 2, ...; k grows while the test F1 rises by more than `f1_jump` (SAEBench's feature-split
   rule). The main latents are the top k kept.
   `method` says how steps 2 and 3 are done:
   - "saebench" (the default): SAEBench's choices (letter_probes.py): the 26 ground-truth probes trained
     together with Adam; latents ranked by the weights of an L1-penalised probe on all latents; k-sparse
     probes on raw latents;
   - "mean_difference": logistic regressions on standardised activations; latents ranked by their mean
     activation on the letter's words minus the others' (no probe to train on all latents).
4. On every probe-test word of letter L that the probe calls positive, with p = x . w_L and a latent's
   projection c_i = a_i (d_i . w_L) (its share of the reconstruction along w_L; a_i its activation, d_i its
   decoder row; SAEBench's a_i cos(d_i, w_L) for unit-norm decoders):
   - absorption fraction (SAEBench's): the share of p the main latents miss and at most `max_absorbers`
     other latents with cos(d_i, w_L) >= `fraction_cos` and c_i > 0 supply; 0 when the main latents
     cover p or the others supply < `proportion` of p, 1 when the main latents contribute nothing;
   - full absorption: every main latent silent, the latent of largest c_i has cos(d_i, w_L) >=
     `full_cos` and supplies >= `proportion` of p (p > 0).
   A letter is scored when its probe F1 > `min_probe_f1` and it has >= `min_words` such words; the
   overall numbers are means over scored letters (SAEBench's mean_absorption_fraction_score,
   mean_full_absorption_score, mean_num_split_features). SAEBench's own run reports them only when at
   least `saebench_min_letters` letters pass the F1 gate; `n_letters_probe_passed` says how many did.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from sae_pipeline.evaluation.first_letter import LETTERS
from sae_pipeline.evaluation.letter_probes import (
    GROUND_TRUTH,
    adam_probes,
    f1_score,
    fit_logistic,
    l1_ranking,
    ranked_main_latents,
)
from sae_pipeline.schema.eval import ABSORPTION_METHODS

EPS = 1e-8


@dataclass
class AbsorptionSettings:
    method: str = "saebench"  # how the probes and main latents are found (see the module docstring)
    test_fraction: float = 0.2
    seed: int = 0
    max_k: int = 10  # largest k of the k-sparse probes
    f1_jump: float = 0.03  # a latent joins the main latents when it lifts the k-sparse probe's F1 this much
    min_probe_f1: float = 0.6  # letters whose ground-truth probe is not stronger are not scored
    min_words: int = 1  # probe-true-positive test words a letter needs to be scored
    full_cos: float = 0.025  # SAEBench's full_absorption_probe_cos_sim_threshold
    fraction_cos: float = 0.1  # SAEBench's absorption_fraction_probe_cos_sim_threshold
    proportion: float = 0.4  # SAEBench's probe_projection_proportion_threshold
    max_absorbers: int = 3  # SAEBench's absorption_fraction_max_absorbing_latents
    probe_C: float = 1.0  # inverse L2 strength of the logistic probes (mean_difference)
    saebench_min_letters: int = 20  # SAEBench's min_feats_for_eval


def split_words(letter_N: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices): each letter's words shuffled (seeded) and cut at test_fraction."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(letter_N):
        idx = np.flatnonzero(letter_N == c)
        rng.shuffle(idx)
        n_test = int(round(test_fraction * len(idx))) if len(idx) > 1 else 0
        test += idx[:n_test].tolist()
        train += idx[n_test:].tolist()
    return np.sort(train), np.sort(test)


def raw_direction(probe) -> Tensor:
    """A standardised logistic probe's unit weight vector in activation space: w / scale."""
    scaler, lr = probe.steps[0][1], probe.steps[1][1]
    w_D = torch.from_numpy(lr.coef_[0] / scaler.scale_).float()
    return w_D / w_D.norm()


def ground_truth_probes(x: Tensor, letter_N: np.ndarray, tr, te, s: AbsorptionSettings):
    """letter -> (the probe's positives among the test words [n_test] bool, its unit direction [D])."""
    if s.method == "saebench":
        W_CD, b_C = adam_probes(x[tr], letter_N[tr], len(LETTERS), GROUND_TRUTH, s.seed)
        score_NC = x[te] @ W_CD.T + b_C
        return lambda c: ((score_NC[:, c] > 0).numpy(), W_CD[c] / W_CD[c].norm().clamp_min(EPS))
    x_np = x.numpy()

    def fit(c: int):
        probe = fit_logistic(x_np[tr], letter_N[tr] == c, s.probe_C)
        return probe.decision_function(x_np[te]) > 0, raw_direction(probe)

    return fit


def latent_order(z, letter_N: np.ndarray, tr, s: AbsorptionSettings):
    """letter -> every latent, in the order the k-sparse probes take them (z: [N, F] sparse)."""
    z_tr = z[tr]
    if s.method == "saebench":  # signed weights: only latents that predict the letter rank high
        W_CF, _ = adam_probes(z_tr, letter_N[tr], len(LETTERS), l1_ranking(len(tr)), s.seed)
        return lambda c: np.argsort(-W_CF[c].numpy(), kind="stable")

    def order(c: int):
        y = letter_N[tr] == c
        gap_F = np.asarray(z_tr[y].mean(0) - z_tr[~y].mean(0)).ravel()
        return np.argsort(-gap_F, kind="stable")  # latents firing *for* c

    return order


def word_scores(p: float, c_F: Tensor, cos_F: Tensor, a_F: Tensor, main: list[int], s: AbsorptionSettings):
    """(absorption fraction, full absorption, absorbing latents) of one word: p = x . w, c = per-latent
    projection on w, cos = cos(decoder row, w), a = activations."""
    main_proj = float(c_F[main].sum()) if main else 0.0
    others = torch.ones_like(c_F, dtype=torch.bool)
    others[main] = False
    cand = others & (cos_F >= s.fraction_cos) & (c_F > 0)
    top = c_F[cand].topk(min(s.max_absorbers, int(cand.sum())))
    absorbers = cand.nonzero().flatten()[top.indices].tolist()
    supplied = float(top.values.sum())
    if p <= 0 or main_proj >= p or supplied / p < s.proportion:
        fraction = 0.0
    elif main_proj <= 0:
        fraction = 1.0
    else:
        absorbed = min(supplied, p - main_proj)
        fraction = float(np.clip(absorbed / (absorbed + main_proj), 0.0, 1.0))
    first = int(c_F.argmax())
    full = (
        all(float(a_F[i]) < EPS for i in main)
        and p > 0
        and float(cos_F[first]) >= s.full_cos
        and float(c_F[first]) / p >= s.proportion
    )
    return fraction, full, (absorbers if fraction > 0 else []), (first if full else None)


def encode_sparse(sae, x_ND: Tensor, budget_bytes: int = 1 << 28):
    """The SAE's latents of every row as a float32 scipy CSR matrix [N, F]: only firing latents are kept,
    so a wide SAE costs N x L0 entries, not N x F (1,500 words x 1M latents would be 6 GB dense); rows are
    encoded in chunks of at most `budget_bytes` of dense latents."""
    from scipy import sparse

    p = next(sae.parameters())
    chunk = max(1, min(1024, budget_bytes // (4 * sae.d_sae)))
    parts = []
    with torch.no_grad():
        for i in range(0, len(x_ND), chunk):
            z = sae.encode(x_ND[i : i + chunk].to(p.device, p.dtype)).float().cpu().numpy()
            parts.append(sparse.csr_matrix(z))
    return sparse.vstack(parts, format="csr")


def _decoder(sae) -> Tensor:
    """[F, D] decoder rows in float32 on the CPU."""
    return sae.W_dec_FD.detach().float().cpu()


def _score_words(x, z, positives, w_D, main, W_dec_FD, dec_norm_F, s, words) -> dict:
    """One letter's absorption numbers over its probe-true-positive test words."""
    proj_F = W_dec_FD @ w_D  # d_i . w
    cos_F = proj_F / dec_norm_F
    fractions, fulls, absorbers, full_latents, absorbed_words = [], 0, Counter(), Counter(), []
    for i in positives.tolist():
        z_F = torch.from_numpy(z[i].toarray()[0])
        frac, full, by, first = word_scores(float(x[i] @ w_D), z_F * proj_F, cos_F, z_F, main, s)
        fractions.append(frac)
        fulls += int(full)
        absorbers.update(by)
        if full:
            full_latents[first] += 1
        if frac > 0 and words is not None:
            absorbed_words.append(words[i])
    entry = dict(
        n_probe_true_positives=len(positives),
        main_latents=main,
        num_split_features=len(main),
        mean_absorption_fraction=round(float(np.mean(fractions)), 6),
        full_absorption_rate=round(fulls / len(positives), 6),
        num_full_absorption=fulls,
        absorbing_latents={str(k): v for k, v in absorbers.most_common(10)},
        full_absorbing_latents={str(k): v for k, v in full_latents.most_common(10)},
        main_latent_probe_cos=[round(float(cos_F[i]), 4) for i in main],
    )
    if words is not None:
        entry["absorbed_words"] = absorbed_words[:20]
    return entry


def absorption(
    x_ND: Tensor, letter_N: np.ndarray, sae, s: AbsorptionSettings, words: list[str] | None = None
) -> dict:
    """The absorption report of one SAE on first-letter activations (see the module docstring)."""
    if s.method not in ABSORPTION_METHODS:
        raise ValueError(f"absorption method {s.method!r} is not one of {ABSORPTION_METHODS}")
    x = x_ND.float()
    tr, te = split_words(letter_N, s.test_fraction, s.seed)
    z = encode_sparse(sae, x)
    W_dec_FD = _decoder(sae)
    dec_norm_F = W_dec_FD.norm(dim=1).clamp_min(EPS)
    probe_of, order_of = ground_truth_probes(x, letter_N, tr, te, s), latent_order(z, letter_N, tr, s)
    letters, skipped, passed = {}, {}, 0
    scaled = s.method != "saebench"  # SAEBench fits its k-sparse probes on raw latents
    z_tr, z_te = z[tr], z[te]
    for c in sorted(set(letter_N.tolist())):
        name = LETTERS[c]
        y_tr, y_te = letter_N[tr] == c, letter_N[te] == c
        if y_tr.sum() < 2 or y_te.sum() < 1 or (~y_tr).sum() < 2:
            skipped[name] = "too few words"
            continue
        pred_te, w_D = probe_of(c)
        f1 = f1_score(y_te, pred_te)
        passed += f1 > s.min_probe_f1
        positives = te[y_te & pred_te]
        if f1 <= s.min_probe_f1 or len(positives) < s.min_words:
            skipped[name] = f"probe F1 {f1:.3f}, {len(positives)} probe-true-positive test words"
            continue
        main, f1s = ranked_main_latents(order_of(c), z_tr, y_tr, z_te, y_te, s.max_k, s.f1_jump, scaled)
        letters[name] = {
            "probe_f1": round(f1, 5),
            "n_test_words": int(y_te.sum()),
            "k_sparse_f1": f1s,
            **_score_words(x, z, positives, w_D, main, W_dec_FD, dec_norm_F, s, words),
        }
    return {"format_version": 1, "method": s.method, **summarise(letters), "n_letters_probe_passed": passed,
            "saebench_would_report": passed >= s.saebench_min_letters, "n_words": len(letter_N),
            "n_train": len(tr), "n_test": len(te), "letters": letters, "skipped_letters": skipped}  # fmt: skip


def summarise(letters: dict) -> dict:
    """SAEBench's mean metrics over the scored letters (None when no letter was scored)."""

    def stat(key: str, fn) -> float | None:
        vals = [e[key] for e in letters.values()]
        return round(float(fn(vals)), 6) if len(vals) >= (2 if fn is statistics.stdev else 1) else None

    return {
        "mean_absorption_fraction_score": stat("mean_absorption_fraction", statistics.mean),
        "mean_full_absorption_score": stat("full_absorption_rate", statistics.mean),
        "mean_num_split_features": stat("num_split_features", statistics.mean),
        "std_dev_absorption_fraction_score": stat("mean_absorption_fraction", statistics.stdev),
        "std_dev_full_absorption_score": stat("full_absorption_rate", statistics.stdev),
        "std_dev_num_split_features": stat("num_split_features", statistics.stdev),
        "mean_probe_f1": stat("probe_f1", statistics.mean),
        "n_letters_scored": len(letters),
    }
