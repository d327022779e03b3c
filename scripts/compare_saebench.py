"""Our feature absorption (sae_pipeline/evaluation/absorption.py) against SAEBench's own implementation
(`sae-bench` on PyPI) on the same SAE, model and words; prints the agreement, part by part.

    .venv-saebench/bin/python scripts/compare_saebench.py runs/demo/topk --words 1500
    .venv-saebench/bin/python scripts/compare_saebench.py runs/demo/topk --ksparse-batch 4096  # SAEBench's literal batch

sae-bench pins versions the project's venv must not get, so it lives in a venv of its own:

    python3 -m venv .venv-saebench
    .venv-saebench/bin/pip install /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl  # CPU torch first
    .venv-saebench/bin/pip install sae-bench==0.6.0 sae-lens==6.54.12 transformer-lens==3.9.0 torch==2.13.0
    .venv-saebench/bin/pip uninstall -y torchvision   # 0.28 is built for another torch and breaks transformers' imports
    .venv-saebench/bin/pip install -e . torch==2.13.0

(torch==2.13.0 in the pip lines keeps pip from upgrading to a CUDA torch for torchvision's sake; pip check
then names only sae-bench's torchvision, which the absorption eval does not import.)

1. Per-word scoring given the same inputs: for each letter our absorption scores, SAEBench's
   FeatureAbsorptionCalculator.calculate_absorption gets our activations (a stand-in model returns them),
   our probe direction and our main latents, on the SAE exported to SAELens and loaded by sae_lens; its
   absorption fraction and full-absorption flag per word against ours (`word_scores`).
2. Ground-truth probes: SAEBench's train_linear_probe_for_task (26 one-vs-rest probes, Adam, batch 64)
   on our train split vs our logistic probes: cosine of the directions, test F1 of each.
3. Main latents: SAEBench's k-sparse probing (an L1 probe on the latents ranks them, then a probe per k,
   F1-jump rule) on our split vs ours (--method: saebench, our own code of the same steps, or
   mean_difference), for the letters we score.
4. End to end: SAEBench's run_k_sparse_probing_experiment and run_feature_absortion_experiment on a
   TransformerLens HookedTransformer built from the same local SmolLM2 folder (offline; hf_model=), on the
   same words as its vocabulary, aggregated as its run_eval does (letters with probe F1 > 0.6), against our
   report (what `sae-eval eval.absorption=true` computes).

SAEBench's k-sparse L1 probe trains with batch 4096 for 50 epochs: about 10 steps an epoch on a full
vocabulary (~38k train words), one step on 1,000 words, where it stays undertrained. By default the batch is
scaled so an epoch has as many steps as on the full vocabulary, as ours does (letter_probes.l1_ranking);
--ksparse-batch 4096 gives SAEBench's side the literal value.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # SAEBench's bars left at tqdm's default (not its epochs)

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from scipy import sparse  # noqa: E402

try:
    import sae_bench.evals.absorption.common as sb_common
    import sae_bench.evals.absorption.feature_absorption as sb_fa
    import sae_bench.evals.absorption.k_sparse_probing as sb_ksp
    import sae_bench.evals.absorption.main as sb_main
    import sae_bench.evals.absorption.probing as sb_probing
    from sae_bench.evals.absorption.feature_absorption_calculator import FeatureAbsorptionCalculator
    from sae_bench.evals.absorption.prompting import SpellingPrompt
    from sae_lens import SAE as SaeLensSAE
except ImportError as exc:  # pragma: no cover - the script's own venv has them
    sys.exit(f"{exc}: run this with .venv-saebench/bin/python (see the docstring for its install lines)")

from sae_pipeline.evaluation.absorption import (  # noqa: E402
    AbsorptionSettings,
    ground_truth_probes,
    latent_order,
    split_words,
    word_scores,
)
from sae_pipeline.evaluation.benchmarks import Benchmarks  # noqa: E402
from sae_pipeline.evaluation.first_letter import LETTERS  # noqa: E402
from sae_pipeline.evaluation.letter_probes import f1_score as f1  # noqa: E402
from sae_pipeline.evaluation.letter_probes import l1_ranking, ranked_main_latents
from sae_pipeline.runs import load_all, training_metadata  # noqa: E402
from sae_pipeline.sae import write_saelens  # noqa: E402

TEMPLATE = "{word} has the first letter:"  # SAEBench's default prompt_template (word at -6 for SmolLM2 too)
TOKEN_POS = -6


class GivenActivations:
    """Stands in for a HookedTransformer in FeatureAbsorptionCalculator: each 'prompt' is a row number of x."""

    def __init__(self, x_ND: torch.Tensor):
        self.x_ND = x_ND

    def to_tokens(self, prompt: str) -> torch.Tensor:
        return torch.zeros(1, 1, dtype=torch.long)

    def run_with_cache(self, prompts: list[str], names_filter: list[str]):
        rows = torch.tensor([int(p) for p in prompts])
        return None, {names_filter[0]: self.x_ND[rows][:, None, :]}


class GivenCalculator(FeatureAbsorptionCalculator):
    def _build_prompts(self, words: list[str]) -> list[SpellingPrompt]:
        return [SpellingPrompt(base=w, answer="", word=w) for w in words]


def calculator(model, s: AbsorptionSettings, **kwargs) -> FeatureAbsorptionCalculator:
    """SAEBench's calculator with our thresholds (the same numbers as its feature_absorption.py constants)."""
    return (GivenCalculator if isinstance(model, GivenActivations) else FeatureAbsorptionCalculator)(
        model=model,
        full_absorption_probe_cos_sim_threshold=s.full_cos,
        absorption_fraction_probe_cos_sim_threshold=s.fraction_cos,
        probe_projection_proportion_threshold=s.proportion,
        absorption_fraction_max_absorbing_latents=s.max_absorbers,
        **kwargs,
    )


