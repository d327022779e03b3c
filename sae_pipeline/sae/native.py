"""A C top-k for the K-sparse architectures: `topk(x_BF, k)` returns what `x_BF.topk(k, dim=1)` returns.

torch's CPU top-k copies every row into a vector of (value, index) pairs and heap-selects over it; `native.c`
finds the same answer without the copy: a vectorised lower bound, then only the few values above it (one core,
4096 rows, k=32: 65 -> 23 ms at F = 4608, 179 -> 54 ms at F = 18432). The result is bit-identical (values,
indices, tie and NaN order) wherever torch takes that path (float32, 2-D, k * 64 <= F); anywhere else, and
whenever the library cannot be had, `topk` simply calls torch.topk.

The library is compiled on first use with the system C compiler (`$CC`, else `cc`) into the cache folder
(`$SAE_PIPELINE_CACHE/native`, else ~/.cache/sae_pipeline/native), named by the sha256 of the source, the
compiler's version and the flags, so a changed source or compiler builds anew. The flags are portable (no
-march=native), so a cache folder shared between machines with different CPUs is safe. Two processes may
build at once: each writes a temporary file and renames it into place. No compiler, a failed build or
`SAE_PIPELINE_NATIVE=0` means torch.topk (logged once at debug level).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native.c")
FLAGS = ("-O3", "-shared", "-fPIC", "-pthread", "-std=c99")
_lib: ctypes.CDLL | None | bool = None  # None: not tried yet; False: unavailable


def enabled() -> bool:
    """False when the environment says SAE_PIPELINE_NATIVE=0."""
    return os.environ.get("SAE_PIPELINE_NATIVE", "1").strip() != "0"


def cache_dir() -> Path:
    root = os.environ.get("SAE_PIPELINE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "sae_pipeline") / "native"


def _compiler() -> list[str]:
    return (os.environ.get("CC") or "cc").split()


def build_key(source: bytes, compiler: list[str], flags: tuple[str, ...] = FLAGS) -> str:
    """sha256 over what the built library depends on: source, the compiler's own version text, the flags."""
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=60, check=True)
    h = hashlib.sha256()
    for part in (source, version.stdout.encode(), " ".join(compiler).encode(), " ".join(flags).encode()):
        h.update(len(part).to_bytes(8, "little") + part)
    return h.hexdigest()


def build(folder: Path | None = None) -> Path:
    """Path of the compiled library for this source and compiler, building it if it is not cached."""
    source = SOURCE.read_bytes()
    compiler = _compiler()
    folder = folder or cache_dir()
    target = folder / f"topk-{build_key(source, compiler)[:32]}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".build-", suffix=".so")
    os.close(fd)
    try:
        with tempfile.TemporaryDirectory() as work:  # the compiler reads a copy, as hashed
            src = Path(work) / "native.c"
            src.write_bytes(source)
            cmd = [*compiler, *FLAGS, str(src), "-o", tmp, "-lm"]
            subprocess.run(cmd, capture_output=True, timeout=300, check=True)
        os.replace(tmp, target)  # atomic: another process sees no file or a whole one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load() -> ctypes.CDLL | None:
    global _lib
    if _lib is None:
        try:
            if shutil.which(_compiler()[0]) is None:
                raise FileNotFoundError(f"no C compiler {_compiler()[0]!r}")
            lib = ctypes.CDLL(str(build()))
            fn = lib.sae_topk_f32
            i64, ptr = ctypes.c_int64, ctypes.c_void_p
            fn.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, ctypes.c_int]
            fn.restype = ctypes.c_int
            if not _agrees_with_torch(lib):
                raise RuntimeError(f"torch {torch.__version__} orders top-k ties differently")
            _lib = lib
        except Exception as e:  # any failure to build or load means torch.topk
            log.debug("native top-k unavailable, using torch.topk: %s", e)
            _lib = False
    return _lib or None


def _agrees_with_torch(lib: ctypes.CDLL) -> bool:
    """The C code reproduces one torch kernel (its std::partial_sort path); a torch that changes it is caught
    here, on a probe with ties, signed zeros, NaN and inf, sorted and unsorted, and then torch.topk is used."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-3, 4, (48, 2048), generator=g).float()
    x[:16] = torch.randn(16, 2048, generator=g)
    x[40:44, ::7] = -0.0
    x[44:, ::97] = float("nan")
    x[44:, 5::89] = float("inf")
    for k in (1, 32):
        vals, idx = torch.empty(48, k), torch.empty(48, k, dtype=torch.int64)
        if lib.sae_topk_f32(x.data_ptr(), 48, 2048, 2048, k, vals.data_ptr(), idx.data_ptr(), 1) != 0:
            return False
        for sorted in (False, True):
            want = x.topk(k, dim=1, sorted=sorted)
            same_vals = torch.equal(vals.view(torch.int32), want.values.view(torch.int32))
            if not (same_vals and torch.equal(idx, want.indices)):
                return False
    return True


def reset() -> None:
    """Forget the loaded library (tests: a changed CC or cache folder is tried anew)."""
    global _lib
    _lib = None


def supports(x_BF: Tensor, k: int) -> bool:
    """Whether the native kernel gives torch.topk's own answer here (its partial-sort path, float32 CPU)."""
    return (
        x_BF.dim() == 2
        and x_BF.dtype == torch.float32
        and x_BF.device.type == "cpu"
        and not (x_BF.requires_grad and torch.is_grad_enabled())
        and x_BF.shape[0] > 0
        and 1 <= k
        and k * 64 <= x_BF.shape[1]
    )


def topk(x_BF: Tensor, k: int, sorted: bool = True) -> tuple[Tensor, Tensor]:
    """(values_BK, indices_BK) exactly as `x_BF.topk(k, dim=1, sorted=sorted)` gives them (largest first)."""
    lib = _load() if enabled() and supports(x_BF, k) else None
    if lib is None:
        out = x_BF.topk(k, dim=1, sorted=sorted)
        return out.values, out.indices
    if x_BF.stride(1) != 1 or x_BF.stride(0) < x_BF.shape[1]:
        x_BF = x_BF.contiguous()
    rows, n = x_BF.shape
    vals_BK = torch.empty(rows, k, dtype=x_BF.dtype)
    idx_BK = torch.empty(rows, k, dtype=torch.int64)
    ptrs = (x_BF.data_ptr(), rows, x_BF.stride(0), n, k, vals_BK.data_ptr(), idx_BK.data_ptr())
    status = lib.sae_topk_f32(*ptrs, torch.get_num_threads())
    if status != 0:
        out = x_BF.topk(k, dim=1, sorted=sorted)
        return out.values, out.indices
    return vals_BK, idx_BK
