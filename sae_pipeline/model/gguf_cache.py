"""De-quantizing a GGUF model once: each GGUF file becomes a cached float32 Hugging Face folder.

Loading a GGUF file through transformers de-quantizes every tensor on every load (half a minute for
a 135M model on a laptop CPU, minutes for billions of parameters); the converted folder loads in a
fraction of that. `model.name=<folder or hub repo> model.gguf_file=<file.gguf>` goes through here, and
so does the embedded default (model/assets.py).

Cache key: the GGUF file's absolute path (for a hub repo its snapshot path, which names the commit),
size and modification time (nanoseconds), and the transformers version that converts it, hashed to 16
hex digits in the folder name `<cache>/gguf/<file stem>-<key>/` (cache: $SAE_PIPELINE_CACHE, else
~/.cache/sae_pipeline). The folder is float32: 4 bytes per parameter on disk. A stat, not a checksum: hashing a multi-GB file would cost seconds
on every load. A file rewritten in place gets a new mtime (and usually size) and so a new folder; a
copy at another path is converted once more. Old folders are never deleted by the pipeline.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from sae_pipeline import files, layout
from sae_pipeline.errors import UserError


def gguf_path(name: str, gguf_file: str, revision: str | None = None) -> Path:
    """The local GGUF file `model.gguf_file` names: inside the folder `name`, else fetched from the hub repo."""
    local = Path(name).expanduser() / gguf_file
    if Path(name).expanduser().is_dir():
        if not local.is_file():
            raise UserError(f"model.gguf_file={gguf_file!r} is not a file in the folder {name}")
        return Path(os.path.abspath(local))
    from huggingface_hub import hf_hub_download

    try:
        # .../snapshots/<commit>/<file>, a link to the blob: the commit is part of the cache key
        return Path(os.path.abspath(hf_hub_download(repo_id=name, filename=gguf_file, revision=revision)))
    except Exception as err:  # hub errors are many classes (offline, 404, gated repo, bad id)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"could not fetch model.gguf_file={gguf_file!r} from model.name={name!r} ({first})"
        ) from None


def cache_key(gguf: Path) -> str:
    """16 hex digits of sha256 over the file's absolute path, size, mtime_ns and transformers' version."""
    import transformers

    stat = Path(gguf).stat()  # of the file a link points to
    fields = {
        "path": os.path.abspath(gguf),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "transformers": transformers.__version__,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def cached_dir(gguf: Path) -> Path:
    """The float32 folder of this GGUF file, converted now if this file (path, size, mtime) never was."""
    gguf = Path(os.path.abspath(gguf))  # links kept: a hub blob's name is its hash, the link's is the file's
    final = layout.gguf_cache_dir(gguf.name, cache_key(gguf))
    if (final / "config.json").exists():
        return final
    return convert(gguf, final, f"converted from {gguf} ({gguf.stat().st_size} bytes)")


def convert(gguf: Path, final: Path, note: str) -> Path:
    """De-quantize `gguf` through transformers' own GGUF loader and publish a float32 folder at `final`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} to a float32 Hugging Face folder (once)...", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained; rebuild it from its (de-quantized) weights.
    config = quantized.config
    config.__dict__.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".hf-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / layout.CONVERTED_SOURCE).write_text(note + "\n")
        files.publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
