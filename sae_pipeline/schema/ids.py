"""Default `model.id` / `data.id`: a readable, filesystem-safe name derived from `name`, so two models
(or two datasets) never share a store folder by accident.

    embedded:smollm2 -> smollm2-135m        EleutherAI/pythia-70m -> pythia-70m
    /data/my-model   -> my-model-<hash6>     files /d/a.jsonl -> a-<hash6>; [/d/a.txt, /d/b.txt] -> d-<hash6>
A local path (or a builder's data files) gets a short hash of its absolute path(s); an explicit id wins.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from omegaconf import OmegaConf

FILE_NAMES = ("files", "json", "text", "csv", "parquet")  # data.name values that mean "read data_files"
EMBEDDED_IDS = {"embedded:smollm2": "smollm2-135m", "embedded:shakespeare": "shakespeare"}


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "x"


def _is_local(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or os.path.exists(os.path.expanduser(name))


def _hash(parts: list[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:6]


def derived_id(name, *extra) -> str:
    """The id for `name` (+ gguf_file / data_files / config_name, whichever the group has)."""
    name = str(name)
    extra_values = []
    for e in extra:
        if e is None:
            continue
        e = OmegaConf.to_container(e) if OmegaConf.is_config(e) else e
        extra_values.extend([str(v) for v in e] if isinstance(e, (list, tuple)) else [str(e)])
    files = [v for v in extra_values if _is_local(v)]
    if name in EMBEDDED_IDS and not files:
        return EMBEDDED_IDS[name]
    if files and name in (*FILE_NAMES, *EMBEDDED_IDS):  # local files read by a builder: named by the files
        name = ""
    others = [_safe(Path(v).stem) for v in extra_values if v not in files]
    if not name:
        absolute, base = [], []
    elif _is_local(name):
        absolute = [str(Path(name).expanduser().resolve())]
        base = [_safe(Path(absolute[0]).name)]
    else:
        absolute, base = [], [_safe(name.rstrip("/").split("/")[-1])]
    if files:
        absolute += [str(Path(f).expanduser().resolve()) for f in files]
        parents = {Path(f).expanduser().resolve().parent for f in files}
        one_folder = len(files) > 1 and len(parents) == 1  # many files of one folder: named by the folder
        base.append(_safe(parents.pop().name if one_folder else Path(files[0]).stem))
    parts = base + others + ([_hash(absolute)] if absolute else [])
    return "-".join(parts)


def register_resolver() -> None:
    if not OmegaConf.has_resolver("sae_id"):
        OmegaConf.register_new_resolver("sae_id", derived_id)
