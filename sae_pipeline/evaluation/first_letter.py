"""The first-letter task of feature absorption (Chanin et al. 2024, as SAEBench runs it), on any tokenizer.

    words = alpha_words(tokenizer)                        # single-token alphabetic words of the vocabulary
    chosen = sample_words(words, 1500, seed=0)
    x_ND = word_activations(model, hook, tokenizer, chosen, n_examples=6, bos_id=1, batch_size=16, seed=0)

Each word is shown in an in-context prompt that makes a model state a word's first letter:

    <bos> cat has the first letter: C\\n dog has the first letter: D\\n ... <word> has the first letter:

and the activation at the hook is read at the word's own token. Prompts are assembled from token ids
(each piece tokenized once), so the word is exactly one token at a known position whatever the tokenizer
does at piece boundaries.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

import torch
from torch import Tensor

from sae_pipeline.errors import UserError
from sae_pipeline.model.activations import capture
from sae_pipeline.progress import progress

LETTERS = string.ascii_lowercase
TEMPLATE = " has the first letter:"  # follows the word; SAEBench's "{word} has the first letter:"
SEPARATOR = "\n"


@dataclass(frozen=True)
class Word:
    token_id: int
    text: str  # as the tokenizer decodes it, leading space included

    @property
    def letter(self) -> int:
        """Index of the first letter in LETTERS."""
        return LETTERS.index(self.text.strip()[0].lower())


def alpha_words(tokenizer) -> list[Word]:
    """Every vocabulary token that decodes to ASCII letters only, after at most one leading space."""
    special = set(tokenizer.all_special_ids)
    out = []
    for token_id in sorted(tokenizer.get_vocab().values()):
        if token_id in special:
            continue
        text = tokenizer.decode([token_id])
        bare = text[1:] if text.startswith(" ") else text
        if bare and bare.isascii() and bare.isalpha():
            out.append(Word(token_id, text))
    return out


def sample_words(words: list[Word], n: int, seed: int) -> list[Word]:
    """A seeded sample of at most n words (all of them when there are fewer), in vocabulary order."""
    if len(words) <= n:
        return list(words)
    return sorted(random.Random(seed).sample(words, n), key=lambda w: w.token_id)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def build_prompts(
    tokenizer, words: list[Word], examples: list[Word], n_examples: int, bos_id: int | None, seed: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(input_ids [N, T], attention [N, T], position of the word [N]); right-padded with the pad or EOS id.

    Each prompt has n_examples solved examples drawn (seeded) from `examples`, never the word itself."""
    rng = random.Random(seed)
    template, sep = _ids(tokenizer, TEMPLATE), _ids(tokenizer, SEPARATOR)
    answers = {c: _ids(tokenizer, " " + c.upper()) for c in LETTERS}
    rows, positions = [], []
    for w in words:
        pool = [e for e in examples if e.token_id != w.token_id]
        ids = [bos_id] if bos_id is not None else []
        for e in rng.sample(pool, min(n_examples, len(pool))):
            ids += [e.token_id, *template, *answers[LETTERS[e.letter]], *sep]
        positions.append(len(ids))
        rows.append(ids + [w.token_id, *template])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad = 0 if pad is None else pad
    width = max(len(r) for r in rows)
    ids_NT = torch.full((len(rows), width), pad, dtype=torch.long)
    att_NT = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids_NT[i, : len(r)] = torch.tensor(r)
        att_NT[i, : len(r)] = 1
    return ids_NT, att_NT, torch.tensor(positions)


def word_activations(
    model, hook, tokenizer, words: list[Word], n_examples: int, bos_id: int | None, batch_size: int, seed: int
) -> Tensor:
    """[N, D] float32 activations at the hook at each word's token, in its first-letter prompt (CPU)."""
    if not words:
        raise UserError(
            "the tokenizer has no single-token alphabetic words; the first-letter task needs them."
        )
    ids_NT, att_NT, pos_N = build_prompts(tokenizer, words, words, n_examples, bos_id, seed)
    device = next(model.parameters()).device
    out = []
    bar = progress(len(words), "absorption prompts", unit="words")
    for i in range(0, len(words), batch_size):
        ids, att = ids_NT[i : i + batch_size], att_NT[i : i + batch_size]
        width = int(att.sum(1).max())  # right padding: drop the all-pad tail of the batch
        acts = capture(model, ids[:, :width].to(device), att[:, :width].to(device), [hook])[hook.name]
        rows = torch.arange(acts.shape[0], device=acts.device)
        out.append(acts[rows, pos_N[i : i + batch_size].to(acts.device)].float().cpu())
        bar.update(len(ids))
    bar.close()
    return torch.cat(out)
