"""Past one machine: the data passes on a Dask cluster, merged exactly as one process would merge them.

The images are cut into contiguous blocks of whole batches, each batch beginning where it begins in one
process (onnxruntime sees the same inputs). Each block is one task returning its partial statistic; the
partials merge in a tree of tasks over contiguous ranges, by the statistic's own rule. Top-N under a total
order merges exactly in any grouping; float sums do not, so they travel as ``Ordered`` parts that add in image
order whatever the grouping: bit for bit the one-process result, whatever the workers, blocks or finishing order.

Workers open the model at its path (the same file: same size and content) once and keep the onnxruntime
session; the image set travels to every worker once (a folder as its file paths, which workers must read at
the same paths; an array as itself, a memory-mapped .npy as its path). Dask is imported only when a cluster is
asked for (``pip install 'fdsub-onnx[dask]'``).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from urllib.parse import urlparse

from ..compose.backend import usable_cores
from ..errors import FdsubError
from ..graph.model import Model, load_model
from .session import Forward

CLUSTER_HELP = "give local:N (N worker processes here) or tcp://HOST:PORT (a running `dask scheduler`)"
BLOCKS_PER_WORKER = 4  # blocks planned per worker thread: load balance, and little lost with a dead worker
MAX_BLOCK_BATCHES = 32  # at most this many batches per block (progress and checkpoints at block granularity)
FAN_IN = 8  # partials merged per task of the reduction tree
CHECKPOINT_SECONDS = 2.0  # as runtime.capture: at most this long between checkpoint writes
CONNECT_SECONDS = 10  # how long `tcp://` tries to reach the scheduler
WORKER_WAIT_SECONDS = 30  # and then waits for its first worker


# ---- connecting --------------------------------------------------------------------------------------------
def connect(spec: str):
    """A Dask ``Client`` for ``spec``: ``local:N`` starts N worker processes on this machine (closed with the client),
    ``tcp://HOST:PORT`` joins a running scheduler. Use it as a context manager:

    >>> with connect("local:2") as client:                                       # doctest: +SKIP
    ...     top = capture_top(model, "conv3", images, client=client)
    """
    distributed = _distributed()
    if spec.startswith("local:"):
        count = spec[len("local:"):]
        if not count.isdigit() or int(count) < 1:
            raise FdsubError(f"--cluster {spec}: N in local:N must be a positive integer, e.g. local:4")
        client = distributed.Client(n_workers=int(count), threads_per_worker=1, processes=True,
                                    dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR)
        client.register_plugin(_quiet_workers(distributed))  # also on the workers a nanny restarts
        return client
    if spec.startswith("tcp://"):
        try:
            client = distributed.Client(spec, timeout=CONNECT_SECONDS)
        except (OSError, TimeoutError) as exc:
            raise FdsubError(f"cannot reach the Dask scheduler at {spec} ({type(exc).__name__}); start one with "
                             "`dask scheduler` and workers with `dask worker " + spec + "`") from None
        try:
            client.wait_for_workers(1, timeout=WORKER_WAIT_SECONDS)
        except TimeoutError:
            client.close()
            raise FdsubError(f"the Dask scheduler at {spec} has no worker after {WORKER_WAIT_SECONDS} s; "
                             f"start some with `dask worker {spec}`") from None
        return client
    raise FdsubError(f"--cluster {spec!r} is not a cluster: {CLUSTER_HELP}")


def _distributed():
    try:
        import distributed
    except ImportError:
        raise FdsubError("a cluster needs Dask: pip install 'fdsub-onnx[dask]' (dask and distributed)") from None
    return distributed


def _quiet_workers(distributed):
    """A worker plugin ignoring SIGINT: a Ctrl-C in the terminal reaches local workers too, and must stop only the
    client, which then gathers the finished blocks for the checkpoint (a Ctrl-C while they start stops them all)."""

    class QuietWorkers(distributed.WorkerPlugin):
        name = "fdsub-quiet-workers"

        def setup(self, worker):
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, signal.SIG_IGN)

    return QuietWorkers()


def worker_threads(client) -> int:
    """How many tasks the cluster runs at once (its worker threads)."""
    return max(1, sum(w.get("nthreads", 1) for w in client.scheduler_info()["workers"].values()))


def _slots(client) -> dict[str, int]:
    """Worker threads per host: each task's onnxruntime session gets that host's cores divided by them."""
    slots: dict[str, int] = {}
    for address, info in client.scheduler_info()["workers"].items():
        host = urlparse(address).hostname
        slots[host] = slots.get(host, 0) + info.get("nthreads", 1)
    return slots


# ---- the model and its sessions on a worker --------------------------------------------------------------
@dataclass(frozen=True)
class ModelRef:
    """What a worker needs to open the model the client loaded: its file, input shape and content digest."""

    path: str
    input_shape: tuple[int, ...]
    size: int
    digest: str


def model_ref(model: Model) -> ModelRef:
    path = os.path.abspath(model.path)
    if not os.path.isfile(path):
        raise FdsubError(f"the model was not loaded from a file ({model.path!r}); cluster workers open the model "
                         "from its .onnx file: save it and load_model the file")
    stat = os.stat(path)
    return ModelRef(path, tuple(model.input_shape), stat.st_size, _digest(path, stat.st_size, stat.st_mtime_ns))


@lru_cache(maxsize=16)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    hasher = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            hasher.update(chunk)
    return hasher.hexdigest()


_MODELS: OrderedDict = OrderedDict()  # on a worker: ModelRef -> Model, the last few
_FORWARDS: OrderedDict = OrderedDict()  # on a worker: (ModelRef, names, device, threads) -> Forward
_CACHE_LOCK = threading.Lock()


def worker_model(ref: ModelRef) -> Model:
    """The model ``ref`` names, loaded once per worker process (checked to be the client's file)."""
    with _CACHE_LOCK:
        if ref in _MODELS:
            _MODELS.move_to_end(ref)
            return _MODELS[ref]
    if not os.path.isfile(ref.path):
        raise FdsubError(f"a worker has no model file {ref.path}: workers open the model at the same path as the "
                         "client; copy it there (or a shared folder)")
    stat = os.stat(ref.path)
    if stat.st_size != ref.size or _digest(ref.path, stat.st_size, stat.st_mtime_ns) != ref.digest:
        raise FdsubError(f"the model file {ref.path} on a worker differs from the client's; give every worker the "
                         "same file")
    model = load_model(ref.path, ref.input_shape)
    with _CACHE_LOCK:
        _MODELS[ref] = model
        while len(_MODELS) > 2:
            _MODELS.popitem(last=False)
    return model


def worker_forward(ref: ModelRef, model: Model, names, device, slots: dict[str, int]) -> Forward:
    """The onnxruntime session for ``names``, made once per worker process, sized to this host's share of cores."""
    threads = _threads(slots)
    key = (ref, tuple(names), device, threads)
    with _CACHE_LOCK:
        if key in _FORWARDS:
            _FORWARDS.move_to_end(key)
            return _FORWARDS[key]
    forward = Forward(model, list(names), device, threads)
    with _CACHE_LOCK:
        _FORWARDS[key] = forward
        while len(_FORWARDS) > 8:
            _FORWARDS.popitem(last=False)
    return forward


def _threads(slots: dict[str, int]) -> int:
    from distributed import get_worker

    return max(1, usable_cores() // max(1, slots.get(urlparse(get_worker().address).hostname, 1)))


# ---- plans and order-keeping sums ----------------------------------------------------------------------
def plan_blocks(start: int, stop: int, batch_size: int, workers: int) -> list[tuple[int, int]]:
    """Contiguous blocks ``[lo, hi)`` covering ``[start, stop)``, each a whole number of batches from ``start``:
    about BLOCKS_PER_WORKER per worker, at most MAX_BLOCK_BATCHES batches each."""
    count = stop - start
    if count <= 0:
        return []
    batches = -(-count // batch_size)
    per_block = min(MAX_BLOCK_BATCHES, max(1, -(-batches // (BLOCKS_PER_WORKER * max(1, workers)))))
    size = per_block * batch_size
    return [(lo, min(lo + size, stop)) for lo in range(start, stop, size)]


@dataclass
class Ordered:
    """Float sums whose rounding depends on their order, kept so that any split of the images adds up exactly as
    one pass in image order does.

    ``fold(total, entry) -> total`` adds one entry (it may change ``total`` in place). A part that starts at the
    first image folds as it goes (``total``); a later part cannot (what comes before it is not known yet) and
    keeps its entries, in order, in ``log`` until ``merge_ordered`` joins it to the part before.
    """

    fold: Callable
    total: object = None
    log: list = field(default_factory=list)

    def add(self, entry) -> None:
        if self.total is None:
            self.log.append(entry)
        else:
            self.total = self.fold(self.total, entry)


def merge_ordered(parts: list[Ordered]) -> Ordered:
    """Adjacent parts, in image order, as one (the inputs are left unchanged: a retried merge must see them intact)."""
    head = parts[0]
    out = Ordered(head.fold, copy.deepcopy(head.total), list(head.log))
    for part in parts[1:]:
        if part.total is not None:
            raise FdsubError("internal: only the first part of a merge may start at the first image")
        for entry in part.log:
            out.add(entry)
    return out


# ---- running blocks ------------------------------------------------------------------------------------
def map_blocks(client, fn, model: Model, images, names, device, start: int, stop: int, batch_size: int, merge,
               options: dict, progress=None, checkpoint=None):
    """``fn(model, images, forward, lo, hi, **options)`` on every block of ``[start, stop)``, merged by
    ``merge(parts)``; None when the range is empty.

    ``forward`` is the worker's session for ``names``. ``progress(done, total)`` counts images of finished
    blocks. ``checkpoint(part, stop)`` receives the merge of the finished blocks that follow ``start`` without a
    gap, at most every CHECKPOINT_SECONDS, when the run stops early (error, Ctrl-C) and at the end.
    """
    blocks = plan_blocks(start, stop, batch_size, worker_threads(client))
    if not blocks:
        return None
    ref, slots = model_ref(model), _slots(client)
    shared_images, shared_options = client.scatter([images, options], broadcast=True, hash=False)
    leaves = [client.submit(_block, fn, ref, shared_images, shared_options, tuple(names), device, slots, lo, hi,
                            pure=False) for lo, hi in blocks]
    return _Tree(client, leaves, blocks, merge, checkpoint).run(progress, stop - start)


def _block(fn, ref, images, options, names, device, slots, lo, hi):
    """One block, on a worker."""
    model = worker_model(ref)
    return fn(model, images, worker_forward(ref, model, names, device, slots), lo, hi, **options)


def _merged(merge, *parts):
    return merge(list(parts))


class _Tree:
    """The reduction tree over the blocks' futures: FAN_IN contiguous children per merge task, up to one root.

    The client keeps a future only as long as it may need it: for the checkpoint (the merge of the finished blocks
    from the start, taken from the largest finished nodes) or as the root.
    """

    def __init__(self, client, leaves, blocks, merge, checkpoint):
        self.client, self.merge, self.checkpoint = client, merge, checkpoint
        self.blocks = blocks
        self.levels = [list(leaves)]  # futures, None once released
        self.spans = [[(i, i + 1) for i in range(len(leaves))]]  # block ranges of each node
        while len(self.levels[-1]) > 1:
            below, spans = self.levels[-1], self.spans[-1]
            self.levels.append([client.submit(_merged, merge, *below[i : i + FAN_IN], pure=False)
                                for i in range(0, len(below), FAN_IN)])
            self.spans.append([(spans[i][0], spans[min(i + FAN_IN, len(spans)) - 1][1])
                               for i in range(0, len(spans), FAN_IN)])
        self.done = [[False] * len(level) for level in self.levels]
        self.where = {f.key: (depth, j) for depth, level in enumerate(self.levels) for j, f in enumerate(level)}
        self.prefix, self.prefix_blocks, self.saved_blocks = None, 0, 0

    def run(self, progress, total):
        distributed = _distributed()
        images, last_save, root = 0, time.monotonic(), self.levels[-1][0]
        finished = False
        if progress is not None:
            progress(0, total)
        try:
            for future in distributed.as_completed([f for level in self.levels for f in level]):
                depth, j = self.where[future.key]
                if future.status != "finished":
                    _raise_for(future, self.blocks[self.spans[depth][j][0]])
                self.done[depth][j] = True
                if depth == 0:
                    lo, hi = self.blocks[j]
                    images += hi - lo
                    if progress is not None:
                        progress(images, total)
                else:
                    self._release_children(depth, j)
                if future is root:
                    break
                if self.checkpoint is not None and time.monotonic() - last_save >= CHECKPOINT_SECONDS:
                    self._save()
                    last_save = time.monotonic()
            result = root.result()
            finished = True
        finally:
            if self.checkpoint is not None and not finished:
                self._save()
            self.client.cancel([f for level in self.levels for f in level if f is not None and not f.done()])
        if self.checkpoint is not None:
            self.checkpoint(result, self.blocks[-1][1])
        return result

    def _release_children(self, depth: int, j: int) -> None:
        """Drop the children of a finished node unless the checkpoint's prefix ends inside it."""
        start = self.spans[depth][j][0]
        if self.checkpoint is None or start >= self.prefix_blocks:
            for child in range(j * FAN_IN, min((j + 1) * FAN_IN, len(self.levels[depth - 1]))):
                self.levels[depth - 1][child] = None

    def _save(self) -> None:
        """Extend the prefix with the largest finished nodes that start where it ends; write it when it grew."""
        while self.prefix_blocks < len(self.blocks):
            node = next(((depth, self.prefix_blocks // FAN_IN**depth) for depth in reversed(range(len(self.levels)))
                         if self.prefix_blocks % FAN_IN**depth == 0
                         and self.done[depth][self.prefix_blocks // FAN_IN**depth]), None)
            if node is None:
                break
            depth, j = node
            future = self.levels[depth][j]
            if future is None:
                break
            value = future.result()
            self.prefix = value if self.prefix is None else self.merge([self.prefix, value])
            self.prefix_blocks = self.spans[depth][j][1]
            if depth < len(self.levels) - 1:
                self.levels[depth][j] = None
        if self.prefix_blocks > self.saved_blocks:
            self.checkpoint(self.prefix, self.blocks[self.prefix_blocks - 1][1])
            self.saved_blocks = self.prefix_blocks


def _raise_for(future, block) -> None:
    """A failed block's own error (an FdsubError stays one line); a worker that kept dying, named as such."""
    if type(future.exception()).__name__ == "KilledWorker":
        raise FdsubError(f"Dask workers kept dying on the block of images {block[0]} to {block[1] - 1}; "
                         "check their memory and logs") from None
    future.result()


def map_tasks(client, fn, items: list[tuple], shared: tuple = (), done=None) -> list:
    """``fn(*shared, *item)`` for each item on the cluster, results in the items' order (``shared`` goes to every
    worker once). ``done(index, result)`` is called as each finishes."""
    distributed = _distributed()
    common = client.scatter(list(shared), broadcast=True, hash=False) if shared else []
    futures = [client.submit(fn, *common, *item, pure=False) for item in items]
    index = {f.key: i for i, f in enumerate(futures)}
    results = [None] * len(futures)
    try:
        for future in distributed.as_completed(futures):
            i = index[future.key]
            if future.status != "finished":
                future.result()
            results[i] = future.result()
            if done is not None:
                done(i, results[i])
    finally:
        client.cancel([f for f in futures if not f.done()])
    return results
