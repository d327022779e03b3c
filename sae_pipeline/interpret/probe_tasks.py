"""Labelled text for probing: documents with labels taken from facts about the text, cut into contexts.

Tasks (`probe.task`):
    genre    sequence: the play's genre as the First Folio groups it (first_folio_genres.json names its source)
    play     sequence: which of N plays; each play is cut into `n_sections` contiguous sections and the
             sections (not the contexts) are split between probe-train and probe-test
    speaker  token: the token is part of a speaker heading (`**NAME**` lines of the plays' markdown) (1)
             or of spoken text (0); stage directions, scene headings and whitespace are left out
    files    sequence: any table given as `probe.data_files` with a text column and a label column

A `Document` is the unit of the train/test split, so no document has contexts on both sides.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sae_pipeline.data import text
from sae_pipeline.errors import UserError

TASKS = ("genre", "play", "speaker", "files")
TOKEN_TASKS = ("speaker",)
FOLIO_FILE = Path(__file__).with_name("first_folio_genres.json")
IGNORE = -1  # token label: not part of the task
HEADING_RE = re.compile(r"^\*\*[^*\n]+\*\*", re.M)  # a speaker heading line: **THESEUS**
DIRECTION_RE = re.compile(r"_[^_\n]+_")  # stage directions: _Enter THESEUS_ (whole line or inline)


def first_folio_genres() -> dict[str, str]:
    return json.loads(FOLIO_FILE.read_text())["genres"]


@dataclass
class Document:
    text: str
    label: str | None  # sequence label (None for token tasks)
    group: str  # what the train/test split assigns: a play, a section of a play, or a row
    seen: bool | None = None  # whether the SAE's store harvested from it (None: unknown)


@dataclass
class Contexts:
    """Token contexts cut from documents, BOS first when the store's policy says so, right-padded."""

    ids_NT: torch.Tensor
    attention_NT: torch.Tensor  # 1 on real tokens (BOS included), 0 on padding
    valid_NT: torch.Tensor  # real non-BOS tokens: what pooling and token tasks use
    label_N: torch.Tensor  # class index per context (sequence tasks; -1 for token tasks)
    token_label_NT: torch.Tensor  # class index per token (token tasks; IGNORE elsewhere)
    group_N: list[str]
    classes: list[str]
    seen: dict[str, bool | None] = field(default_factory=dict)  # group -> harvested by the SAE's store


# ----------------------------------------------------------------------------- token labels


def speaker_char_labels(doc: str) -> list[int]:
    """Per character: 1 in a speaker heading, 0 in spoken text, IGNORE elsewhere (directions, '#' lines, spaces)."""
    labels = [IGNORE] * len(doc)
    start = 0
    for line in doc.split("\n"):
        end = start + len(line)
        stripped = line.rstrip()
        if HEADING_RE.match(stripped) and HEADING_RE.match(stripped).end() == len(stripped):
            labels[start : start + len(stripped)] = [1] * len(stripped)
        elif stripped and not stripped.startswith("#"):
            labels[start : start + len(stripped)] = [0] * len(stripped)
            for m in DIRECTION_RE.finditer(stripped):
                labels[start + m.start() : start + m.end()] = [IGNORE] * (m.end() - m.start())
        start = end + 1
    for i, ch in enumerate(doc):  # whitespace carries no label of its own
        if ch.isspace():
            labels[i] = IGNORE
    return labels


def token_labels(char_labels: list[int], offsets: list[tuple[int, int]]) -> list[int]:
    """A token's label is its characters' one label; a token mixing labels (or only whitespace) is IGNORE."""
    out = []
    for a, b in offsets:
        found = {char_labels[i] for i in range(a, b) if char_labels[i] != IGNORE}
        out.append(found.pop() if len(found) == 1 else IGNORE)
    return out


# ----------------------------------------------------------------------------- documents per task


def _rows(data_cfg, split: str):
    ds = text.load_split(data_cfg, split)
    return [dict(r) for r in ds]


def _title_column(data_cfg, rows: list[dict]) -> str:
    col = data_cfg.get("title_column") or "title"
    if rows and col not in rows[0]:
        raise UserError(
            f"the probe's plays need a title column; data.title_column={col!r} is not one of {sorted(rows[0])}"
        )
    return col


