"""The neuron selector, documented once and accepted everywhere.

A selector is ``None`` or ``"all"`` (all neurons), an int, an iterable of ints, a ``slice``, or a
string such as ``"0,5,10-20"`` (ranges inclusive). Order is kept, duplicates dropped. (The report reads
``None`` as its sample, ``REPORT_NEURONS`` of each layer, and ``"all"`` as every neuron.)
"""

from __future__ import annotations

import numpy as np

from .errors import FdsubError

ALL = "all"  # the keyword of --neurons all and --layers all: every one


def means_all(selector) -> bool:
    """Whether ``selector`` (of neurons or layers) is the keyword ``all``, alone or as the one name of a list."""
    if isinstance(selector, (list, tuple)) and len(selector) == 1:
        selector = selector[0]
    return isinstance(selector, str) and selector.strip() == ALL


def parse_neurons(selector, channels: int, layer: str = "") -> np.ndarray:
    """The selected neuron indices as an int64 array, checked against ``channels``."""
    if selector is None or means_all(selector):
        return np.arange(channels, dtype=np.int64)
    if isinstance(selector, slice):
        picked = list(range(channels))[selector]
    elif isinstance(selector, (int, np.integer)):
        picked = [int(selector)]
    elif isinstance(selector, str):
        picked = _parse_spec(selector, channels, layer)
    else:
        picked = [_index(v, selector) for v in selector]
    picked = list(dict.fromkeys(picked))
    where = _where(layer)
    if not picked:
        raise FdsubError(f"no neurons selected; {where} has neurons 0-{channels - 1}")
    bad = [n for n in picked if not 0 <= n < channels]
    if bad:
        raise FdsubError(f"neuron {bad[0]} is out of range: {where} has {channels} neurons (0-{channels - 1})")
    return np.asarray(picked, dtype=np.int64)


def _where(layer: str) -> str:
    return f"layer {layer!r}" if layer else "the layer"


def _index(value, selector) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise FdsubError(f"neuron indices must be integers, got {value!r} in {selector!r}")
    return int(value)


def _parse_spec(spec: str, channels: int, layer: str) -> list[int]:
    """The indices of ``spec``; a range past the layer's neurons is refused before it is listed (0-10^12)."""
    picked = []
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        try:
            if "-" in part[1:]:
                cut = part.index("-", 1)
                lo, hi = int(part[:cut]), int(part[cut + 1 :])
                if hi < lo:
                    raise FdsubError(f"neuron range {part!r} runs backwards; write it low to high: {hi}-{lo}")
                if lo < 0 or hi >= channels:
                    bad = lo if lo < 0 else max(lo, channels)  # the first index of the range past the layer
                    raise FdsubError(f"neuron {bad} is out of range (in {part}): {_where(layer)} has {channels} "
                                     f"neurons (0-{channels - 1})")
                picked.extend(range(lo, hi + 1))
            else:
                picked.append(int(part))
        except ValueError:
            raise FdsubError(f"cannot read neuron selector {spec!r} at {part!r}; write it like 0,5,10-20 or all"
                             ) from None
    return picked
