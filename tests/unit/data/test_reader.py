"""The shuffled streaming reader: determinism, coverage, held-out validation, exact resume."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from sae_pipeline.data.reader import ShuffledReader
from sae_pipeline.data.store import ActivationStore
from sae_pipeline.errors import UserError
from tests.helpers import make_store


def row_ids(x_BD: torch.Tensor) -> list[int]:
    return x_BD[:, 0].round().long().tolist()


def read_all(reader: ShuffledReader, n_batches: int) -> list[int]:
    out = []
    for _ in range(n_batches):
        out += row_ids(reader.next_batch())
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ActivationStore:
    return ActivationStore(make_store(tmp_path_factory.mktemp("store") / "s"))


def test_deterministic_and_seed_dependent(store):
    kw = dict(batch_size=40, val_tokens=50, buffer_rows=96, chunk_rows=32)
    with ShuffledReader(store, seed=1, **kw) as a, ShuffledReader(store, seed=1, **kw) as b:
        first = read_all(a, 30)
        assert first == read_all(b, 30)
    with ShuffledReader(store, seed=2, **kw) as c:
        assert read_all(c, 30) != first


@pytest.mark.parametrize("prefetch", [1, 3])
def test_each_training_row_exactly_once_per_pass_and_validation_held_out(store, prefetch):
    reader = ShuffledReader(
        store, batch_size=25, seed=0, val_tokens=40, buffer_rows=64, chunk_rows=16, prefetch=prefetch
    )
    val = set(row_ids(reader.validation_rows()))
    assert len(val) == reader.n_validation_rows >= 40
    # validation = whole contexts (16 rows each) of the last shard
    assert len(val) % 16 == 0 and min(val) >= 32 * 16
    n = reader.epoch_rows
    assert n + len(val) == store.n_rows
    ids = read_all(reader, (3 * n) // 25 + 1)
    reader.close()
    for p in range(3):
        one_pass = ids[p * n : (p + 1) * n]
        assert sorted(one_pass) == sorted(set(range(store.n_rows)) - val)
    assert ids[:n] != ids[n : 2 * n]  # a new order each pass
    assert reader.epoch == 3


def test_state_round_trip_reproduces_the_stream(store):
    kw = dict(batch_size=24, seed=5, val_tokens=20, buffer_rows=80, chunk_rows=20)
    full = ShuffledReader(store, **kw)
    expected = read_all(full, 70)  # spans several passes
    full.close()
    for cut in (0, 1, 13, 31, 44):
        a = ShuffledReader(store, **kw)
        read_all(a, cut)
        state = a.state()
        a.close()
        b = ShuffledReader(store, state=dict(state), **kw)
        assert read_all(b, 70 - cut) == expected[cut * 24 :], cut
        b.close()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_store_becomes_float32(tmp_path, dtype):
    st = ActivationStore(make_store(tmp_path / "s", n_contexts=4, contexts_per_shard=2, dtype=dtype))
    with ShuffledReader(st, batch_size=16, seed=0) as reader:
        x = reader.next_batch()
    assert x.dtype == torch.float32 and x.shape == (16, 8)


def test_sample_does_not_move_the_stream(store):
    kw = dict(batch_size=16, seed=3, buffer_rows=64, chunk_rows=16)
    with ShuffledReader(store, **kw) as a, ShuffledReader(store, **kw) as b:
        s = a.sample(100)
        assert s.shape == (100, 8)
        assert read_all(a, 5) == read_all(b, 5)
        assert row_ids(s)[:80] == read_all(ShuffledReader(store, **kw), 5)


def test_truncated_shard_is_named(tmp_path):
    folder = make_store(tmp_path / "s", n_contexts=8, contexts_per_shard=4)
    st = ActivationStore(folder)
    shard = st.shards[1].path
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 300])
    with pytest.raises(UserError, match="shard-00001"):
        ShuffledReader(st, batch_size=8)


def test_error_in_reader_thread_surfaces_as_user_error(tmp_path):
    folder = make_store(tmp_path / "s", n_contexts=8, contexts_per_shard=4)
    st = ActivationStore(folder)
    reader = ShuffledReader(st, batch_size=8, seed=0, buffer_rows=16, chunk_rows=16)
    for shard in st.shards:  # truncate after the reader opened the store
        shard.path.write_bytes(shard.path.read_bytes()[:200])
    with pytest.raises(UserError, match=r"shard-0000\d"):
        read_all(reader, 10)
    reader.close()


def expected_order(
    store: ActivationStore, seed: int, epoch: int, buffer_rows: int, chunk_rows: int, val: set
):
    """Row ids of one pass as the module docstring defines it, recomputed from the store's row ids."""
    from sae_pipeline.data.reader import _rng

    chunks = []  # (row ids of the chunk's training rows) per chunk, in store order
    for shard in store.shards:
        ids = (
            ShuffledReader(store, 1)
            ._acts[shard.index]
            .read_rows(0, shard.n_rows)[:, 0]
            .round()
            .long()
            .tolist()
        )
        for start in range(0, shard.n_rows, chunk_rows):
            kept = [i for i in ids[start : start + chunk_rows] if i not in val]
            if kept:
                chunks.append(kept)
    order = torch.randperm(len(chunks), generator=_rng(seed, epoch)).tolist()
    per = max(1, round(buffer_rows / chunk_rows))
    out = []
    for w, k in enumerate(range(0, len(order), per)):
        rows = [i for c in order[k : k + per] for i in chunks[c]]
        out += [rows[j] for j in torch.randperm(len(rows), generator=_rng(seed, epoch, w + 1)).tolist()]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batches_follow_the_documented_order_at_any_thread_count(tmp_path, dtype):
    # ids up to 256 are exact in bfloat16, so rows stay tellable apart in a bf16 store
    st = ActivationStore(make_store(tmp_path / "s", n_contexts=16, contexts_per_shard=6, dtype=dtype))
    kw = dict(batch_size=20, seed=7, val_tokens=20, buffer_rows=48, chunk_rows=16)
    with ShuffledReader(st, read_threads=1, **kw) as a, ShuffledReader(st, read_threads=3, **kw) as b:
        val = set(row_ids(a.validation_rows()))
        want = expected_order(st, 7, 0, 48, 16, val) + expected_order(st, 7, 1, 48, 16, val)
        n = len(want) // 20
        assert read_all(a, n) == want[: n * 20]
        assert read_all(b, n) == want[: n * 20]