def store_documents(task_cfg, manifest: dict) -> list[Document]:
    """The documents of one of the built-in tasks, read from the dataset that the store was harvested from."""
    data_cfg = manifest["dataset"]["config"]
    record = manifest["dataset"]["heldout"]
    if record.get("eval_split"):
        raise UserError(
            f"probe.task={task_cfg.task} reads the store's documents by index, but the store's data uses a "
            "separate eval_split; use probe.task=files instead."
        )
    rows = _rows(data_cfg, data_cfg.get("split") or "train")
    column = data_cfg.get("text_column") or "text"
    title = _title_column(data_cfg, rows)
    heldout = set(record.get("eval_indices", []))
    seen = {r[title]: i not in heldout for i, r in enumerate(rows)}
    texts = {r[title]: r[column] for r in rows}
    if task_cfg.task == "genre":
        genres = first_folio_genres()
        docs = [Document(texts[t], genres[t], t, seen[t]) for t in texts if t in genres]
        if not docs:
            raise UserError(
                f"probe.task=genre: no title in column {title!r} is a First Folio play ({FOLIO_FILE})."
            )
        return docs
    if task_cfg.task == "play":
        plays = list(task_cfg.plays) or [rows[i][title] for i in sorted(heldout)]
        missing = [p for p in plays if p not in texts]
        if missing or len(plays) < 2:
            raise UserError(
                f"probe.plays must name >= 2 documents of column {title!r}; {missing or plays} "
                f"(known: {sorted(texts)[:5]}...)"
            )
        n = int(task_cfg.n_sections)
        docs = []
        for p in plays:
            cut = [len(texts[p]) * i // n for i in range(n + 1)]
            docs += [Document(texts[p][cut[i] : cut[i + 1]], p, f"{p}#{i}", seen[p]) for i in range(n)]
        return docs
    return [Document(texts[t], None, t, seen[t]) for t in texts]  # speaker: every play


def file_documents(task_cfg) -> list[Document]:
    """Rows of probe.data_files: text, label and (optionally) the group that the split keeps together."""
    files = task_cfg.data_files
    if not files:
        raise UserError("probe.task=files needs probe.data_files (a .csv/.json/.jsonl/.parquet file).")
    first = Path(str(files if isinstance(files, str) else list(files)[0]))
    builder = text.BUILDER_BY_SUFFIX.get(first.suffix)
    if builder is None:
        raise UserError(
            f"probe.data_files={first} has no known suffix ({', '.join(text.BUILDER_BY_SUFFIX)})."
        )
    rows = _rows({"name": builder, "data_files": files if isinstance(files, str) else list(files)}, "train")
    need = [task_cfg.text_column, task_cfg.label_column] + (
        [task_cfg.group_column] if task_cfg.group_column else []
    )
    if rows and any(c not in rows[0] for c in need):
        raise UserError(
            f"probe.data_files={first}: columns {need} are needed, the file has {sorted(rows[0])}."
        )
    return [
        Document(
            str(r[task_cfg.text_column]),
            str(r[task_cfg.label_column]),
            str(r[task_cfg.group_column]) if task_cfg.group_column else f"row-{i}",
        )
        for i, r in enumerate(rows)
    ]


# ----------------------------------------------------------------------------- contexts


def _windows(n_tokens: int, body: int, n: int) -> list[int]:
    """Up to n evenly spaced, non-overlapping starts of `body`-token windows in a document of n_tokens."""
    if n_tokens <= body:
        return [0]
    n = min(n, n_tokens // body)
    span = n_tokens - body
    return sorted({round(span * i / max(n - 1, 1)) for i in range(n)})


def build_contexts(
    docs: list[Document], tokenizer, context_size: int, bos_id: int | None, per_doc: int, token_task: bool
) -> Contexts:
    """Cut each document into up to `per_doc` evenly spaced contexts (no context crosses documents)."""
    classes = (
        sorted({d.label for d in docs if d.label is not None}) if not token_task else ["spoken", "speaker"]
    )
    body = context_size - (1 if bos_id is not None else 0)
    rows, labels, tok_labels, groups = [], [], [], []
    for d in docs:
        # character offsets only where token labels need them (slow tokenizers, e.g. ESM's, have none)
        enc = tokenizer(d.text, add_special_tokens=False, return_offsets_mapping=token_task, verbose=False)
        ids = enc["input_ids"]
        tl = (
            token_labels(speaker_char_labels(d.text), enc["offset_mapping"])
            if token_task
            else [IGNORE] * len(ids)
        )
        for s in _windows(len(ids), body, per_doc):
            chunk, chunk_tl = ids[s : s + body], tl[s : s + body]
            if not chunk:
                continue
            if bos_id is not None:
                chunk, chunk_tl = [bos_id, *chunk], [IGNORE, *chunk_tl]
            rows.append(chunk)
            tok_labels.append(chunk_tl)
            labels.append(classes.index(d.label) if d.label is not None else IGNORE)
            groups.append(d.group)
    if not rows:
        raise UserError("the probe's documents hold no text to cut into contexts.")
    T = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids_NT = torch.full((len(rows), T), int(pad), dtype=torch.long)
    attn_NT = torch.zeros(len(rows), T, dtype=torch.long)
    tl_NT = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for i, (r, t) in enumerate(zip(rows, tok_labels, strict=True)):
        ids_NT[i, : len(r)] = torch.tensor(r)
        attn_NT[i, : len(r)] = 1
        tl_NT[i, : len(t)] = torch.tensor(t)
    valid_NT = attn_NT.bool()
    if bos_id is not None:
        valid_NT[:, 0] = False
    seen = {d.group: d.seen for d in docs}
    return Contexts(ids_NT, attn_NT, valid_NT, torch.tensor(labels), tl_NT, groups, classes, seen)
