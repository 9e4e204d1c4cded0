"""Array backends: NumPy here; the GPU backend matches it method for method.

Arrays cross the host/device boundary only through ``asarray`` and ``to_numpy``.
"""

from __future__ import annotations

import numpy as np


class NumpyBackend:
    """CPU arrays through NumPy."""

    name = "numpy"
    xp = np

    def asarray(self, array, dtype):
        return np.ascontiguousarray(array, dtype=dtype)

    def to_numpy(self, array) -> np.ndarray:
        return np.asarray(array)

    def zeros(self, shape, dtype):
        return np.zeros(shape, dtype=dtype)

    def empty(self, shape, dtype):
        return np.empty(shape, dtype=dtype)

    def matmul(self, a, b, out=None):
        return np.matmul(a, b, out=out)

    def free_bytes(self) -> int:
        """Memory still available to allocate (MemAvailable on Linux)."""
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 8 << 30


BACKENDS = {"numpy": NumpyBackend}


def get_backend(name: str = "numpy"):
    """The backend called ``name`` (instances are cheap and stateless)."""
    from ._errors import FdsubError

    if name not in BACKENDS:
        raise FdsubError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return BACKENDS[name]()
