"""``ordered_map``: passes on every core, results in job order, BLAS held to one thread meanwhile; ``on_cores``:
elementwise work split over the cores."""

import threading
import time

import pytest
from threadpoolctl import threadpool_info

from fdsub_onnx.compose import backend as backend_module
from fdsub_onnx.compose.backend import SPLIT_BYTES, NumpyBackend, ordered_map


def _blas_threads() -> list[int]:
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


def test_results_come_in_job_order_when_later_jobs_finish_first():
    def slow_first(job):
        time.sleep(0.02 * (5 - job))
        return job * job

    assert list(ordered_map(slow_first, range(6), workers=3)) == [0, 1, 4, 9, 16, 25]


def test_jobs_are_drawn_only_as_results_are_taken():
    drawn = []

    def jobs():
        for job in range(20):
            drawn.append(job)
            yield job

    results = ordered_map(lambda job: job, jobs(), workers=2)
    for taken, _ in enumerate(results, start=1):
        assert len(drawn) <= taken + 2  # the workers' jobs and the one whose result is next


def test_an_error_in_a_job_reaches_the_caller_and_the_jobs_not_started_are_dropped():
    ran = []

    def fails_at_two(job):
        ran.append(job)
        if job == 2:
            raise ValueError("job 2")
        time.sleep(0.01)
        return job

    with pytest.raises(ValueError, match="job 2"):
        list(ordered_map(fails_at_two, range(50), workers=2))
    assert len(ran) < 10


def test_blas_runs_one_thread_inside_and_its_setting_comes_back_after():
    before = _blas_threads()
    if not before or max(before) < 2:
        pytest.skip("BLAS runs one thread here already")
    inside = list(ordered_map(lambda job: (_blas_threads(), threading.current_thread()), range(4), workers=2))
    assert all(threads == [1] * len(before) for threads, _ in inside)
    assert all(thread is not threading.current_thread() for _, thread in inside)
    assert _blas_threads() == before


def test_a_call_that_overlaps_a_parallel_one_runs_its_jobs_one_by_one():
    entered, leave = threading.Event(), threading.Event()

    def holds(job):
        entered.set()
        assert leave.wait(10)
        return job

    first = threading.Thread(target=lambda: list(ordered_map(holds, [0], workers=2)))
    first.start()
    assert entered.wait(10)
    try:
        threads = list(ordered_map(lambda job: threading.current_thread(), range(3), workers=2))
    finally:
        leave.set()
        first.join()
    assert threads == [threading.current_thread()] * 3


def test_a_missing_onnxruntime_names_the_extra_to_install(monkeypatch):
    """`pip install fdsub-onnx` without an extra has no onnxruntime: the first command that needs it says which
    extra to install, in one line (a ModuleNotFoundError reached the user as an internal error; issue 28)."""
    import sys

    import fdsub_onnx as fd
    from fdsub_onnx.compose.backend import onnxruntime

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(fd.FdsubError, match=r"onnxruntime is not installed; pip install 'fdsub-onnx\[cpu\]'"):
        onnxruntime()


def test_on_cores_covers_the_range_once_in_pieces_that_run_at_once(monkeypatch):
    monkeypatch.setattr(NumpyBackend, "workers", 2)
    pieces, threads, both = [], set(), threading.Barrier(2, timeout=5)

    def part(a, b):
        pieces.append((a, b))
        threads.add(threading.current_thread().name)
        both.wait()  # fails (times out) unless the two pieces run at the same time

    NumpyBackend().on_cores(part, 7, SPLIT_BYTES)
    assert sorted(pieces) == [(0, 3), (3, 7)] and len(threads) == 2


def test_on_cores_runs_small_work_in_one_piece(monkeypatch):
    """Handing a piece to a thread costs more than a small piece: VGG19's conv2_1 took 12 ms split, 4.6 in one."""
    monkeypatch.setattr(NumpyBackend, "workers", 2)
    monkeypatch.setattr(backend_module, "SPLIT_BYTES", 4 << 20)  # the conftest splits everything
    pieces, threads = [], set()

    def part(a, b):
        pieces.append((a, b))
        threads.add(threading.current_thread().name)

    NumpyBackend().on_cores(part, 7, (4 << 20) - 1)
    assert pieces == [(0, 7)] and threads == {threading.current_thread().name}


def test_on_cores_inside_a_piece_runs_in_one_piece_and_errors_reach_the_caller(monkeypatch):
    """A piece on the pool's thread that splits again would wait for that same thread: it runs inline."""
    monkeypatch.setattr(NumpyBackend, "workers", 2)
    backend, inner = NumpyBackend(), []

    def part(a, b):
        backend.on_cores(lambda c, d: inner.append((c, d)), 4, SPLIT_BYTES)

    done = threading.Event()
    worker = threading.Thread(target=lambda: (backend.on_cores(part, 2, SPLIT_BYTES), done.set()), daemon=True)
    worker.start()
    assert done.wait(10), "a nested on_cores deadlocked"
    assert sorted(inner).count((0, 4)) >= 1 and sum(d - c for c, d in inner) == 8

    def failing(a, b):
        if a:
            raise ValueError("piece failed")

    with pytest.raises(ValueError, match="piece failed"):
        backend.on_cores(failing, 4, SPLIT_BYTES)


def test_a_copy_is_written_over_the_cores(monkeypatch):
    """A crop's copy is fresh memory written over the cores: equal to its strided source, contiguous, its own."""
    import numpy as np

    monkeypatch.setattr(NumpyBackend, "workers", 2)
    pieces = []
    on_cores = NumpyBackend.on_cores

    def recorded(self, part, total, nbytes):
        pieces.append(total)
        on_cores(self, part, total, nbytes)

    monkeypatch.setattr(NumpyBackend, "on_cores", recorded)
    bank = np.arange(5 * 3 * 20 * 20, dtype=np.float32).reshape(5, 3, 20, 20)
    crop = bank[:, :, 4:15, 2:17]
    copied = NumpyBackend().copy(crop)
    assert np.array_equal(copied, crop) and copied.flags.c_contiguous and not np.shares_memory(copied, bank)
    assert pieces == [5]
