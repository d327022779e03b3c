"""Text in, packed token contexts out: dataset loading, the held-out split, tokenization, packing.

Packing policy: documents are tokenized without special tokens, joined with the tokenizer's EOS
token as a separator, and cut into contexts of `context_size` tokens. With `prepend_bos`, each
context is BOS + (context_size - 1) text tokens and the BOS position is never stored or scored.
A trailing partial context is dropped, so there is no padding.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from sae_pipeline.config_access import cfg_value
from sae_pipeline.errors import UserError
from sae_pipeline.model import assets

BUILDER_BY_SUFFIX = {".json": "json", ".jsonl": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv"}


FILE_BUILDERS = ("files", "json", "text", "csv", "parquet")  # data.name values that read data_files by suffix
TXT_UNITS = {"file": "document", "line": "line"}  # data.txt_unit -> the text builder's sample_by


def _as_list(data_files) -> list[str]:
    if isinstance(data_files, (str, Path)):
        return [str(data_files)]
    if isinstance(data_files, dict):
        return [str(f) for v in data_files.values() for f in _as_list(v)]
    return [str(f) for f in data_files]


def builder_for_files(data_files) -> str:
    """The datasets builder for local files, from their suffix (.txt .jsonl .json .csv .parquet)."""
    suffixes = {Path(f).suffix.lower() for f in _as_list(data_files)}
    unknown = sorted(s or "(none)" for s in suffixes if s not in BUILDER_BY_SUFFIX)
    if unknown:
        raise UserError(
            f"data.data_files has files ending in {', '.join(unknown)}; use {', '.join(BUILDER_BY_SUFFIX)} files "
            "or name a datasets builder with data.name"
        )
    builders = {BUILDER_BY_SUFFIX[s] for s in suffixes}
    if len(builders) != 1:
        raise UserError(
            f"data.data_files mixes file types ({', '.join(sorted(suffixes))}); give files of one type"
        )
    return builders.pop()


def root_cause(err: BaseException) -> str:
    """The first line of the error behind a datasets error: its chain of explicit causes followed to the
    end (datasets wraps the parser's error), else the error it was raised while handling."""
    inner, seen = err, set()
    while inner.__cause__ is not None and id(inner) not in seen:
        seen.add(id(inner))
        inner = inner.__cause__
    if inner is err and err.__context__ is not None:
        inner = err.__context__
    text = str(inner).strip()
    first = text.splitlines()[0] if text else "no rows could be read"
    return f"{type(inner).__name__}: {first}"


def _load_split(data_cfg: Any, split: str):
    import datasets

    name = cfg_value(data_cfg, "name")
    data_files = cfg_value(data_cfg, "data_files")
    if data_files is not None and not isinstance(data_files, (str, dict)):
        data_files = list(data_files)
    if data_files is not None and name in (*FILE_BUILDERS, assets.EMBEDDED_DATA, None):
        name = builder_for_files(data_files)
    elif name == assets.EMBEDDED_DATA:
        name, data_files = "json", str(assets.shakespeare_jsonl())
    elif Path(str(name)).suffix in BUILDER_BY_SUFFIX and Path(str(name)).is_file():
        name, data_files = BUILDER_BY_SUFFIX[Path(str(name)).suffix], str(name)
    kwargs = {}
    if name == "text":
        unit = cfg_value(
            data_cfg, "txt_unit", "line"
        )  # absent only from manifests written before the key: lines
        if unit not in TXT_UNITS:
            raise UserError(f"data.txt_unit={unit!r} is not one of {', '.join(TXT_UNITS)}")
        kwargs["sample_by"] = TXT_UNITS[unit]
    try:
        return datasets.load_dataset(
            name,
            cfg_value(data_cfg, "config_name"),
            data_files=data_files,
            split=split,
            streaming=bool(cfg_value(data_cfg, "streaming", False)),
            **kwargs,
        )
    except Exception as err:  # datasets raises many types (missing files, empty files, hub errors)
        files = _as_list(data_files) if data_files is not None else []
        what = f"data.name={cfg_value(data_cfg, 'name')!r}"
        if files:
            what = f"data.data_files={files[0]!r}" + (
                f" (and {len(files) - 1} more)" if len(files) > 1 else ""
            )
        raise UserError(f"could not load {what} split {split!r}: {root_cause(err)}") from None


def load_split(data_cfg: Any, split: str):
    """One split of the dataset a DataConfig-like mapping names (the embedded plays included)."""
    return _load_split(data_cfg, split)


def _check_column(ds, data_cfg: Any) -> str:
    column = cfg_value(data_cfg, "text_column", "text")
    names = ds.column_names
    if names is not None and column not in names:
        raise UserError(f"data.text_column={column!r} is not a column of the dataset; it has {list(names)}")
    return column


def _source(data_cfg: Any) -> str:
    """What a user named as the text: the data file(s), or else the dataset."""
    files = (
        _as_list(cfg_value(data_cfg, "data_files")) if cfg_value(data_cfg, "data_files") is not None else []
    )
    if len(files) == 1:
        return f"the data file {files[0]}"
    if files:
        return f"the data files {', '.join(files)}"
    return f"the dataset data.name={cfg_value(data_cfg, 'name')!r}"


def split_documents(data_cfg: Any, seed: int) -> tuple[Iterable[str], dict]:
    """Training documents (in a seeded order) and a record of the held-out evaluation documents."""
    split = cfg_value(data_cfg, "split", "train")
    ds = _load_split(data_cfg, split)
    column = _check_column(ds, data_cfg)
    eval_split = cfg_value(data_cfg, "eval_split")
    n_eval = 0 if eval_split else int(cfg_value(data_cfg, "eval_documents", 0))
    if cfg_value(data_cfg, "streaming", False):
        # A stream has no length: hold out its first documents, train on the rest in stream order.
        record = {"eval_split": eval_split, "eval_indices": list(range(n_eval)), "eval_titles": []}
        texts = (row[column] for i, row in enumerate(ds) if i >= n_eval)
        return texts, record
    n_docs = len(ds)
    has_text = (not isinstance(row[column], str) or row[column].strip() for row in ds)
    if not any(has_text):  # stops at the first document with text
        raise UserError(f"{_source(data_cfg)} split {split!r} holds no text (it is empty or blank)")
    if n_eval >= n_docs:
        raise UserError(
            f"data.eval_documents={n_eval} holds out every one of the {n_docs} documents; lower it or set data.eval_split"
        )
    order = list(range(n_docs))
    random.Random(seed).shuffle(order)
    eval_indices, train_indices = sorted(order[:n_eval]), order[n_eval:]
    title_column = cfg_value(data_cfg, "title_column")
    titles = []
    if title_column and title_column in ds.column_names:
        titles = [ds[i][title_column] for i in eval_indices]
    record = {
        "eval_split": eval_split,
        "eval_indices": eval_indices,
        "eval_titles": titles,
        "n_documents": n_docs,
    }
    return (ds[i][column] for i in train_indices), record


def eval_documents(data_cfg: Any, record: dict) -> Iterator[str]:
    """The held-out documents a store's manifest recorded (or the data's evaluation split)."""
    if record.get("eval_split"):
        ds = _load_split(data_cfg, record["eval_split"])
        column = _check_column(ds, data_cfg)
        return (row[column] for row in ds)
    ds = _load_split(data_cfg, cfg_value(data_cfg, "split", "train"))
    column = _check_column(ds, data_cfg)
    if cfg_value(data_cfg, "streaming", False):
        wanted = set(record["eval_indices"])
        return (row[column] for i, row in enumerate(ds) if i in wanted)
    return (ds[i][column] for i in record["eval_indices"])


def bos_token_id(tokenizer, prepend_bos: bool) -> int | None:
    if not prepend_bos:
        return None
    bos = tokenizer.bos_token_id
    if bos is None:  # masked LMs (ESM-2, BERT) start a sequence with their CLS token instead
        bos = getattr(tokenizer, "cls_token_id", None)
    if bos is None:
        raise UserError(
            "harvest.prepend_bos=true but the tokenizer has no BOS (or CLS) token; set harvest.prepend_bos=false"
        )
    return int(bos)


def pack_contexts(
    tokenizer, texts: Iterable[str], context_size: int, bos_id: int | None
) -> Iterator[torch.Tensor]:
    """Yield int64 tensors of `context_size` tokens, BOS first when `bos_id` is given."""
    body = context_size - (1 if bos_id is not None else 0)
    if body < 1:
        raise UserError(f"harvest.context_size={context_size} leaves no room for text after BOS")
    sep = tokenizer.eos_token_id
    buffer: list[int] = []
    for text in texts:
        if not text:
            continue
        buffer.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if sep is not None:
            buffer.append(int(sep))
        start = 0
        while len(buffer) - start >= body:
            chunk = buffer[start : start + body]
            start += body
            if bos_id is not None:
                chunk = [bos_id, *chunk]
            yield torch.tensor(chunk, dtype=torch.long)
        del buffer[:start]


def _take(contexts: Iterator[torch.Tensor], n_tokens: int, context_size: int, has_bos: bool, source: str):
    rows_per_context = context_size - int(has_bos)
    n_contexts = max(1, -(-n_tokens // rows_per_context))
    taken = list(itertools.islice(contexts, n_contexts))
    if not taken:
        raise UserError(f"{source} yields no complete context of {context_size} tokens")
    input_ids = torch.stack(taken)
    mask = torch.ones_like(input_ids, dtype=torch.bool)
    if has_bos:
        mask[:, 0] = False
    return input_ids, mask


def heldout_contexts(manifest: dict, tokenizer, n_tokens: int):
    """(input_ids [N, T], valid mask [N, T]) of the held-out text of the store, packed like harvest."""
    data_cfg = manifest["dataset"]["config"]
    record = manifest["dataset"]["heldout"]
    bos_id = manifest["bos"]["token_id"] if manifest["bos"]["prepended"] else None
    contexts = pack_contexts(tokenizer, eval_documents(data_cfg, record), manifest["context_size"], bos_id)
    return _take(contexts, n_tokens, manifest["context_size"], bos_id is not None, "the held-out text")


def contexts_for_data(
    data_cfg: Any, tokenizer, split: str, context_size: int, prepend_bos: bool, n_tokens: int, seed: int
):
    """(input_ids, valid mask) from any dataset: split="eval" for its held-out part, "train" otherwise."""
    train_docs, record = split_documents(data_cfg, seed)
    docs = eval_documents(data_cfg, record) if split == "eval" else train_docs
    bos_id = bos_token_id(tokenizer, prepend_bos)
    contexts = pack_contexts(tokenizer, docs, context_size, bos_id)
    return _take(
        contexts, n_tokens, context_size, bos_id is not None, f"data.name={cfg_value(data_cfg, 'name')!r}"
    )