def saelens_sae(sae, meta: dict, folder: Path):
    """Our SAE exported to SAELens's format and loaded by sae_lens itself."""
    write_saelens(sae, folder, meta)
    return SaeLensSAE.load_from_disk(str(folder), device="cpu").eval()


def hooked_transformer(hf_model, tokenizer, name: str):
    """TransformerLens's HookedTransformer from the already loaded transformers model (no hub access): a
    local folder is not an 'official' name, so the name check lets it through for this call."""
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer

    official = loading.get_official_model_name
    loading.get_official_model_name = lambda n: n if os.path.isdir(n) else official(n)
    try:
        model = HookedTransformer.from_pretrained_no_processing(
            str(hf_model.name_or_path),
            hf_model=hf_model,
            tokenizer=tokenizer,
            device="cpu",
            dtype=torch.float32,
        )
    finally:
        loading.get_official_model_name = official
    model.cfg.model_name = name  # SAEBench puts it in paths
    return model


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def ours_internals(x, letters, z, s: AbsorptionSettings, scored: list[str]):
    """Per letter of ours: probe direction and test predictions, main latents; the split (as absorption())."""
    tr, te = split_words(letters, s.test_fraction, s.seed)
    z = sparse.csr_matrix(z)  # as absorption() holds it (encode_sparse)
    probe_of, order_of = (
        ground_truth_probes(torch.from_numpy(x), letters, tr, te, s),
        latent_order(z, letters, tr, s),
    )
    out = {}
    for c in sorted(set(letters.tolist())):
        y_tr, y_te = letters[tr] == c, letters[te] == c
        if y_tr.sum() < 2 or y_te.sum() < 1 or (~y_tr).sum() < 2:
            continue
        pred, w = probe_of(c)
        main, f1s = (None, [])
        if LETTERS[c] in scored:
            args = (z[tr], y_tr, z[te], y_te, s.max_k, s.f1_jump, s.method != "saebench")
            main, f1s = ranked_main_latents(order_of(c), *args)
        main_f1 = f1s[len(main) - 1] if main else 0.0  # the k-sparse probe's test F1 on the main latents
        out[LETTERS[c]] = SimpleNamespace(w=w, pred=pred, y_te=y_te, main=main, main_f1=main_f1)
    return tr, te, out


