"""data_files: the builder comes from the suffix, .txt is one document per file unless data.txt_unit=line,
and a datasets error prints its real cause in the one-line console error."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from sae_pipeline.data.text import split_documents
from sae_pipeline.errors import UserError
from sae_pipeline.schema.common import DataConfig
from tests.helpers import run_cli

DOCS = ["first document\nwith two lines", "second, with a comma", 'third "quoted" one\nand more\nlines']


def data_cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(DataConfig), {"eval_documents": 0, **kw})


def write(folder, suffix: str) -> list[str]:
    if suffix == ".txt":
        paths = [folder / f"doc{i}.txt" for i in range(len(DOCS))]
        for p, d in zip(paths, DOCS, strict=True):
            p.write_text(d)
        return [str(p) for p in paths]
    path = folder / f"docs{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    elif suffix == ".json":
        path.write_text(json.dumps([{"text": d} for d in DOCS]))
    elif suffix == ".csv":
        path.write_text("text\n" + "".join('"' + d.replace('"', '""') + '"\n' for d in DOCS))
    else:
        pq.write_table(pa.table({"text": DOCS}), path)
    return [str(path)]


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".json", ".csv", ".parquet"])
@pytest.mark.parametrize("name", ["embedded:shakespeare", "files"])
def test_each_suffix_reads_the_documents_whole(tmp_path, suffix, name):
    files = write(tmp_path, suffix)
    texts, record = split_documents(data_cfg(name=name, data_files=files), seed=0)
    assert sorted(texts) == sorted(DOCS) and record["n_documents"] == len(DOCS)


def test_txt_unit_line_makes_each_line_a_document(tmp_path):
    files = write(tmp_path, ".txt")
    texts, _ = split_documents(data_cfg(data_files=files, txt_unit="line"), seed=0)
    assert sorted(texts) == sorted(line for d in DOCS for line in d.split("\n"))


def test_unknown_and_mixed_suffixes_are_one_sentence_errors(tmp_path):
    with pytest.raises(UserError, match=r"ending in \.docx"):
        split_documents(data_cfg(data_files=[str(tmp_path / "a.docx")]), seed=0)
    with pytest.raises(UserError, match="mixes file types"):
        split_documents(data_cfg(data_files=[str(tmp_path / "a.txt"), str(tmp_path / "b.csv")]), seed=0)


def test_a_broken_file_prints_the_parser_cause_on_the_console(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    res = run_cli("harvest", [f"data.data_files={bad}", f"paths.root={tmp_path}/runs"], tmp_path)
    assert res.returncode == 2
    (line,) = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert "JSON parse error" in line and "ArrowInvalid" in line and str(bad) in line, line
