"""The C top-k (sae/native.py): torch.topk's own answer bit for bit, its build cache and its fallbacks."""

from __future__ import annotations

import logging
import shutil
import threading

import pytest
import torch

from sae_pipeline.sae import native

needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")


@pytest.fixture(autouse=True)
def fresh_library(monkeypatch, tmp_path_factory):
    """Every test builds into one session cache folder and starts with no library loaded."""
    monkeypatch.setenv("SAE_PIPELINE_CACHE", str(tmp_path_factory.getbasetemp() / "native-cache"))
    monkeypatch.delenv("SAE_PIPELINE_NATIVE", raising=False)
    monkeypatch.delenv("CC", raising=False)
    native.reset()
    yield
    native.reset()


def same(x: torch.Tensor, k: int, sorted: bool = False, fallback: bool = False) -> None:
    """native.topk == torch.topk: values bit for bit (NaN payloads, -0.0), indices exactly; unless `fallback`,
    the C code must have answered wherever it applies."""
    want = x.topk(k, dim=1, sorted=sorted)
    vals, idx = native.topk(x, k, sorted=sorted)
    if shutil.which("cc") and native.enabled() and native.supports(x, k) and not fallback:
        assert native._load() is not None  # the C code answered, not the fallback
    assert torch.equal(idx, want.indices)
    assert vals.dtype == want.values.dtype and vals.shape == want.values.shape
    if vals.dtype == torch.float32:
        assert torch.equal(vals.view(torch.int32), want.values.view(torch.int32))
    else:
        assert torch.equal(vals, want.values)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@needs_cc
def test_the_library_builds_and_is_used():
    x = torch.randn(8, 4608, generator=gen())
    assert native.supports(x, 32)
    assert native._load() is not None
    assert native._agrees_with_torch(native._load())  # the start-up probe against this torch


class Failing:
    def sae_topk_f32(self, *args):
        return -1


def test_a_torch_that_orders_otherwise_is_caught_at_load(monkeypatch):
    """The C code copies one torch kernel: a library that disagrees with this torch's topk is not used."""
    assert not native._agrees_with_torch(Failing())
    monkeypatch.setattr(native, "_agrees_with_torch", lambda lib: False)
    same(torch.randn(8, 4608, generator=gen(12)), 32, fallback=True)
    assert native._lib is False


@needs_cc
@pytest.mark.parametrize("sorted", [False, True])
@pytest.mark.parametrize(("n", "k"), [(4608, 32), (2048, 32), (18432, 32), (64, 1), (4608, 72), (4096, 64)])
def test_random_rows_equal_torch(n, k, sorted):
    same(torch.randn(257, n, generator=gen(n + k)), k, sorted)


@needs_cc
@pytest.mark.parametrize("sorted", [False, True])
@pytest.mark.parametrize("levels", [1, 2, 5, 40, 1000])
def test_ties_are_ordered_as_torch_orders_them(levels, sorted):
    """Integer values: ties inside the top k and at its boundary take the exact heap replay."""
    x = torch.randint(0, levels, (300, 2048), generator=gen(levels)).float()
    same(x, 32, sorted)
    same(x, 1, sorted)


@needs_cc
def test_ties_only_outside_the_top_k_and_signed_zeros():
    x = torch.randn(64, 4096, generator=gen(1))
    kth = x.topk(32, dim=1).values[:, 31]
    x[:20, 0], x[20:40, 100], x[40:, -1] = kth[:20], kth[20:40], kth[40:]  # a second copy of the k-th value
    x[:32, 200] = x.topk(33, dim=1).values[:32, 32]  # a copy of the (k+1)-th: no tie with the k-th
    same(x, 32)
    z = torch.zeros(16, 4096)
    z[:, ::3] = -0.0
    z[::2, 7] = 1.0
    same(z, 32)
    same(-torch.ones(4, 4096), 16)


