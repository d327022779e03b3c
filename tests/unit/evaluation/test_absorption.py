"""Feature absorption on the first-letter task: a planted SAE whose answer is known exactly, a control
without absorption, the prompts on a real tokenizer, and sae-eval's absorption and sparse-probing card."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from sae_pipeline import evaluate as sae_eval
from sae_pipeline import harvest, layout
from sae_pipeline.data.store import read_manifest
from sae_pipeline.errors import UserError
from sae_pipeline.evaluation.absorption import AbsorptionSettings, absorption, split_words
from sae_pipeline.evaluation.report import _benchmark_scalars, benchmark_lines
from sae_pipeline.sae import CONFIG_CLASSES, build_sae, save_sae
from sae_pipeline.schema.eval import check_eval_config
from tests.helpers import CHARS, SPECIALS, compose_config, save_tiny_model, tiny_overrides
from tests.unit.interpret.test_probe_tasks import PLAYS, WORDS, _play

# Planted activations: letters a, b, c are the unit directions e0, e1, e2. A word w of letter a in FULL,
# PARTIAL or WEAK also carries its own token direction t_w (one dimension each, 0.5 long). The hand-built
# ReLU SAE (b_dec = 0) has a main latent per letter (encoder e_L, decoder e_L) and, with absorption, one
# token latent per such word (encoder 2 t_w, so it fires at 1 on w alone):
#   FULL     main latent switched off (encoder -4 t_w), token decoder e0 + 0.5 t_w: it carries all of the
#            letter -> absorption fraction 1, full absorption;
#   PARTIAL  main latent at 0.5 (encoder -t_w), token decoder 0.5 e0 + 0.5 t_w: half each -> fraction
#            0.5/(0.5 + 0.5) = 0.5, not full (a main latent fires);
#   WEAK     main latent off, token decoder 0.2 e0 + 0.5 t_w: it supplies 0.2 of the probe projection,
#            under the 0.4 threshold -> fraction 0, not full.
# The probe direction w has no component on a probe-test word's own t_w (that dimension is zero on every
# probe-train row, so its weight stays exactly 0), which makes p = x . w = w0 for every a-word.
N_WORDS = {0: 40, 1: 30, 2: 30}
FULL, PARTIAL, WEAK = list(range(0, 40, 4)), list(range(1, 40, 4)), list(range(2, 40, 4))
TOKEN_WORDS = FULL + PARTIAL + WEAK
D_IN = 3 + len(TOKEN_WORDS)
SETTINGS = {
    m: AbsorptionSettings(method=m, test_fraction=0.3, min_words=5) for m in ("saebench", "mean_difference")
}
SPEC = {
    "full": (-4.0, 1.0),
    "partial": (-1.0, 0.5),
    "weak": (-4.0, 0.2),
}  # main encoder on t_w, e0 in decoder


def planted(absorb: bool):
    letter_N = np.concatenate([np.full(n, c) for c, n in N_WORDS.items()])
    x_ND = torch.zeros(len(letter_N), D_IN)
    x_ND[torch.arange(len(letter_N)), torch.from_numpy(letter_N)] = 1.0
    for j, i in enumerate(TOKEN_WORDS):
        x_ND[i, 3 + j] = 0.5
    d_sae = 3 + len(TOKEN_WORDS)
    sae = build_sae(CONFIG_CLASSES["relu"](d_sae=d_sae, b_dec_init="zeros"), D_IN, seed=0)
    with torch.no_grad():
        W_enc_DF, W_dec_FD = torch.zeros(D_IN, d_sae), torch.zeros(d_sae, D_IN)
        for c in range(3):
            W_enc_DF[c, c] = W_dec_FD[c, c] = 1.0
        if absorb:
            for j, i in enumerate(TOKEN_WORDS):
                kind = "full" if i in FULL else "partial" if i in PARTIAL else "weak"
                to_main, letter_share = SPEC[kind]
                W_enc_DF[3 + j, 0] = to_main
                W_enc_DF[3 + j, 3 + j] = 2.0
                W_dec_FD[3 + j, 0], W_dec_FD[3 + j, 3 + j] = letter_share, 0.5
        sae.W_enc_DF.copy_(W_enc_DF)
        sae.W_dec_FD.copy_(W_dec_FD)
        sae.b_enc_F.zero_()
        sae.b_dec_D.zero_()
    return x_ND, letter_N, sae.eval()


@pytest.mark.parametrize("method", SETTINGS)
def test_planted_absorption_rate_is_exact(method):
    x_ND, letter_N, sae = planted(absorb=True)
    report = absorption(x_ND, letter_N, sae, SETTINGS[method])
    assert report["method"] == method
    _, test = split_words(letter_N, SETTINGS[method].test_fraction, SETTINGS[method].seed)
    a_test = [i for i in test if letter_N[i] == 0]
    n_full, n_partial = sum(i in FULL for i in a_test), sum(i in PARTIAL for i in a_test)
    assert n_full and n_partial and any(i in WEAK for i in a_test)  # the split put every kind in probe-test
    fraction, rate = (n_full + 0.5 * n_partial) / len(a_test), n_full / len(a_test)
    a = report["letters"]["a"]
    assert a["probe_f1"] == 1.0 and a["main_latents"] == [0]
    assert a["n_probe_true_positives"] == len(a_test)
    assert a["mean_absorption_fraction"] == pytest.approx(fraction, abs=1e-6)
    assert a["full_absorption_rate"] == pytest.approx(rate, abs=1e-6)
    assert a["num_full_absorption"] == n_full
    full_latents = {str(3 + TOKEN_WORDS.index(i)) for i in a_test if i in FULL}
    assert set(a["full_absorbing_latents"]) == full_latents
    assert set(a["absorbing_latents"]) == full_latents | {
        str(3 + TOKEN_WORDS.index(i)) for i in a_test if i in PARTIAL
    }
    for c in "bc":
        assert report["letters"][c]["mean_absorption_fraction"] == 0.0
        assert report["letters"][c]["main_latents"] == ["abc".index(c)]
    assert report["n_letters_scored"] == 3
    assert report["mean_absorption_fraction_score"] == pytest.approx(fraction / 3, abs=1e-6)
    assert report["mean_full_absorption_score"] == pytest.approx(rate / 3, abs=1e-6)
    assert report["mean_num_split_features"] == 1.0


@pytest.mark.parametrize("method", SETTINGS)
def test_no_absorption_control(method):
    x_ND, letter_N, sae = planted(absorb=False)
    report = absorption(x_ND, letter_N, sae, SETTINGS[method])
    assert report["n_letters_scored"] == 3
    assert report["mean_absorption_fraction_score"] == 0.0
    assert report["mean_full_absorption_score"] == 0.0
    assert all(e["absorbing_latents"] == {} for e in report["letters"].values())


# ----------------------------------------------------------------------------- sae-eval, end to end

LETTER_WORDS = 40  # made-up words per letter a..e in the tiny tokenizer's vocabulary


def _word_tokenizer(words: list[str]):
    """Word-level: runs of letters are one token when in the vocabulary, other characters one each."""
    vocab = {t: i for i, t in enumerate(dict.fromkeys(SPECIALS + list(CHARS) + words))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("[A-Za-z]+|[^A-Za-z]"), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def letter_run(tmp_path_factory):
    """A tiny Llama whose word embeddings carry a direction per first letter, a store harvested from
    markdown plays (so sae-probe's speaker task has headings), and a random ReLU SAE on it."""
    import json

    tmp = tmp_path_factory.mktemp("absorb")
    rng = random.Random(0)
    made_up = sorted(
        {c + "".join(rng.choice("bcdfghklmnprstvw") for _ in range(4)) for c in "abcde" for _ in range(60)}
    )
    words = [w for c in "abcde" for w in [m for m in made_up if m[0] == c][:LETTER_WORDS]]
    words += WORDS + ["KING", "QUEEN", "FOOL", "Exit", "ACT", "A", "Play", "has", "the", "first", "letter"]
    model_dir = save_tiny_model(tmp / "model")
    tok = _word_tokenizer(words)
    tok.save_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    g = torch.Generator().manual_seed(3)
    u_LD = torch.nn.functional.normalize(torch.randn(5, model.config.hidden_size, generator=g), dim=1)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        for w in words[: 5 * LETTER_WORDS]:
            emb[tok.convert_tokens_to_ids(w)] += 2.0 * u_LD["abcde".index(w[0])]
    model.save_pretrained(model_dir)
    corpus = tmp / "plays.jsonl"
    corpus.write_text("".join(json.dumps({"title": t, "text": _play(rng)}) + "\n" for t in PLAYS))
    (store,) = harvest.run(compose_config("harvest", tiny_overrides(tmp, model_dir, corpus, n_tokens=800)))
    m = read_manifest(store)
    sae = build_sae(CONFIG_CLASSES["relu"](d_sae=48, normalize_input=False), d_in=m["d_in"], seed=0)
    save_sae(
        sae,
        tmp / "run" / layout.FINAL_SAE,
        extra={"store": str(store), "hook": m["hook"]["name"], "model": m["model"]},
    )
    (tmp / "run" / layout.CONFIG).write_text(json.dumps({"store": str(store)}))
    return tmp


def test_sae_eval_writes_absorption_probing_and_the_card(letter_run):
    tmp = letter_run
    (tmp / "run" / layout.EXPLAIN_DIR).mkdir()
    explain = {
        "n_latents": 8,
        "detection": 0.61,
        "fuzzing": 0.55,
        "detection_shuffled": 0.5,
        "fuzzing_shuffled": 0.49,
    }
    (tmp / "run" / layout.EXPLAIN_DIR / layout.EXPLAIN_SUMMARY).write_text(json.dumps(explain))
    cfg = compose_config("eval", [
        f"sae_path={tmp / 'run'}", f"paths.root={tmp / 'runs'}", "eval.n_tokens=256", "eval.device=cpu",
        "logger=none", "eval.absorption=true", "eval.absorption_words=500", "eval.absorption_min_words=5",
        "eval.probe_tasks=[speaker]", "eval.probe={ks:[1,2],Cs:[1.0],n_bootstrap:10,contexts_per_doc:2}",
    ])  # fmt: skip
    m = sae_eval.run(cfg)["metrics"]["run"]
    a = m["absorption"]
    assert set(a["letters"]) == set("abcde")  # the planted letters, and no other has enough words
    assert a["method"] == "saebench" and a["saebench_would_report"] is False  # SAEBench needs 20 letters
    assert "SAEBench reports from 20 letters" in benchmark_lines("run", m)[0]
    # SAEBench's probe schedule gets ~200 Adam steps on these 218 train words: F1 0.76-0.94 (0.9+ when fit to convergence)
    assert all(e["probe_f1"] > 0.7 for e in a["letters"].values())
    assert 0.0 <= a["mean_absorption_fraction_score"] <= 1.0
    assert (
        a["n_words"] == a["settings"]["words_in_vocabulary"] < 500
    )  # every alphabetic token of the vocabulary
    on_disk = json.loads((tmp / "run" / layout.EVAL / layout.METRICS).read_text())
    assert on_disk["absorption"]["letters"] == a["letters"]
    sp = on_disk["sparse_probing"]["speaker"]
    assert sp["level"] == "token" and set(sp["results"]["token"]["sae_k"]) == {"1", "2"}
    card = json.loads((tmp / "run" / layout.EVAL / layout.CARD_JSON).read_text())
    em = card["eval_result_metrics"]
    assert em["core"]["sparsity"]["l0"] == m["l0"]
    assert em["core"]["model_performance_preservation"]["ce_loss_score"] == m["loss_recovered"]
    assert (
        em["absorption_first_letter"]["mean"]["mean_absorption_fraction_score"]
        == a["mean_absorption_fraction_score"]
    )
    assert (
        em["sparse_probing"]["speaker"]["sae"]["sae_top_1_test_accuracy"]
        == sp["results"]["token"]["sae_k"]["1"]["accuracy"]
    )
    assert (
        em["sparse_probing"]["speaker"]["llm"]["llm_test_accuracy"]
        == sp["results"]["token"]["dense"]["accuracy"]
    )
    assert em["autointerp"]["autointerp"]["autointerp_score"] == explain["detection"]
    flat = _benchmark_scalars(m)  # what log_wandb adds to the eval's W&B row and summary
    assert flat["eval/absorption/mean_absorption_fraction_score"] == a["mean_absorption_fraction_score"]
    assert flat["eval/absorption/letters/a/probe_f1"] == a["letters"]["a"]["probe_f1"]
    top1 = em["sparse_probing"]["speaker"]["sae"]["sae_top_1_test_accuracy"]
    assert flat["eval/sparse_probing/speaker/sae_top_1_test_accuracy"] == top1
    assert f"only {a['n_letters_probe_passed']} letters" in card["notes"]["absorption_first_letter"]
    md = (tmp / "run" / layout.EVAL / layout.CARD_MD).read_text()
    assert (
        "mean_absorption_fraction_score" in md
        and "sae_top_2_test_accuracy" in md
        and "autointerp_score" in md
    )


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("eval.probe_tasks=[gnere]", "unknown probe task 'gnere'"),
        (
            "eval.probe_tasks=[genre] eval.probe={n_bootstraps:10}",
            "eval.probe has unknown keys ['n_bootstraps']",
        ),
        ("eval.absorption_words=5", "eval.absorption_words must be >= 26"),
        ("eval.absorption_method=l1", "eval.absorption_method"),
    ],
)
def test_bad_settings_are_one_sentence(override, named):
    cfg = compose_config("eval", ["sae_path=x", "eval.absorption=true", *override.split()])
    with pytest.raises(UserError, match=named.replace("[", r"\[").replace("]", r"\]")):
        check_eval_config(cfg)
