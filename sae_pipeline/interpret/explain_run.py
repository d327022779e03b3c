"""The work of sae-explain: latents chosen from the feature browser, explained, scored, written, resumable.

    <run>/explain/drafts.jsonl        {latent, explanation}, appended as each explanation is written
    <run>/explain/explanations.jsonl  one line per latent: its explanation, its scores and the baseline's
    <run>/explain/summary.json        n_latents and the means of detection, fuzzing and their *_shuffled
    <run>/explain/settings.json       the settings a resumed run must match

First every chosen latent is explained (the baseline needs the others' explanations), then each is
scored with its own explanation and, as the shuffled baseline, with the explanation of the next chosen
latent (a cyclic shift: never its own). Both files are appended one latent at a time and a rerun skips
the latents they already hold, so a killed run keeps what it wrote and continues.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from omegaconf import OmegaConf

from sae_pipeline import layout
from sae_pipeline.errors import UserError
from sae_pipeline.files import write_json_atomic
from sae_pipeline.interpret import browser, explanations
from sae_pipeline.interpret import explain_prompts as prompts
from sae_pipeline.interpret import explain_scores as scores
from sae_pipeline.interpret.chat import Ask, connect
from sae_pipeline.locks import hold

# the settings that change what is written (not where the model is reached, nor how patiently)
_SETTINGS = ("latents", "n_latents", "seed", "model", "explanation_tokens", "answer_tokens", "n_prompt_top",
             "n_prompt_quantile", "n_score")  # fmt: skip


def read_browser(features_dir: Path) -> dict:
    if not (features_dir / layout.FEATURES_DATA_JS).is_file():
        raise UserError(
            f"no feature browser in {features_dir}; run sae-features on this SAE first (sae-explain explains "
            "from its contexts) or point explain.features_dir at one"
        )
    report = browser.read_report(features_dir)
    if report["latents"] and "silent" not in report["latents"][0]:
        raise UserError(
            f"the feature browser in {features_dir} has no silent contexts (written by an older sae-features); "
            "run sae-features again"
        )
    return report


def choose(e, report: dict, sets: dict[int, scores.Examples]) -> list[int]:
    """The latents to explain: the most often firing, a seeded random sample, or a list; `top` and `random`
    draw from the live latents whose browser examples can score an explanation (scores.scorable)."""
    live = {r["id"]: r for r in report["latents"] if not r["dead"]}
    ok = sorted(i for i in live if scores.scorable(sets[i]))
    if e.latents == "top":
        ids = sorted(ok, key=lambda i: (-live[i]["count"], i))[: int(e.n_latents)]
    elif e.latents == "random":
        ids = sorted(random.Random(int(e.seed)).sample(ok, min(int(e.n_latents), len(ok))))
    else:
        ids = [int(i) for i in e.latents]
        browsed = {r["id"] for r in report["latents"]}
        missing = [i for i in ids if i not in browsed]
        if missing:
            raise UserError(
                f"explain.latents {missing} are not in the feature browser; browse them with sae-features"
            )
        silent = [i for i in ids if i not in live]
        if silent:
            raise UserError(
                f"explain.latents {silent} never fired in the browser's text, so there is nothing to explain"
            )
        few = [i for i in ids if i not in ok]
        if few:
            raise UserError(
                f"explain.latents {few} have too few browser examples to score an explanation (firing windows "
                "the explainer does not see, windows where they never fire); browse more text (features.n_tokens)"
            )
    if len(ids) < 2:
        raise UserError(
            f"sae-explain needs at least 2 latents it can score (got {len(ids)}): the shuffled baseline scores "
            "another latent's explanation"
        )
    return ids


def _check_settings(out_dir: Path, settings: dict, overwrite: bool) -> None:
    path = out_dir / layout.EXPLAIN_SETTINGS
    if overwrite:
        for name in (layout.EXPLAIN_DRAFTS, layout.EXPLANATIONS, layout.EXPLAIN_SUMMARY):
            (out_dir / name).unlink(missing_ok=True)
    elif path.is_file():
        old = json.loads(path.read_text())
        changed = sorted(k for k in _SETTINGS if old.get(k) != settings[k])
        if not changed and old.get("latent_ids") != settings["latent_ids"]:
            raise UserError(
                f"{out_dir} holds explanations of other latents (the feature browser changed since); "
                "rerun with explain.overwrite=true to start again"
            )
        if changed:
            raise UserError(
                f"{out_dir} holds explanations made with other settings ({', '.join('explain.' + k for k in changed)}); "
                "rerun with the same ones to resume, or with explain.overwrite=true to start again"
            )
    write_json_atomic(path, settings)


def _explain_all(ask: Ask, e, ids: list[int], sets: dict, drafts_path: Path) -> dict[int, str]:
    done = {r["latent"]: r["explanation"] for r in explanations.read(drafts_path)}
    for n, i in enumerate(ids):
        if i in done:
            continue
        answer = ask(prompts.explanation_messages(sets[i].prompt), int(e.explanation_tokens))
        done[i] = prompts.parse_explanation(answer)
        explanations.append(drafts_path, {"latent": i, "explanation": done[i]})
        print(f"explained {n + 1}/{len(ids)}: latent {i}: {done[i]}", file=sys.stderr)
    return done


def _score(ask: Ask, e, latent: int, own: str, other: int, shuffled: str, ex: scores.Examples) -> dict:
    t = int(e.answer_tokens)
    det, det_junk = scores.detection(ask, own, ex, t)
    fuz, fuz_junk = scores.fuzzing(ask, own, ex, t)
    det_s, det_s_junk = scores.detection(ask, shuffled, ex, t)
    fuz_s, fuz_s_junk = scores.fuzzing(ask, shuffled, ex, t)
    return {
        "latent": latent,
        "explanation": own,
        "detection": det,
        "fuzzing": fuz,
        "detection_shuffled": det_s,
        "fuzzing_shuffled": fuz_s,
        "shuffled_from": other,
        "n_detection": [len(ex.positives), len(ex.negatives)],
        "n_fuzzing": [len(ex.fuzz_right), len(ex.fuzz_wrong)],
        "unparsed_answers": det_junk + fuz_junk + det_s_junk + fuz_s_junk,
    }


def run_explain(e, run_dir: Path, ask: Ask | None = None) -> Path:
    """Explain and score the chosen latents of the run at run_dir; returns <run>/explain. `ask`: a model to
    use instead of the one the config names (notebooks)."""
    run_dir = Path(run_dir)
    features_dir = Path(e.features_dir) if e.features_dir else run_dir / layout.FEATURES
    report = read_browser(features_dir)
    sets = {r["id"]: scores.examples(r, report["tokens"], int(e.n_prompt_top), int(e.n_prompt_quantile),
                                     int(e.n_score), int(e.seed) * 1_000_003 + r["id"])
            for r in report["latents"] if not r["dead"]}  # fmt: skip
    ids = choose(e, report, sets)
    out_dir = run_dir / layout.EXPLAIN_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    with hold(out_dir, "the explain folder", "wait for the other sae-explain to finish"):
        settings = {k: OmegaConf.to_container(e)[k] for k in _SETTINGS}
        settings["latent_ids"] = ids
        _check_settings(out_dir, settings, bool(e.overwrite))
        records_path = out_dir / layout.EXPLANATIONS
        scored = {r["latent"] for r in explanations.read(records_path)}
        ask = ask or (connect(e) if len(scored) < len(ids) else None)
        texts = _explain_all(ask, e, ids, sets, out_dir / layout.EXPLAIN_DRAFTS) if ask else {}
        for n, i in enumerate(ids):
            if i in scored:
                continue
            other = ids[(n + 1) % len(ids)]
            rec = _score(ask, e, i, texts[i], other, texts[other], sets[i])
            explanations.append(records_path, rec)
            print(f"scored {n + 1}/{len(ids)}: latent {i}: detection {rec['detection']:.2f} "
                  f"(shuffled {rec['detection_shuffled']:.2f}), fuzzing {rec['fuzzing']:.2f} "
                  f"(shuffled {rec['fuzzing_shuffled']:.2f})", file=sys.stderr)  # fmt: skip
        records = [r for r in explanations.read(records_path) if r["latent"] in set(ids)]
        summary = explanations.summary(records)
        write_json_atomic(out_dir / layout.EXPLAIN_SUMMARY, summary)
    browser.write_browser(features_dir, explanations.attach(report, records))
    print(f"{summary['n_latents']} latents explained: detection {summary['detection']:.3f} (shuffled "
          f"{summary['detection_shuffled']:.3f}), fuzzing {summary['fuzzing']:.3f} (shuffled "
          f"{summary['fuzzing_shuffled']:.3f}): {out_dir}", file=sys.stderr)  # fmt: skip
    return out_dir
