"""Defaults and bounds shared by the library and the command line.

It imports nothing heavy, so `fdsub --help` shows these values without loading onnx. Sizes a user asks for
(images, instances, arrays) are checked here against the memory left *before* anything that size is made.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import re

from .errors import FdsubError

DEFAULT_TOP = 100  # instances per neuron: top, nf, decode's data modes, fidelity
DEFAULT_DIFF_TOP = 9  # top-N images per neuron a diff compares (its top_overlap)
REPORT_TOP = 16  # instances per neuron shown by the report
DEFAULT_GRID = 64  # cells of a filters.png: the first neurons decoded (decoded.npz holds them all)
REPORT_LAYERS = 6  # report without --layers: this many layers, first to deepest (--layers all for every one)
REPORT_NEURONS = 16  # report without --neurons: the first this many of each layer (--neurons all for every one)
REPORT_FIDELITY_IMAGES = 200  # report: fidelity scored on this many images of its set, evenly spaced (or all)
DEFAULT_BATCH = 32  # images per onnxruntime run
FIDELITY_MODES = ("weights", "fds", "local", "deconvnet", "nf")
SELECTS = ("all", "positive", "max", "topk:K")  # fds: which lower neurons substitute
WEIGHTINGS = ("gate", "activation")  # fds: each lower neuron weighted by its mean gate, or its mean activation
#: fds unless told: benchmarks/README.md, "Fidelity on a real network" (positive collapses; all does not)
DEFAULT_SELECT = "all"
DEFAULT_WEIGHTING = "gate"
#: the decodings in the order benchmarks/bench_fidelity.py ranks them on a real network (best first; its README)
BENCHMARK_RANKING = ("local", "fds", "nf", "weights", "deconvnet")  # by mean two-choice, layers past the first
CHECK_IMAGES = "builtin:blobs:32"  # probe images of `fdsub check`
MAX_BUILTIN_IMAGES = 1_000_000  # builtin:KIND:COUNT; their names alone are ~100 MB there
FALLBACK_MEMORY = 8 << 30  # when the memory left cannot be read
BUDGET_CAP = 4 << 30  # the default memory budget: at most this much ...
BUDGET_SHARE = 0.6  # ... and at most this share of the memory available when it is asked
_BUDGET: contextvars.ContextVar[int | None] = contextvars.ContextVar("memory_budget", default=None)


def available_memory() -> int:
    """Bytes that can still be allocated (MemAvailable on Linux; 8 GiB where it cannot be read)."""
    return _meminfo("MemAvailable:")


def total_memory() -> int | None:
    """The machine's memory (MemTotal on Linux; None where it cannot be read)."""
    total = _meminfo("MemTotal:", None)
    return None if total is None else int(total)


def _meminfo(field: str, fallback=FALLBACK_MEMORY):
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return fallback


def memory_budget() -> int:
    """Bytes a command may use: the budget set by ``budget`` (``--memory-budget``), else the smaller of
    BUDGET_CAP and BUDGET_SHARE of the memory available now (not the machine's total: other processes count)."""
    given = _BUDGET.get()
    if given is not None:
        return given
    return int(min(BUDGET_CAP, BUDGET_SHARE * available_memory()))


@contextlib.contextmanager
def budget(nbytes: int | str | None):
    """Within the block, ``memory_budget()`` is ``nbytes`` (bytes, or text such as "6G"; None keeps the default).

    >>> with budget("2G"):                                 # doctest: +SKIP
    ...     fd.decode(model, "conv4", mode="fds", images=photos)
    """
    nbytes = None if nbytes is None else parse_bytes(nbytes)
    total = total_memory()
    if nbytes is not None and total is not None and nbytes > total:  # the system would kill it, not refuse it
        raise FdsubError(f"--memory-budget {_gib(nbytes)} is more than this machine's {_gib(total)} of memory; give "
                         f"at most {total >> 30}G")
    token = _BUDGET.set(nbytes)
    try:
        yield
    finally:
        _BUDGET.reset(token)


_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "MIB": 1 << 20,
          "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30, "T": 1 << 40, "TB": 1 << 40, "TIB": 1 << 40}


def parse_bytes(text: int | str) -> int:
    """``4G``, ``512M``, ``2.5GiB`` or a number of bytes (units are powers of 1024) -> bytes."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else None
    if unit not in _UNITS:
        raise FdsubError(f"--memory-budget must be a size such as 4G, 512M or 2.5GiB; got {str(text)!r}")
    nbytes = float(match.group(1)) * _UNITS[unit]
    if not 1 << 20 <= nbytes < 1 << 60:
        raise FdsubError(f"--memory-budget must be at least 1M and less than 1 EiB; got {str(text)!r}")
    return int(nbytes)


def budget_text() -> str:
    """How the budget in force was set, for refusals: the knob that changes it is named."""
    if _BUDGET.get() is not None:
        return f"the memory budget of {_gib(memory_budget())} (--memory-budget)"
    return (f"the memory budget of {_gib(memory_budget())} (the smaller of {_gib(BUDGET_CAP)} and "
            f"{BUDGET_SHARE:.0%} of the {_gib(available_memory())} available; --memory-budget to change)")


def require_memory(nbytes: float, what: str, fix: str) -> None:
    """A FdsubError saying ``what`` needs ``nbytes`` when that is more than the memory budget."""
    if nbytes > memory_budget():
        raise FdsubError(f"{what} needs about {_gib(nbytes)}, over {budget_text()}; {fix}")


def _gib(nbytes: float) -> str:
    if nbytes < 2**30:
        return f"{nbytes / 2**20:,.0f} MiB"
    return f"{nbytes / 2**30:,.1f} GiB" if nbytes < 2**70 else f"{nbytes:.1e} bytes"


#: How results draw themselves in a notebook (``_repr_html_``): class name -> function returning HTML. The parts
#: below ``present`` hold arrays and cannot import the drawing, so ``present/notebook.py`` registers its views here
#: and is imported on the first display, the way the package's exports load on first use.
HTML_VIEWS: dict = {}
NOTEBOOK_VIEWS = "fdsub_onnx.present.notebook"


def html_view(result) -> str | None:
    """``result``'s notebook view (None where there is none: the notebook shows its repr)."""
    if not HTML_VIEWS:
        importlib.import_module(NOTEBOOK_VIEWS)
    view = HTML_VIEWS.get(type(result).__name__)
    return None if view is None else view(result)