@needs_cc
@pytest.mark.parametrize("sorted", [False, True])
def test_nan_and_inf_come_out_as_in_torch(sorted):
    x = torch.randn(200, 2048, generator=gen(2))
    r = torch.rand(x.shape, generator=gen(3))
    x[r < 0.004] = float("nan")
    x[(r > 0.5) & (r < 0.503)] = float("inf")
    x[(r > 0.6) & (r < 0.61)] = -float("inf")
    x[5] = float("nan")  # a row of NaN
    x[6] = -float("inf")
    x[7, :40] = float("nan")  # more NaN than k
    x[8, -1] = float("nan")  # NaN last, after the heap has filled
    same(x, 32, sorted)


def test_shapes_and_dtypes_outside_the_native_path_are_torch_topk():
    x = torch.randn(33, 256, generator=gen(4))
    assert not native.supports(x, 32)  # k * 64 > F: torch's nth_element path, not reproduced
    same(x, 32)
    same(x, 256)  # k = F
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        y = torch.randn(9, 4096, generator=gen(5)).to(dtype)
        assert not native.supports(y, 32)
        same(y, 32)
    w = torch.randn(3, 4096, requires_grad=True)
    assert not native.supports(w, 8)
    vals, _ = native.topk(w, 8)
    assert vals.requires_grad


@needs_cc
def test_non_contiguous_input():
    base = torch.randn(4096, 300, generator=gen(6))
    same(base.t(), 16)  # unit stride across rows: copied first
    wide = torch.randn(40, 9000, generator=gen(7))
    same(wide[:, 500:], 32)  # rows strided past their width
    same(wide[:, ::2], 32)  # non-unit stride along the row
    same(wide[::3], 32)


@needs_cc
def test_the_answer_does_not_depend_on_the_thread_count():
    x = torch.randn(101, 4608, generator=gen(8))
    old = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 3):
            torch.set_num_threads(t)
            outs.append(native.topk(x, 32))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(outs[0][1], outs[1][1]) and torch.equal(outs[0][0], outs[1][0])


class Refuse:
    """A stand-in library that fails the test if it is called."""

    def __getattr__(self, name):
        raise AssertionError(f"native library used: {name}")


def test_the_environment_turns_it_off(monkeypatch):
    monkeypatch.setenv("SAE_PIPELINE_NATIVE", "0")
    monkeypatch.setattr(native, "_lib", Refuse())
    assert not native.enabled()
    same(torch.randn(8, 4608, generator=gen(9)), 32)


def test_a_failed_build_falls_back_to_torch_and_logs_once(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("SAE_PIPELINE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "/bin/false")
    with caplog.at_level(logging.DEBUG, logger=native.__name__):
        for _ in range(3):
            same(torch.randn(8, 4608, generator=gen(10)), 32, fallback=True)
    assert native._lib is False
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]
    assert not list(tmp_path.rglob("*.so"))  # nothing half-built is left behind
    native.reset()
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    same(torch.randn(8, 4608, generator=gen(11)), 32, fallback=True)
    assert native._lib is False


@needs_cc
def test_the_cache_key_follows_source_compiler_and_flags(monkeypatch, tmp_path):
    cc = ["cc"]
    key = native.build_key(b"int f(void);", cc)
    assert key == native.build_key(b"int f(void);", cc)
    assert key != native.build_key(b"int g(void);", cc)
    assert key != native.build_key(b"int f(void);", cc, (*native.FLAGS, "-g"))
    if shutil.which("gcc"):
        assert key != native.build_key(b"int f(void);", ["gcc", "-m64"])
    # a changed native.c gets its own library; an unchanged one is not rebuilt
    first = native.build(tmp_path)
    mtime = first.stat().st_mtime_ns
    assert native.build(tmp_path) == first and first.stat().st_mtime_ns == mtime
    src = tmp_path / "native.c"
    src.write_text(native.SOURCE.read_text() + "\n/* changed */\n")
    monkeypatch.setattr(native, "SOURCE", src)
    second = native.build(tmp_path)
    assert second != first and second.exists() and first.exists()


@needs_cc
def test_concurrent_builds_leave_one_whole_library(tmp_path):
    paths, errors = [], []

    def build():
        try:
            paths.append(native.build(tmp_path))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(paths)) == 1
    assert [p.name for p in tmp_path.iterdir()] == [paths[0].name]  # no temporary files left
    import ctypes

    assert ctypes.CDLL(str(paths[0])).sae_topk_f32
