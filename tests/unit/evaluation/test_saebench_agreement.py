"""Our absorption scoring against SAEBench's own (the optional `sae-bench`; skipped without it) on a planted
26-letter SAE whose absorption is known.

.venv-saebench/bin/python -m pytest tests/unit/evaluation/test_saebench_agreement.py   (venv: scripts/compare_saebench.py)

Activations: letter L is the unit direction e_L (26 dimensions), 20 words a letter; a word of letter a in
FULL or PARTIAL also carries its own token direction t_w (0.5 long). The hand-built ReLU SAE has unit-norm
decoder rows (SAEBench's projection a_i cos(d_i, w) is then ours, a_i (d_i . w)): a main latent per letter
(encoder and decoder e_L) and a token latent per such word, firing on w alone, whose decoder is the unit
direction of the part of w's reconstruction it carries:
  FULL     main latent a off on w, token latent reconstructs e_a + 0.5 t_w: absorption fraction 1, full;
  PARTIAL  main latent a at 0.5, token latent reconstructs 0.5 e_a + 0.5 t_w: fraction 0.5, not full.
SAEBench's FeatureAbsorptionCalculator reads the activations through a stand-in model (the script's
GivenActivations) and the SAE through sae_lens (our export, loaded by SAE.load_from_disk); it gets our
probe direction and main latents, so both score the same inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip(
    "sae_bench", reason="sae-bench is optional: scripts/compare_saebench.py says how to install it"
)
sae_lens = pytest.importorskip("sae_lens")

from sae_pipeline.evaluation.absorption import AbsorptionSettings, absorption, split_words  # noqa: E402
from sae_pipeline.sae import CONFIG_CLASSES, build_sae, write_saelens  # noqa: E402
from scripts.compare_saebench import GivenActivations, calculator, ours_internals, word_agreement  # noqa: E402

PER_LETTER = 20
FULL, PARTIAL = list(range(0, PER_LETTER, 2)), list(range(1, PER_LETTER, 4))  # indices of a-words
TOKEN_WORDS = FULL + PARTIAL
D_IN = 26 + len(TOKEN_WORDS)
METHODS = ("saebench", "mean_difference")


def planted():
    letter_N = np.repeat(np.arange(26), PER_LETTER)
    x_ND = torch.zeros(len(letter_N), D_IN)
    x_ND[torch.arange(len(letter_N)), torch.from_numpy(letter_N)] = 1.0
    d_sae = D_IN
    W_enc_DF, W_dec_FD = torch.zeros(D_IN, d_sae), torch.zeros(d_sae, D_IN)
    W_enc_DF[:26, :26] = W_dec_FD[:26, :26] = torch.eye(26)
    for j, i in enumerate(TOKEN_WORDS):
        t = 26 + j
        x_ND[i, t] = 0.5
        share = 1.0 if i in FULL else 0.5  # the part of e_a the token latent carries
        W_enc_DF[t, 0] = -4.0 if i in FULL else -1.0  # main latent a: off (1 - 2) or at 0.5 (1 - 0.5)
        row = torch.zeros(D_IN)
        row[0], row[t] = share, 0.5
        W_dec_FD[t] = row / row.norm()
        W_enc_DF[t, t] = 2.0 * row.norm()  # fires at |row| on w: reconstructs `row` exactly
    sae = build_sae(CONFIG_CLASSES["relu"](d_sae=d_sae, b_dec_init="zeros"), D_IN, seed=0)
    with torch.no_grad():
        sae.W_enc_DF.copy_(W_enc_DF)
        sae.W_dec_FD.copy_(W_dec_FD)
        sae.b_enc_F.zero_()
        sae.b_dec_D.zero_()
    return x_ND, letter_N, sae.eval()


@pytest.mark.parametrize("method", METHODS)
def test_ours_and_saebench_score_the_planted_absorption_alike(tmp_path, method):
    # 6 of 20 a-words in probe-test: full and partial ones
    settings = AbsorptionSettings(method=method, test_fraction=0.3, min_words=3)
    x_ND, letter_N, sae = planted()
    report = absorption(x_ND, letter_N, sae, settings)
    assert report["n_letters_scored"] == 26
    write_saelens(sae, tmp_path, {"hook_name": "blocks.0.hook_resid_post"})
    sb_sae = sae_lens.SAE.load_from_disk(str(tmp_path), device="cpu").eval()
    with torch.no_grad():
        z_ND = sae.encode(x_ND)
        torch.testing.assert_close(sb_sae.encode(x_ND), z_ND)
    tr, te, ours = ours_internals(x_ND.numpy(), letter_N, z_ND.numpy(), settings, sorted(report["letters"]))
    calc = calculator(GivenActivations(x_ND), settings, icl_word_list=[], word_token_pos=-1, batch_size=64)
    sb_fraction, sb_full = {}, {}
    for name, o in ours.items():
        assert o.main == report["letters"][name]["main_latents"] == [ord(name) - ord("a")]
        rows = te[o.y_te & o.pred]
        diff, same, res = word_agreement(calc, sb_sae, sae, x_ND, z_ND, rows, o.w, o.main, settings, 0)
        assert diff <= 1e-6 and same == len(rows)
        fr = np.array([r.absorption_fraction for r in res], dtype=float)
        full = [r.is_full_absorption for r in res]
        sb_fraction[name], sb_full[name] = (
            dict(zip(rows.tolist(), fr, strict=True)),
            dict(zip(rows.tolist(), full, strict=True)),
        )
        assert fr.mean() == pytest.approx(report["letters"][name]["mean_absorption_fraction"], abs=1e-6)
        assert sum(full) == report["letters"][name]["num_full_absorption"]

    # both find the planted absorption: every a-word of the probe-test split, as planted
    _, test = split_words(letter_N, settings.test_fraction, settings.seed)
    a_test = [i for i in test if letter_N[i] == 0]
    assert any(i in FULL for i in a_test) and any(i in PARTIAL for i in a_test)
    assert set(sb_fraction["a"]) == set(a_test)
    for i in a_test:
        want = 1.0 if i in FULL else 0.5 if i in PARTIAL else 0.0
        assert sb_fraction["a"][i] == pytest.approx(want, abs=1e-6)
        assert sb_full["a"][i] == (i in FULL)
    n_full = sum(i in FULL for i in a_test)
    assert report["letters"]["a"]["num_full_absorption"] == n_full
    assert report["letters"]["a"]["mean_absorption_fraction"] == pytest.approx(
        (n_full + 0.5 * sum(i in PARTIAL for i in a_test)) / len(a_test), abs=1e-6
    )
    for name in LETTERS_BUT_A:
        assert report["letters"][name]["mean_absorption_fraction"] == 0.0
        assert not any(sb_full[name].values()) and not any(sb_fraction[name].values())


LETTERS_BUT_A = "bcdefghijklmnopqrstuvwxyz"
