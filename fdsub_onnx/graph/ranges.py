"""Index ranges of Slice and Split, read once from a node (its attributes or constant inputs) for every rule."""

from __future__ import annotations

import numpy as np

from ..errors import NotDecodable

_INT_MAX = np.iinfo(np.int64).max


def slice_ranges(attrs: dict, starts, ends, axes, steps, shape) -> dict[int, tuple[int, int, int]]:
    """Axis -> (start, stop, step) of a Slice on a tensor of ``shape``, clamped as ONNX does.

    ``starts`` ... ``steps`` are the node's constant inputs (None when absent); before opset 10 they are
    attributes. ``x[..., 1::2]`` on a width of 8 gives {3: (1, 8, 2)}.
    """
    if "starts" in attrs:
        starts, ends, axes, steps = attrs["starts"], attrs["ends"], attrs.get("axes"), None
    starts, ends = np.asarray(starts).reshape(-1), np.asarray(ends).reshape(-1)
    rank = len(shape)
    axes = range(len(starts)) if axes is None else [int(a) % rank for a in np.asarray(axes).reshape(-1)]
    steps = [1] * len(starts) if steps is None else np.asarray(steps).reshape(-1).tolist()
    return {a: _clamped(int(b), int(e), int(s), int(shape[a])) for a, b, e, s in zip(axes, starts, ends, steps)}


def split_ranges(attrs: dict, split, shape, outputs: int) -> tuple[int, list[tuple[int, int]]]:
    """(axis, [(start, stop) of each output]) of a Split on a tensor of ``shape`` into ``outputs`` parts."""
    axis = int(attrs.get("axis", 0)) % len(shape)
    sizes = attrs.get("split", split)
    if sizes is None:  # equal parts (the last one smaller when the count does not divide the axis)
        part = -(-int(shape[axis]) // outputs)
        sizes = [min(part, int(shape[axis]) - i * part) for i in range(outputs)]
    sizes = [int(v) for v in np.asarray(sizes).reshape(-1)]
    if len(sizes) != outputs or sum(sizes) != shape[axis] or min(sizes) < 0:
        raise NotDecodable(f"split sizes {sizes} do not cut axis {axis} of size {shape[axis]} into {outputs} outputs")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
    return axis, [(int(b), int(b) + n) for b, n in zip(starts, sizes)]


def _clamped(start: int, end: int, step: int, size: int) -> tuple[int, int, int]:
    """ONNX's clamping of a Slice range (negative indices count from the end; INT_MAX means the end)."""
    if step < 1:
        return start, end, step
    start = start + size if start < 0 else start
    end = size if end >= _INT_MAX // 2 else (end + size if end < 0 else end)
    return min(max(start, 0), size), min(max(end, 0), size), step


def reduce_axes(attrs: dict, axes, rank: int) -> set[int]:
    """The axes a Reduce* node reduces (attribute before opset 18, else its constant input; none: all axes)."""
    axes = attrs.get("axes", axes)
    if axes is None or np.size(axes) == 0:
        if attrs.get("noop_with_empty_axes", 0):
            return set()
        return set(range(rank))
    return {int(a) % rank for a in np.asarray(axes).reshape(-1)}
