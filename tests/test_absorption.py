"""Feature absorption on the first-letter task: a planted SAE whose answer is known exactly, a control
without absorption, the prompts on a real tokenizer, and sae-eval's absorption and sparse-probing card."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_pipeline.evaluation.absorption import AbsorptionSettings, absorption, split_words
from sae_pipeline.sae import CONFIG_CLASSES, build_sae

# Planted activations: letters a, b, c are the unit directions e0, e1, e2. Every word w of letter a in
# ABSORBED also carries its own token direction t_w (one dimension each, 0.5 long). The hand-built ReLU
# SAE (b_dec = 0) has a main latent per letter (encoder e_L, decoder e_L); with absorption, the main
# latent for a is switched off by any t_w (encoder e0 - 4 sum t_w) and each absorbed word has its own
# token latent (encoder 2 t_w, decoder e0 + 0.5 t_w) that reconstructs it, letter included.
N_WORDS = {0: 40, 1: 30, 2: 30}
ABSORBED = list(range(0, 40, 4))  # 10 of the 40 a-words
D_IN = 3 + len(ABSORBED)
SETTINGS = AbsorptionSettings(min_words=5)


def planted(absorb: bool):
    letter_N = np.concatenate([np.full(n, c) for c, n in N_WORDS.items()])
    x_ND = torch.zeros(len(letter_N), D_IN)
    x_ND[torch.arange(len(letter_N)), torch.from_numpy(letter_N)] = 1.0
    for j, i in enumerate(ABSORBED):
        x_ND[i, 3 + j] = 0.5
    d_sae = 3 + len(ABSORBED)
    sae = build_sae(CONFIG_CLASSES["relu"](d_sae=d_sae, b_dec_init="zeros"), D_IN, seed=0)
    with torch.no_grad():
        W_enc_DF, W_dec_FD = torch.zeros(D_IN, d_sae), torch.zeros(d_sae, D_IN)
        for c in range(3):
            W_enc_DF[c, c] = W_dec_FD[c, c] = 1.0
        if absorb:
            for j in range(len(ABSORBED)):
                W_enc_DF[3 + j, 0] = -4.0
                W_enc_DF[3 + j, 3 + j] = 2.0
                W_dec_FD[3 + j, 0], W_dec_FD[3 + j, 3 + j] = 1.0, 0.5
        sae.W_enc_DF.copy_(W_enc_DF)
        sae.W_dec_FD.copy_(W_dec_FD)
        sae.b_enc_F.zero_()
        sae.b_dec_D.zero_()
    return x_ND, letter_N, sae.eval()


def test_planted_absorption_rate_is_exact():
    x_ND, letter_N, sae = planted(absorb=True)
    report = absorption(x_ND, letter_N, sae, SETTINGS)
    _, test = split_words(letter_N, SETTINGS.test_fraction, SETTINGS.seed)
    a_test = [i for i in test if letter_N[i] == 0]
    absorbed_test = [i for i in a_test if i in ABSORBED]
    assert 0 < len(absorbed_test) < len(a_test)  # the split put some absorbed words in probe-test
    expected = len(absorbed_test) / len(a_test)  # every absorbed word: fraction 1 and full absorption
    a = report["letters"]["a"]
    assert a["probe_f1"] == 1.0 and a["main_latents"] == [0]
    assert a["n_probe_true_positives"] == len(a_test)
    assert a["mean_absorption_fraction"] == pytest.approx(expected, abs=1e-6)
    assert a["full_absorption_rate"] == pytest.approx(expected, abs=1e-6)
    assert a["num_full_absorption"] == len(absorbed_test)
    assert set(a["full_absorbing_latents"]) == {str(3 + ABSORBED.index(i)) for i in absorbed_test}
    for c in "bc":
        assert report["letters"][c]["mean_absorption_fraction"] == 0.0
        assert report["letters"][c]["main_latents"] == ["abc".index(c)]
    assert report["n_letters_scored"] == 3
    assert report["mean_absorption_fraction_score"] == pytest.approx(expected / 3, abs=1e-6)
    assert report["mean_full_absorption_score"] == pytest.approx(expected / 3, abs=1e-6)
    assert report["mean_num_split_features"] == 1.0


def test_no_absorption_control():
    x_ND, letter_N, sae = planted(absorb=False)
    report = absorption(x_ND, letter_N, sae, SETTINGS)
    assert report["n_letters_scored"] == 3
    assert report["mean_absorption_fraction_score"] == 0.0
    assert report["mean_full_absorption_score"] == 0.0
    assert all(e["absorbing_latents"] == {} for e in report["letters"].values())
