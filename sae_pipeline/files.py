"""Writing files so that a reader never sees half of one: write to a temporary name, fsync, rename.

Every file a later stage or a resume trusts goes through here (JSON, text, safetensors), and
`sha256_file` is the one checksum they are recorded with (sae_pipeline/integrity/ records and checks
them). A full disk is an OSError naming the file whatever the writer (safetensors raises its own
SafetensorError).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from sae_pipeline import faults, layout


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """safetensors file of contiguous CPU copies; a write error is an OSError naming the file."""
    try:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata
        )
    except SafetensorError as err:
        code = errno.ENOSPC if "No space left" in str(err) else errno.EIO
        raise OSError(code, os.strerror(code) if code == errno.ENOSPC else str(err), str(path)) from None


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def publish_file(tmp: Path, path: Path) -> None:
    """Move a finished temporary file into place in one rename, fsynced first (removed if that fails)."""
    try:
        fsync_file(tmp)
        faults.point(f"write:{path.name}", tmp)  # tests/faults kill a write here (a no-op otherwise)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    tmp = layout.tmp_name(path)
    try:
        try:
            tmp.write_text(text, encoding="utf-8")
        except OSError as err:  # an error of write() (a full disk) names no file: name the one being written
            if err.filename is not None or err.errno is None:
                raise
            raise OSError(err.errno, err.strerror, str(path)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    publish_file(tmp, path)


def write_json_atomic(path: Path, obj: Any, indent: int | None = 2) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """safetensors file of contiguous CPU copies, with the usual file mode (safetensors makes 0600)."""
    path = Path(path)
    tmp = layout.tmp_name(path)
    try:
        save_tensors(tmp, tensors, metadata)
        os.chmod(tmp, 0o666 & ~_umask())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    publish_file(tmp, path)


def _umask() -> int:
    """The process umask, read without changing it (Linux exposes it in /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def publish_dir(tmp: Path, final: Path, replace: bool = False) -> None:
    """Move a finished temporary folder (a sibling of `final`) into place in one rename, its files fsynced
    first. With `replace` an existing `final` is an older version and is removed first (a checkpoint written
    again, the final SAE of a resumed run); without, another process published the same `final` meanwhile
    (a shared cache), so theirs is kept and ours removed."""
    for path in Path(tmp).rglob("*"):
        if path.is_file():
            fsync_file(path)
    if replace and Path(final).exists():
        shutil.rmtree(final)
    try:
        os.rename(tmp, final)
    except OSError:
        if replace or not Path(final).exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