def word_agreement(calc, sb_sae, sae, x_t, z_t, rows, w, main, s: AbsorptionSettings, layer: int):
    """(max |absorption fraction diff|, words with the same full-absorption flag, SAEBench's word results) of
    SAEBench's calculator and our word_scores on the probe-test words `rows` (row numbers of x_t)."""
    res = calc.calculate_absorption(sb_sae, [str(i) for i in rows], w, main, layer, show_progress=False)
    dec = sae.W_dec_FD.detach().float()
    proj_F = dec @ w
    cos_F = proj_F / dec.norm(dim=1).clamp_min(1e-8)
    worst, same = 0.0, 0
    for i, r in zip(rows.tolist(), res.word_results, strict=True):
        frac, full, _, _ = word_scores(float(x_t[i] @ w), z_t[i] * proj_F, cos_F, z_t[i], main, s)
        worst = max(worst, abs(frac - float(r.absorption_fraction)))
        same += int(full == bool(r.is_full_absorption))
    return worst, same, res.word_results


def part1_scoring(x_t, z_t, sb_sae, sae, te, ours, s: AbsorptionSettings, layer: int) -> None:
    print("\n1. per-word scoring, same inputs (our activations, probe direction, main latents; sae_lens SAE)")
    calc = calculator(GivenActivations(x_t), s, icl_word_list=[], word_token_pos=-1, batch_size=256)
    worst, same_full, n_words = 0.0, 0, 0
    for name, o in ours.items():
        if o.main is None:
            continue
        rows = te[o.y_te & o.pred]
        diff, same, _ = word_agreement(calc, sb_sae, sae, x_t, z_t, rows, o.w, o.main, s, layer)
        worst, same_full, n_words = max(worst, diff), same_full + same, n_words + len(rows)
        print(
            f"   {name}: {len(rows)} words, max |fraction diff| {diff:.1e}, full absorption same {same}/{len(rows)}"
        )
    print(
        f"   all: max |absorption fraction ours - SAEBench| {worst:.1e}; full absorption identical {same_full}/{n_words}"
    )


def sb_gt_probe(x, letters, tr, te):
    """SAEBench's ground-truth probe as load_or_train_probe trains it (batch 64, 50 epochs, lr 1e-2)."""
    train_df = pd.DataFrame({"answer_class": letters[tr]})
    test_df = pd.DataFrame({"answer_class": letters[te]})
    probe, _ = sb_probing.train_linear_probe_for_task(
        train_df, test_df, torch.device("cpu"), x[tr].astype(np.float32), x[te].astype(np.float32),
        batch_size=64, num_epochs=50, lr=1e-2,
    )  # fmt: skip
    return probe.float().eval()


def part2_probes(x, tr, te, ours, sb_probe) -> None:
    print("\n2. ground-truth probes on the same split: ours vs SAEBench's (torch, Adam, its random init)")
    with torch.no_grad():
        logits = sb_probe(torch.from_numpy(x[te]).float()).numpy()
    rows = []
    for name, o in ours.items():
        c = LETTERS.index(name)
        w_sb = sb_probe.weights[c].detach().float()
        cos = float(o.w @ w_sb / w_sb.norm())
        rows.append((name, cos, f1(o.y_te, o.pred), f1(o.y_te, logits[:, c] > 0), o.main is not None))
    for name, cos, f_o, f_s, scored in rows:
        print(
            f"   {name}: cos {cos:+.3f}  F1 ours {f_o:.3f}  SAEBench {f_s:.3f}{'  (scored by ours)' if scored else ''}"
        )
    for label, sel in (("all letters", rows), ("letters ours scores", [r for r in rows if r[4]])):
        if sel:
            print(
                f"   {label} ({len(sel)}): mean cos {statistics.mean(r[1] for r in sel):.3f}, mean F1 ours "
                f"{statistics.mean(r[2] for r in sel):.3f} SAEBench {statistics.mean(r[3] for r in sel):.3f}, "
                f"mean |F1 diff| {statistics.mean(abs(r[2] - r[3]) for r in sel):.3f}"
            )


