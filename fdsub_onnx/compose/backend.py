"""Array backends and devices: NumPy on the CPU, CuPy on a CUDA GPU, method for method.

Arrays cross the host/device boundary only through ``asarray`` and ``to_numpy``. The op rules
and the engine are written once against these methods (einops' backend pattern); CuPy
is imported only when a GPU backend is asked for, so the CPU install never needs it.

A *device* ("cpu", "gpu" or "auto") picks both the array backend of the composition and the
onnxruntime execution providers of capture (``resolve_device``).
"""

from __future__ import annotations

import functools
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..defaults import memory_budget
from ..errors import FdsubError

DEVICES = ("cpu", "gpu", "auto")


class NumpyBackend:
    """CPU arrays through NumPy."""

    name = "numpy"
    xp = np
    temp_bytes = 256 << 20  # bound on one temporary of the composition kernels (cache-friendly on a CPU)
    piece_bytes = 1 << 20  # a small temporary made and used at once: in a core's cache

    @property
    def workers(self) -> int:
        """Independent passes to run at once (``ordered_map``): one per core this process may use."""
        return usable_cores()

    def asarray(self, array, dtype):
        return np.ascontiguousarray(array, dtype=dtype)

    def to_numpy(self, array) -> np.ndarray:
        return np.asarray(array)

    def zeros(self, shape, dtype):
        return np.zeros(shape, dtype=dtype)

    def empty(self, shape, dtype):
        return np.empty(shape, dtype=dtype)

    def copy(self, array):
        """A contiguous copy of ``array`` (a crop of a bank), its leading axis split over the cores: the copy is
        fresh memory, and its page faults and strided reads would otherwise run on one core."""
        out = np.empty(array.shape, array.dtype)
        self.on_cores(lambda a, b: np.copyto(out[a:b], array[a:b]), len(out), out.nbytes)
        return out

    def matmul(self, a, b, out=None):
        return np.matmul(a, b, out=out)

    def shift_add(self, out, products, offsets):
        """``out[:, :, y:y+R_y, x:x+R_x] += products[t]`` for each tap t at ``offsets[t] = (y, x)``.

        ``out`` [n, C, Q_y, Q_x] (a view is fine), ``products`` [T, n, C, R_y, R_x]: the substitution's
        shifted accumulation of one chunk of rows (its rows split over the cores).
        """
        ry, rx = products.shape[3:]

        def part(a, b):
            for block, (y, x) in zip(products, offsets):
                out[a:b, :, y : y + ry, x : x + rx] += block[a:b]

        self.on_cores(part, out.shape[0], products.size * products.itemsize)  # the work: every product added once

    def on_cores(self, part: Callable, total: int, nbytes: int) -> None:
        """``part(start, stop)`` over ``range(total)`` cut in one equal piece per core, the pieces at once: NumPy's
        copies and elementwise loops run on one core each (BLAS alone uses them all) and release the GIL. In
        one piece where the work writes under ``SPLIT_BYTES`` (``nbytes``: handing a piece to a thread costs
        more), where ``ordered_map`` already keeps the cores busy, and inside a piece (it would wait for its
        own thread)."""
        workers = min(total, self.workers)
        if (workers <= 1 or nbytes < SPLIT_BYTES or _PARALLEL.locked()
                or threading.current_thread().name.startswith(_PIECE)):
            part(0, total)
            return
        cut = [total * i // workers for i in range(workers + 1)]
        futures = [_pieces().submit(part, a, b) for a, b in zip(cut[1:-1], cut[2:])]
        try:
            part(cut[0], cut[1])
        finally:
            for future in futures:
                future.result()

    def free_bytes(self) -> int:
        """Memory a decode may still allocate: the memory budget (``defaults.memory_budget``)."""
        return memory_budget()


class CupyBackend(NumpyBackend):
    """CUDA arrays through CuPy: products through cuBLAS, the shifted accumulation in one fused kernel.

    ``fused=False`` accumulates tap by tap (one elementwise launch per tap), the NumPy way; the
    benchmark (benchmarks/bench_gpu.py) times both.
    """

    name = "cupy"
    workers = 1  # one GPU: its passes queue on one stream anyway

    def __init__(self, fused: bool = True):
        self.xp = _import_cupy()
        self.fused = fused

    @property
    def temp_bytes(self) -> int:
        """Chunks sized by the device memory left: an eighth of it, between 64 MiB and 2 GiB."""
        return int(min(2 << 30, max(64 << 20, self.free_bytes() // 8)))

    @property
    def piece_bytes(self) -> int:
        """As large as a chunk: a GPU has no cache to fit, and each piece is a launch."""
        return self.temp_bytes

    def asarray(self, array, dtype):
        return self.xp.ascontiguousarray(self.xp.asarray(array, dtype=dtype))

    def to_numpy(self, array) -> np.ndarray:
        return self.xp.asnumpy(array) if isinstance(array, self.xp.ndarray) else np.asarray(array)

    def zeros(self, shape, dtype):
        return self.xp.zeros(shape, dtype=dtype)

    def empty(self, shape, dtype):
        return self.xp.empty(shape, dtype=dtype)

    def copy(self, array):
        return self.xp.ascontiguousarray(array)

    def matmul(self, a, b, out=None):
        return self.xp.matmul(a, b, out=out)

    def shift_add(self, out, products, offsets):
        if not self.fused:
            return super().shift_add(out, products, offsets)
        taps, n, c, ry, rx = products.shape
        dy = self.xp.asarray([y for y, _ in offsets], dtype=np.int32)
        dx = self.xp.asarray([x for _, x in offsets], dtype=np.int32)
        _shift_add_kernel(self.xp)(self.xp.ascontiguousarray(products), dy, dx, taps, n * c, ry, rx,
                                   out.shape[2], out.shape[3], out)

    def on_cores(self, part: Callable, total: int, nbytes: int) -> None:
        """One piece: the GPU runs each launch over all its cores already."""
        part(0, total)

    def free_bytes(self) -> int:
        """Free device memory plus what CuPy's pool holds but does not use."""
        free, _ = self.xp.cuda.runtime.memGetInfo()
        pool = self.xp.get_default_memory_pool()
        return int(free + pool.free_bytes())


def _shift_add_kernel(cp):
    """One thread per output element gathers its taps: no atomics, each element read and written once."""
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = cp.ElementwiseKernel(
            "raw T products, raw int32 dy, raw int32 dx, int32 taps, int64 planes, int32 ry, int32 rx, "
            "int32 qy, int32 qx",
            "T out",
            """
            const long long plane = i / ((long long)qy * qx);
            const int rest = (int)(i % ((long long)qy * qx));
            const int Y = rest / qx, X = rest % qx;
            T acc = out;
            for (int t = 0; t < taps; ++t) {
                const int y = Y - dy[t], x = X - dx[t];
                if (y >= 0 && y < ry && x >= 0 && x < rx)
                    acc += products[((long long)t * planes + plane) * ry * rx + (long long)y * rx + x];
            }
            out = acc;
            """,
            "fdsub_shift_add",
        )
    return _KERNEL


_KERNEL = None

BACKENDS = {"numpy": NumpyBackend, "cupy": CupyBackend}


#: the role (``Workspace.take``) of a convolution's composition temporaries, kn2row's products and the spectral
#: route's spectra alike: a layer runs one route at a time, so one buffer serves both and a decode's peak holds the
#: larger, not the sum (VGG19: kn2row's 42 MB beside the spectra's 288 MB)
COMPOSITION = "composition"


class Workspace:
    """Scratch arrays reused by the substitution steps of one engine, by role (``take``).

    A fresh large array costs its page faults again: the kernel zeroes every page of it (2 MiB at a time under
    transparent huge pages), and allocating a composition's temporaries anew for each chunk of each layer made a
    VGG19 decode zero ~8 GB (a third of its time in the kernel). Per thread, so passes that run at once never share.
    """

    def __init__(self, backend):
        self.backend = backend
        self._local = threading.local()

    def take(self, role: str, shape, dtype, reserve: int = 0):
        """An uninitialized array of ``shape``, the same memory as the last one of ``role`` when it fits; made with at
        least ``reserve`` bytes where it is made anew, so that later, larger requests up to it fit (each layer's
        spectra a little larger than the last's made VGG19's conv5 layers fault in 1 GB of fresh pages each)."""
        buffers = self._local.__dict__.setdefault("buffers", {})
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        flat = buffers.get(role)
        if flat is None or flat.nbytes < size:
            buffers[role] = None  # the old one is freed before the larger one is made
            flat = buffers[role] = self.backend.empty((max(size, reserve),), np.uint8)
        return flat[:size].view(dtype).reshape(shape)

    @property
    def nbytes(self) -> int:
        """The bytes this thread's buffers hold."""
        return sum(flat.nbytes for flat in self._local.__dict__.get("buffers", {}).values() if flat is not None)


def equal_chunks(total: int, most: int) -> int:
    """The size of equal chunks of ``total`` of at most ``most`` each (14 of 16 gives 8 and 8, not 14 and 2)."""
    most = max(1, min(total, most))
    return -(-total // -(-total // most))


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the system has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def ordered_map(fn: Callable, jobs: Iterable, workers: int) -> Iterator:
    """``map(fn, jobs)`` with ``workers`` jobs at a time in threads, results in job order (so that sums over
    them add up in one order), jobs drawn from ``jobs`` only as results are taken (a job may hold a forward
    pass's values). NumPy's loops and BLAS release the GIL; each worker's BLAS runs one thread, the cores
    being the workers' (two passes of small GEMMs at once on 2 cores beat one pass with 2 BLAS threads).

    BLAS's thread count is process-wide, and threadpoolctl lets only one thread set it: a call that overlaps
    another, or that runs where another thread holds BLAS's setting, runs its jobs one by one instead."""
    if workers <= 1 or not _PARALLEL.acquire(blocking=False):
        yield from map(fn, jobs)
        return
    try:
        from threadpoolctl import threadpool_info, threadpool_limits

        with threadpool_limits(1, user_api="blas"):
            if any(pool["num_threads"] > 1 for pool in threadpool_info() if pool["user_api"] == "blas"):
                yield from map(fn, jobs)
                return
            pool, pending = ThreadPoolExecutor(workers), deque()
            try:
                for job in jobs:
                    pending.append(pool.submit(fn, job))
                    if len(pending) > workers:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:  # on an error, the jobs not started are dropped
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        _PARALLEL.release()


_PARALLEL = threading.Lock()  # held by the one ``ordered_map`` that runs in parallel


@functools.lru_cache(maxsize=1)
def _pieces() -> ThreadPoolExecutor:
    """The threads of ``on_cores`` (the calling thread runs one piece itself)."""
    return ThreadPoolExecutor(max(1, usable_cores() - 1), thread_name_prefix=_PIECE)


_PIECE = "fdsub-piece"
#: the least work ``on_cores`` splits over the cores (bytes written): below it, handing a piece to a thread and
#: waiting for it cost more than the piece (VGG19's conv2_1, [128, 3, 10, 10] filters: 4.6 ms in one piece, 12 ms
#: split)
SPLIT_BYTES = 4 << 20


def get_backend(name: str = "numpy"):
    """The backend called ``name`` (instances are cheap and stateless)."""
    if name not in BACKENDS:
        raise FdsubError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return BACKENDS[name]()


def array_module(array):
    """``numpy`` or ``cupy``, whichever holds ``array`` (cupy.get_array_module without importing CuPy)."""
    return _import_cupy() if type(array).__module__.startswith("cupy") else np


# ---- devices ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Device:
    """Where a run computes: ``backend`` composes the filters, ``providers`` run onnxruntime.

    ``notice`` says, in one line, why a GPU request ends up (partly) on the CPU; empty when it does not.
    """

    name: str  # "cpu" or "gpu"
    backend: str  # a BACKENDS key
    providers: tuple[str, ...]
    notice: str = ""


CPU = Device("cpu", "numpy", ("CPUExecutionProvider",))


def session(proto, providers=CPU.providers, threads: int | None = None, arena: bool = False):
    """An onnxruntime session of ONNX model ``proto``; ``arena``: onnxruntime's CPU memory arena (see
    ``runtime.session.ARENA_TENSORS``). Every session of the package is made here (``runtime.session.Forward``, the
    op rules that ask onnxruntime for an op's own numbers)."""
    ort = onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 4  # failures come back as one-line errors; a failed batched try is expected
    options.enable_cpu_mem_arena = arena
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    try:
        return ort.InferenceSession(proto.SerializeToString(), options, providers=list(providers))
    except Exception as exc:
        raise FdsubError(f"onnxruntime cannot run the model: {str(exc).splitlines()[0]}") from None


def resolve_device(device: str | Device = "cpu") -> Device:
    """``cpu``; ``gpu`` (an error when no GPU can be used); ``auto``: the GPU when CuPy sees one, else the CPU.

    On the GPU, capture runs on onnxruntime's CUDA provider when the installed onnxruntime has it,
    else on its CPU provider (said in ``notice``).
    """
    if isinstance(device, Device):
        return device
    if device not in DEVICES:
        raise FdsubError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "cpu":
        return CPU
    why_not = gpu_unavailable()
    if why_not:
        if device == "gpu":
            raise FdsubError(f"--device gpu: {why_not}; use --device cpu (or auto)")
        return Device("cpu", "numpy", CPU.providers, f"no GPU ({why_not}); running on the CPU")
    if "CUDAExecutionProvider" in _ort_providers():
        return Device("gpu", "cupy", ("CUDAExecutionProvider", "CPUExecutionProvider"))
    return Device("gpu", "cupy", CPU.providers,
                  "onnxruntime has no CUDA provider (pip install onnxruntime-gpu); capture runs on the CPU")


def gpu_unavailable() -> str:
    """Why CuPy cannot compute on a GPU here, or "" when it can."""
    try:
        cp = _import_cupy()
        count = cp.cuda.runtime.getDeviceCount()
    except FdsubError as exc:
        return str(exc)
    except Exception as exc:  # CUDA driver or runtime missing: CuPy raises its own error types
        return f"CUDA is not usable ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    return "" if count > 0 else "CUDA sees no GPU"


def _import_cupy():
    try:
        import cupy
    except ImportError:
        raise FdsubError("CuPy is not installed (pip install 'fdsub-onnx[gpu]')") from None
    return cupy


def _ort_providers() -> list[str]:
    return onnxruntime().get_available_providers()


def onnxruntime():
    """The onnxruntime module, imported when first needed (``inspect`` and ``decode`` in ``weights`` mode run
    without it); a one-line FdsubError naming the extra to install where it is missing."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise FdsubError("onnxruntime is not installed; pip install 'fdsub-onnx[cpu]' (or 'fdsub-onnx[gpu]' for "
                         "onnxruntime-gpu and CuPy)") from None
    return ort