def test_windows_cross_in_the_store_dtype_and_gather_alike_on_every_path(tmp_path):
    from sae_pipeline.data.transfer import DeviceWindow

    st = ActivationStore(make_store(tmp_path / "s", n_contexts=8, contexts_per_shard=4, dtype=torch.bfloat16))
    reader = ShuffledReader(st, batch_size=8, seed=0, val_tokens=16, buffer_rows=64, chunk_rows=32)
    chunks = reader._windows(0)[-1]
    raw, order = reader._window_order(0, len(reader._windows(0)) - 1, chunks)
    assert raw.dtype == torch.bfloat16  # not converted on the host
    assert len(order) < raw.shape[0]  # the validation rows of the last shard are left out by the order
    direct = DeviceWindow(raw, order)  # as the CUDA path holds it once copied (its arithmetic, on the CPU)
    sent = DeviceWindow.send(raw, order, torch.device("cpu"))  # the CPU path
    for offset, take in [(0, 5), (5, len(order) - 5)]:
        a, b = direct.rows(offset, take), sent.rows(offset, take)
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)
    assert torch.equal(sent.rows(0, len(order)), raw.float()[order])


@pytest.mark.parametrize("prefetch", [1, 2])
def test_a_window_in_use_is_never_read_into_and_held_batches_keep_their_values(store, prefetch):
    # windows of 32 rows served in batches of 16: before each batch the reader thread has time to run as far
    # ahead as it may (`prefetch` windows queued and one more read into its ring), so a buffer handed out
    # again too early would change rows still to be served, and a batch aliasing a buffer would change later
    kw = dict(batch_size=16, seed=3, val_tokens=40, buffer_rows=32, chunk_rows=32, prefetch=prefetch)
    with ShuffledReader(store, **kw) as reader:
        val = set(row_ids(reader.validation_rows()))
        want = expected_order(store, 3, 0, 32, 32, val)
        held = []
        for _ in range(len(want) // 16):
            held.append(reader.next_batch())
            deadline = time.monotonic() + 2
            while not reader._queue.full() and time.monotonic() < deadline:
                time.sleep(0.002)
            time.sleep(0.02)  # the next window is read into the ring while the queue is full
        assert [i for x in held for i in row_ids(x)] == want[: len(held) * 16]


def test_reading_threads_run_torch_ops_on_themselves_and_leave_the_count_as_it_was(store, monkeypatch):
    seen = set()
    read_into, window_order = ShuffledReader._read_into, ShuffledReader._window_order

    def spy_read(self, *args):
        seen.add(("read", torch.get_num_threads()))
        return read_into(self, *args)

    def spy_order(self, *args):
        seen.add(("order", torch.get_num_threads()))
        return window_order(self, *args)

    monkeypatch.setattr(ShuffledReader, "_read_into", spy_read)
    monkeypatch.setattr(ShuffledReader, "_window_order", spy_order)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the training thread's count, told apart from the reading threads' 1
    try:
        with ShuffledReader(store, batch_size=64, buffer_rows=64, chunk_rows=16, read_threads=2) as reader:
            # reading threads whose torch count was set before the reader's thread started: 2 of their own
            reader._pool, both = ThreadPoolExecutor(2), threading.Barrier(2)
            assert list(reader._pool.map(lambda _: (both.wait(5), torch.get_num_threads())[1], [0, 1])) == [
                2,
                2,
            ]
            for _ in range(4):
                reader.next_batch()
                assert torch.get_num_threads() == 2
        assert seen == {("read", 1), ("order", 1)}
    finally:
        torch.set_num_threads(before)