def part23_floor(x, te, ours, sb_probe, sb_probe2, sb_split, sb_split2) -> None:
    """SAEBench against itself at the next seed (its random init and batch order): the floor that parts 2
    and 3 compare ours against."""
    scored = [name for name, o in ours.items() if o.main is not None]
    with torch.no_grad():
        xt = torch.from_numpy(x[te]).float()
        logits, logits2 = sb_probe(xt).numpy(), sb_probe2(xt).numpy()
    cos, f1_diff, same = [], [], 0
    for name in scored:
        c, o = LETTERS.index(name), ours[name]
        w, w2 = sb_probe.weights[c].detach().float(), sb_probe2.weights[c].detach().float()
        cos.append(float(w @ w2 / (w.norm() * w2.norm())))
        f1_diff.append(abs(f1(o.y_te, logits[:, c] > 0) - f1(o.y_te, logits2[:, c] > 0)))
        same += int(set(sb_split.get(name, ([], 0))[0]) == set(sb_split2.get(name, ([], 0))[0]))
    print(
        f"\n2-3. SAEBench against itself at seed+1, letters ours scores ({len(scored)}): probes mean cos "
        f"{statistics.mean(cos):.3f}, mean |F1 diff| {statistics.mean(f1_diff):.3f}; main latents the same set "
        f"for {same} of {len(scored)}"
    )


def sb_main_latents(sb_sae, sb_probe, x, letters, words, tr, te, batch: int, max_k: int):
    """SAEBench's k-sparse probing on our split: {letter: (split feats, test F1 of the k-sparse probe on them)}."""
    train = [(words[i], int(letters[i])) for i in tr]
    test = [(words[i], int(letters[i])) for i in te]
    x_tr, x_te = torch.from_numpy(x[tr]).float(), torch.from_numpy(x[te]).float()
    kprobes = sb_ksp.train_k_sparse_probes(
        sb_sae, train, x_tr, ks=list(range(1, max_k + 1)), batch_size=batch, num_epochs=50
    )
    raw = sb_ksp.eval_probe_and_sae_k_sparse_raw_scores(sb_sae, sb_probe, kprobes, test, x_te)
    meta = sb_ksp.sae_k_sparse_metadata(sb_sae, sb_probe, kprobes, "compare", 0)
    metrics = sb_ksp.build_metrics_df(raw, meta, max_k_value=max_k)
    sb_ksp.add_feature_splits_to_metrics_df(metrics, max_k_value=max_k)
    out = {}
    for r in metrics.to_dict("records"):
        k = len(r["split_feats"])
        out[r["letter"]] = ([int(i) for i in r["split_feats"]], float(r[f"f1_sparse_sae_{k}"]) if k else 0.0)
    return out


def part3_main(ours, sb_split) -> None:
    print("\n3. main latents (letters ours scores): ours vs SAEBench's (L1-probe ranking, its random init)")
    same = 0
    for name, o in ours.items():
        if o.main is None:
            continue
        theirs, f1_sb = sb_split.get(name, ([], 0.0))
        same += int(set(o.main) == set(theirs))
        print(
            f"   {name}: ours {o.main} (k-sparse F1 {o.main_f1:.3f})  SAEBench {theirs} (F1 {f1_sb:.3f})  "
            f"overlap {len(set(o.main) & set(theirs))}"
        )
    print(f"   same set for {same} of {sum(o.main is not None for o in ours.values())} letters")


