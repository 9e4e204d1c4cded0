"""Defaults and bounds shared by the library and the command line.

It imports nothing heavy, so `fdsub --help` shows these values without loading onnx. Sizes a user asks for
(images, instances, arrays) are checked here against the memory left *before* anything that size is made.
"""

from __future__ import annotations

from .errors import FdsubError

DEFAULT_TOP = 100  # instances per neuron: top, nf, decode's data modes, fidelity
REPORT_TOP = 16  # instances per neuron shown by the report
REPORT_LAYERS = 6  # report without --layers: this many layers, first to deepest (--layers all for every one)
REPORT_NEURONS = 16  # report without --neurons: the first this many of each layer (--neurons all for every one)
DEFAULT_BATCH = 32  # images per onnxruntime run
FIDELITY_MODES = ("weights", "fds", "local", "deconvnet", "nf")
SELECTS = ("all", "positive", "max", "topk:K")  # fds: which lower neurons substitute
WEIGHTINGS = ("gate", "activation")  # fds: each lower neuron weighted by its mean gate, or its mean activation
DEFAULT_SELECT = "all"  # fds unless told: README "Fidelity on a real network" (positive collapses; all does not)
DEFAULT_WEIGHTING = "gate"
#: the decodings in the order benchmarks/bench_fidelity.py ranks them on a real network (best first, README)
BENCHMARK_RANKING = ("local", "fds", "nf", "weights", "deconvnet")  # by mean two-choice, layers past the first
CHECK_IMAGES = "builtin:blobs:32"  # probe images of `fdsub check`
MAX_BUILTIN_IMAGES = 1_000_000  # builtin:KIND:COUNT; their names alone are ~100 MB there
FALLBACK_MEMORY = 8 << 30  # when the memory left cannot be read


def available_memory() -> int:
    """Bytes that can still be allocated (MemAvailable on Linux; 8 GiB where it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return FALLBACK_MEMORY


def require_memory(nbytes: float, what: str, fix: str) -> None:
    """A FdsubError saying ``what`` needs ``nbytes`` when that is more than the memory left."""
    free = available_memory()
    if nbytes > free:
        raise FdsubError(f"{what} needs about {_gib(nbytes)} but {_gib(free)} is free; {fix}")


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:,.1f} GiB" if nbytes < 2**70 else f"{nbytes:.1e} bytes"
