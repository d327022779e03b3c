"""Scoring an explanation of a latent: detection and fuzzing, as balanced accuracies in [0, 1].

From one browser record (feature_report.py): the explainer sees the first `n_prompt_top` top contexts
(at most half of them, so a rare latent keeps some to be scored on) and every other quantile (weak)
example, firing tokens marked; scoring uses only the examples it did not see, so an explanation cannot
pass by quoting its prompt. A latent that leaves no example of one of the answers is not `scorable`.

- detection: positives (held-out top and quantile windows, unmarked) and negatives (windows of contexts
  where the latent never fires): the scorer answers "does it fire here?";
- fuzzing: held-out firing windows marked at the firing tokens (right) or at as many random tokens where
  it does not fire (wrong): the scorer answers "are these the tokens it fires on?".

Balanced accuracy = mean over the two classes of the fraction answered right, so a scorer that always
says yes gets 0.5, a perfect one 1.0; an answer that is neither yes nor no counts as wrong.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from sae_pipeline.interpret import explain_prompts as prompts
from sae_pipeline.interpret.chat import Ask


def balanced_accuracy(labels: list[bool], answers: list[bool | None]) -> float:
    """Mean over the classes present of the fraction of right answers (None is never right)."""
    rates = []
    for cls in (True, False):
        got = [a is cls for lab, a in zip(labels, answers, strict=True) if lab is cls]
        if got:
            rates.append(sum(got) / len(got))
    return sum(rates) / len(rates) if rates else 0.0


@dataclass
class Examples:
    """One latent's texts: those the explainer sees, and the held-out ones the scorer is asked about."""

    prompt: list[str] = field(default_factory=list)
    positives: list[str] = field(default_factory=list)
    negatives: list[str] = field(default_factory=list)
    fuzz_right: list[str] = field(default_factory=list)
    fuzz_wrong: list[str] = field(default_factory=list)


def _firing(ex: dict) -> set[int]:
    return {i for i, a in enumerate(ex["acts"]) if a > 0}


def _interleave(a: list, b: list) -> list:
    out = [x for pair in zip(a, b, strict=False) for x in pair]
    return out + a[len(b) :] + b[len(a) :]


def examples(rec: dict, strings: dict[str, str], n_prompt_top: int, n_prompt_quantile: int, n_score: int,
             seed: int) -> Examples:  # fmt: skip
    """Split a browser record's windows into the prompt's and the scorer's (deterministic in seed)."""
    top, weak = rec["top"], rec["weak"]
    seen_weak = weak[0::2][:n_prompt_quantile]
    shown = top[: min(n_prompt_top, (len(top) + 1) // 2)] + seen_weak  # a rare latent keeps half for scoring
    n_top = len(shown) - len(seen_weak)
    held = _interleave([w for w in weak if not any(w is s for s in seen_weak)], top[n_top:])
    ex = Examples(prompt=[prompts.show(e["toks"], strings, _firing(e)) for e in shown])
    ex.positives = [prompts.show(e["toks"], strings) for e in held[:n_score]]
    ex.negatives = [prompts.show(e["toks"], strings) for e in rec.get("silent", [])[:n_score]]
    rng = random.Random(seed)
    fuzz = held[::-1][: 2 * n_score]  # from the other end: detection and fuzzing overlap only when few
    for e in fuzz[0::2]:
        ex.fuzz_right.append(prompts.show(e["toks"], strings, _firing(e)))
    for e in fuzz[1::2]:
        quiet = [i for i in range(len(e["toks"])) if i not in _firing(e)]
        if quiet:
            marks = set(rng.sample(quiet, min(len(_firing(e)), len(quiet))))
            ex.fuzz_wrong.append(prompts.show(e["toks"], strings, marks))
    return ex


def scorable(ex: Examples) -> bool:
    """Every question has examples of both answers: held-out firing windows, silent ones, right and wrong marks."""
    return bool(ex.positives and ex.negatives and ex.fuzz_right and ex.fuzz_wrong)


def _ask_all(ask: Ask, messages: list[list[dict]], max_tokens: int) -> list[bool | None]:
    return [prompts.parse_yes_no(ask(m, max_tokens)) for m in messages]


def detection(ask: Ask, explanation: str, ex: Examples, max_tokens: int) -> tuple[float, int]:
    """(balanced accuracy, answers that were neither yes nor no)."""
    texts = ex.positives + ex.negatives
    labels = [True] * len(ex.positives) + [False] * len(ex.negatives)
    answers = _ask_all(ask, [prompts.detection_messages(explanation, t) for t in texts], max_tokens)
    return balanced_accuracy(labels, answers), answers.count(None)


def fuzzing(ask: Ask, explanation: str, ex: Examples, max_tokens: int) -> tuple[float, int]:
    texts = ex.fuzz_right + ex.fuzz_wrong
    labels = [True] * len(ex.fuzz_right) + [False] * len(ex.fuzz_wrong)
    answers = _ask_all(ask, [prompts.fuzzing_messages(explanation, t) for t in texts], max_tokens)
    return balanced_accuracy(labels, answers), answers.count(None)