def part4_end_to_end(tl_model, sb_sae, words, layer: int, batch: int, seed: int, s, work: Path):
    """SAEBench's two experiments on the HookedTransformer with `words` as the vocabulary; run_eval's means."""
    vocab = list(words)
    sb_common.get_alpha_tokens = sb_fa.get_alpha_tokens = lambda _tok: vocab
    seed_all(seed)
    kw = dict(model=tl_model, sae=sb_sae, layer=layer, sae_name="ours", max_k_value=s.max_k,
              prompt_template=TEMPLATE, prompt_token_pos=TOKEN_POS, device="cpu", probes_dir=work / "probes")  # fmt: skip
    ksp = sb_ksp.run_k_sparse_probing_experiment(
        **kw, experiment_dir=work / "ksp", k_sparse_probe_batch_size=batch, verbose=False
    )
    raw = sb_fa.run_feature_absortion_experiment(
        **kw, experiment_dir=work / "fa", sparse_probing_experiment_dir=work / "ksp", batch_size=10
    )
    agg = sb_main._aggregate_results_df(raw)
    f1_of = dict(zip(ksp["letter"], ksp["f1_probe"], strict=True))
    gated = agg[[f1_of[letter] > 0.6 for letter in agg["letter"]]]
    return ksp, gated


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sae_path")
    ap.add_argument("--words", type=int, default=1500)
    ap.add_argument(
        "--examples", type=int, default=10, help="our prompts' solved examples (eval.absorption_examples)"
    )
    ap.add_argument("--method", default="saebench", help="ours: eval.absorption_method")
    ap.add_argument("--min-words", type=int, default=1, help="ours: eval.absorption_min_words")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--ksparse-batch", type=int, default=None, help="SAEBench's k-sparse probe batch (4096 is its own)"
    )
    ap.add_argument("--skip-end-to-end", action="store_true")
    a = ap.parse_args(argv)
    # SAEBench's tables take AUC and F1 of letters that have no test words: sklearn warns for each
    warnings.filterwarnings("ignore", module="sklearn")
    started = time.perf_counter()
    seed_all(a.seed)
    target, spec, model, tokenizer, sae, hook = load_all(a.sae_path, "cpu")
    layer = int(spec.hook_name.split(".")[1])
    print(
        f"SAE {target.sae_dir} ({sae.cfg.arch}, {sae.d_sae} latents) on {spec.hook_name} of {spec.model_cfg.get('name')}"
    )

    # ours, exactly as sae-eval eval.absorption=true computes it
    e = SimpleNamespace(absorption=True, probe_tasks=[], absorption_words=a.words, absorption_examples=a.examples,
                        absorption_method=a.method, absorption_min_words=a.min_words, seed=a.seed, batch_size=8)  # fmt: skip
    bench = Benchmarks(e, model, tokenizer)
    report = bench.absorption(sae, spec, hook)
    word_objs, letters, x_ND, n_vocab = bench._words[hook.name]
    words = [w.text for w in word_objs]
    s = AbsorptionSettings(method=a.method, seed=a.seed, min_words=a.min_words)
    x_t = x_ND.float()
    x = x_t.numpy()
    with torch.no_grad():
        z_t = sae.encode(x_t).float()
    scored = sorted(report["letters"])
    tr, te, ours = ours_internals(x, letters, z_t.numpy(), s, scored)
    print(
        f"{len(words)} of {n_vocab} words; {len(tr)} train / {len(te)} test; ours scores {len(scored)} letters ({' '.join(scored)})"
    )

    work = Path(tempfile.mkdtemp(prefix="compare_saebench-"))
    meta, _ = training_metadata(a.sae_path)
    sb_sae = saelens_sae(sae, meta, work / "saelens")
    with torch.no_grad():
        enc_diff = float((sb_sae.encode(x_t) - z_t).abs().max())
    print(f"sae_lens {type(sb_sae).__name__} encode vs ours: max |diff| {enc_diff:.1e}")
    steps = lambda n: a.ksparse_batch or l1_ranking(n).batch_size  # noqa: E731
    print(f"k-sparse probe batch: {steps(len(tr))} on our split, {steps(int(0.8 * len(words)))} end to end"
          f"{'' if a.ksparse_batch else ' (scaled to ~10 steps an epoch; SAEBench: 4096)'}")  # fmt: skip

    part1_scoring(x_t, z_t, sb_sae, sae, te, ours, s, layer)
    seed_all(a.seed)
    sb_probe = sb_gt_probe(x, letters, tr, te)
    part2_probes(x, tr, te, ours, sb_probe)
    seed_all(a.seed)
    sb_split = sb_main_latents(sb_sae, sb_probe, x, letters, words, tr, te, steps(len(tr)), s.max_k)
    part3_main(ours, sb_split)
    seed_all(a.seed + 1)
    sb_probe2 = sb_gt_probe(x, letters, tr, te)
    sb_split2 = sb_main_latents(sb_sae, sb_probe2, x, letters, words, tr, te, steps(len(tr)), s.max_k)
    part23_floor(x, te, ours, sb_probe, sb_probe2, sb_split, sb_split2)

    if not a.skip_end_to_end:
        print(
            "\n4. end to end: SAEBench's experiments on a HookedTransformer (same model folder, same words)"
        )
        tl = hooked_transformer(model, tokenizer, "smollm2")
        probe_ids = tl.to_tokens(["cat" + TEMPLATE.format(word="")])
        with torch.no_grad():
            _, cache = tl.run_with_cache(probe_ids, names_filter=[spec.hook_name])
            ref = model(probe_ids, output_hidden_states=True).hidden_states[layer + 1]
        print(f"   {spec.hook_name}: HookedTransformer vs transformers hidden_states[{layer + 1}] max |diff| "
              f"{float((cache[spec.hook_name] - ref).abs().max()):.1e}")  # fmt: skip
        ksp, gated = part4_end_to_end(tl, sb_sae, words, layer, steps(int(0.8 * len(words))), a.seed, s, work)
        n_pass = int((ksp["f1_probe"] > 0.6).sum())
        print(
            f"   SAEBench probe F1 > 0.6 for {n_pass} letters (its run_eval needs 20, else it reports nothing)"
        )
        for r in gated.itertuples():
            print(f"   {r.letter}: fraction {r.mean_absorption_fraction:.3f} full {r.full_absorption_rate:.3f} "
                  f"split {list(r.split_feats)} ({int(r.num_probe_true_positives)} words)")  # fmt: skip
        sb_frac = statistics.mean(gated["mean_absorption_fraction"]) if len(gated) else float("nan")
        sb_full = statistics.mean(gated["full_absorption_rate"]) if len(gated) else float("nan")
        both = [r for r in gated.itertuples() if r.letter in report["letters"]]
        if both:
            ours_of = lambda key: statistics.mean(report["letters"][r.letter][key] for r in both)  # noqa: E731
            print(
                f"   on the {len(both)} letters both score ({' '.join(r.letter for r in both)}): mean absorption "
                f"fraction ours {ours_of('mean_absorption_fraction'):.3f} vs SAEBench "
                f"{statistics.mean(r.mean_absorption_fraction for r in both):.3f}, full absorption ours "
                f"{ours_of('full_absorption_rate'):.3f} vs SAEBench {statistics.mean(r.full_absorption_rate for r in both):.3f}"
            )
        print(
            f"   mean_absorption_fraction_score ours {report['mean_absorption_fraction_score']} "
            f"({report['n_letters_scored']} letters) vs SAEBench {sb_frac:.3f} ({len(gated)} letters)\n"
            f"   mean_full_absorption_score ours {report['mean_full_absorption_score']} vs SAEBench {sb_full:.3f}"
        )
    print(f"\n{time.perf_counter() - started:.0f} s; SAEBench's files in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
