"""The prompts of sae-explain and the parsing of their answers.

Texts are the feature browser's token windows joined back into text; marked tokens are wrapped in
<< and >> (runs of neighbouring marked tokens as one span), as in the explainer prompts of EleutherAI's
delphi. A score question is answered yes or no: `parse_yes_no` reads the answer's first word and
returns None for anything else, which the scores count as a wrong answer. (The questions are worded
so that SmolLM2-135M-Instruct starts its answer with yes or no; asked "Does the feature fire ...?" it
mostly answered "The feature is ...".)
"""

from __future__ import annotations

import re

OPEN, CLOSE = "<<", ">>"
SYSTEM = "You study the features of a neural network that reads text. Answer briefly."
NO_EXPLANATION = "(no explanation)"


def show(toks: list[int], strings: dict[str, str], marked: set[int] = frozenset()) -> str:
    """The window's text, with the tokens at positions `marked` wrapped in << >>; newlines shown as ↵."""
    out = []
    for i, t in enumerate(toks):
        s = strings.get(str(t), f"<{t}>").replace("\n", "↵")
        if i in marked and i - 1 not in marked:
            s = OPEN + s
        if i in marked and i + 1 not in marked:
            s = s + CLOSE
        out.append(s)
    return "".join(out)


def _messages(user: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def explanation_messages(texts: list[str]) -> list[dict]:
    examples = "\n".join(f"Example {i + 1}: {t}" for i, t in enumerate(texts))
    return _messages(
        f"A feature fires on the tokens between {OPEN} and {CLOSE} in these texts.\n{examples}\n"
        "What does the feature detect? Answer with a short phrase only, on one line."
    )


def detection_messages(explanation: str, text: str) -> list[dict]:
    return _messages(
        f'Explanation of a feature: "{explanation}".\nText: {text}\n'
        "Question: does this text contain what the explanation describes?\nAnswer with one word, yes or no."
    )


def fuzzing_messages(explanation: str, marked_text: str) -> list[dict]:
    return _messages(
        f'Explanation of a feature: "{explanation}".\nText: {marked_text}\n'
        f"Question: are the tokens between {OPEN} and {CLOSE} what the explanation describes?\n"
        "Answer with one word, yes or no."
    )


_WORD = re.compile(r"[a-z]+")
YES, NO = {"yes", "y", "true", "correct"}, {"no", "n", "false", "incorrect"}


def parse_yes_no(answer: str) -> bool | None:
    """True for yes, False for no (its first word, any case or punctuation), None for anything else."""
    text = (answer or "").strip().lower()
    if text[:1] in ("1", "0") and not text[1:2].isdigit():
        return text[0] == "1"
    m = _WORD.match(text.lstrip("\"'*`([ \t\n"))
    word = m.group(0) if m else ""
    return True if word in YES else False if word in NO else None


_PREFIX = re.compile(r"^(explanation|answer|the feature detects|feature)\s*[:\-]\s*", re.IGNORECASE)


def parse_explanation(answer: str, max_chars: int = 200) -> str:
    """The first non-empty line, without a leading label, enclosing quotes or markup, at most max_chars long."""
    for line in (answer or "").splitlines():
        line = _PREFIX.sub("", line.strip().strip("*#`").strip()).strip()
        if len(line) >= 2 and line[0] == line[-1] and line[0] in "\"'`":  # quoted whole
            line = line[1:-1].strip()
        if line:
            return line.replace(OPEN, "").replace(CLOSE, "")[:max_chars]
    return NO_EXPLANATION
