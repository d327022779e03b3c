"""Reused host buffers, the CPU window's batches, and reading threads that run torch ops inline."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from sae_pipeline.data.serial import serial_torch_ops
from sae_pipeline.data.transfer import DeviceWindow, HostBuffers

CPU = torch.device("cpu")


def test_the_ring_hands_a_buffer_out_again_only_after_the_others():
    ring = HostBuffers(3, 4, torch.float32, CPU)
    first = [ring.take(5) for _ in range(3)]
    assert len({b.data_ptr() for b in first}) == 3  # three distinct buffers in a row
    again = ring.take(5)
    assert again.data_ptr() == first[0].data_ptr() and again.shape == (5, 4)
    assert ring.take(2).data_ptr() == first[1].data_ptr()  # a smaller window reuses the buffer too
    grown = ring.take(9)  # a larger one gets a buffer of its size in that slot
    assert grown.shape == (9, 4) and grown.data_ptr() not in {b.data_ptr() for b in first[1:]}
    assert ring.take(1).data_ptr() == first[0].data_ptr()


def test_a_buffer_is_handed_out_again_only_after_its_copies_landed():
    class Event:
        def __init__(self):
            self.waited = 0

        def synchronize(self):
            self.waited += 1

    ring = HostBuffers(2, 3, torch.float32, CPU)
    ring.take(4)
    event = Event()
    window = SimpleNamespace(ready=event)
    assert ring.sent(window) is window
    ring.take(4)  # the other buffer: nothing to wait for
    assert event.waited == 0
    ring.take(4)  # the first again: waits for its copies, once
    ring.take(4)
    ring.take(4)
    assert event.waited == 1


def test_cpu_batches_are_new_tensors_that_keep_their_values_when_the_buffer_is_read_into_again():
    ring = HostBuffers(1, 3, torch.float32, CPU)  # float32: no conversion that would copy anyway
    raw = ring.take(6)
    raw.copy_(torch.arange(18.0).view(6, 3))
    order = torch.tensor([4, 0, 5, 2, 1, 3])
    window = DeviceWindow.send(raw, order, CPU)
    a, b = window.rows(0, 4), window.rows(4, 2)
    want = torch.arange(18.0).view(6, 3)[order]
    assert a.dtype == torch.float32 and torch.equal(torch.cat([a, b]), want)
    ring.take(6).fill_(-1)  # the ring's only buffer, read into again
    assert torch.equal(torch.cat([a, b]), want)


def test_serial_torch_ops_is_per_thread_and_restores_the_count_even_on_errors():
    outside = torch.get_num_threads()
    seen, inside, leave = {}, threading.Event(), threading.Event()

    def worker():
        with serial_torch_ops():
            seen["worker"] = torch.get_num_threads()
            inside.set()
            leave.wait(10)
        seen["worker after"] = torch.get_num_threads()

    t = threading.Thread(target=worker)
    t.start()
    assert inside.wait(10)
    seen["main during"] = torch.get_num_threads()  # this thread (the training thread) keeps its count
    leave.set()
    t.join()
    assert seen == {"worker": 1, "main during": outside, "worker after": outside}
    with pytest.raises(RuntimeError, match="boom"), serial_torch_ops():
        raise RuntimeError("boom")
    assert torch.get_num_threads() == outside


def test_threads_leaving_in_any_order_restore_the_count_a_new_thread_starts_with():
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # a count a thread's first torch op copies, distinguishable from 1
    try:
        a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

        def a():
            with serial_torch_ops():
                a_in.set()
                b_in.wait(10)
            a_out.set()

        def b():  # starts (and does its first torch op) while `a` is inside: it copies 1 as its own count
            a_in.wait(10)
            with serial_torch_ops():
                b_in.set()
                a_out.wait(10)

        threads = [threading.Thread(target=f) for f in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        fresh = []
        t = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert fresh == [2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
