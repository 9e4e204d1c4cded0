"""Slice and Split: channel ranges (ShuffleNet's chunk, YOLO's C2f split) and strided spatial slices (Focus).

A channel range keeps those rows of the bank; a spatial range ``start:end:step`` keeps the grid positions
``start + q * step``, which changes only the geometry (``Geometry.sliced``): the filters stay the same.
"""

from __future__ import annotations

import numpy as np

from ...errors import NotDecodable
from ...graph.ranges import slice_ranges, split_ranges
from ..backend import array_module
from ..values import Tensor
from ._rule import OpRule, attributes, batched, constant, data, instances, known_shape, no_bias, optional


class Slice(OpRule):
    linear = True
    cone_values = "shapes"

    def apply(self, node, inputs, ctx):
        x = data(inputs[0])
        shape = known_shape(ctx, node.input[0])
        attrs = attributes(node)
        given = [None] * 4  # before opset 10 the range is in the attributes
        if "starts" not in attrs:
            given = [None if optional(inputs, i) is None else constant(inputs[i], what)
                     for i, what in ((1, "starts"), (2, "ends"), (3, "axes"), (4, "steps"))]
        return take_ranges(x, slice_ranges(attrs, *given, shape), shape, node.output[0], ctx)

    def backward(self, node, ins, is_data, out, grad):
        """The gradient placed back at the positions the slice kept (zeros elsewhere). Axis 0 is the instances'
        unless a pass carries one instance in its tensors' own shapes (the batch moved elsewhere: dynamo's
        attention slices q, k and v off axis 0 of ``[3, 1, h, T, d]``), where it is sliced as any other."""
        x, xp = ins[0], array_module(grad)
        ranges = slice_ranges(attributes(node), *(ins[1:5] + [None] * (5 - len(ins))), x.shape)
        own = instances(grad) == 1 and tuple(grad.shape) == tuple(out.shape)
        index = tuple(slice(*ranges.get(a, (0, n, 1))) if a or own else slice(None) for a, n in enumerate(x.shape))
        gx = xp.zeros(batched(x, grad), grad.dtype)
        gx[index] = grad
        return [gx] + [None] * (len(ins) - 1), no_bias(grad)


class Split(OpRule):
    linear = True
    multi_output = True
    cone_values = "shapes"

    def apply(self, node, inputs, ctx):
        x = data(inputs[0])
        shape = known_shape(ctx, node.input[0])
        split = optional(inputs, 1)
        axis, ranges = split_ranges(attributes(node), None if split is None else constant(split, "split sizes"),
                                    shape, len(node.output))
        return [take_ranges(x, {axis: (b, e, 1)}, shape, name, ctx) if name else None
                for (b, e), name in zip(ranges, node.output)]

    def backward(self, node, ins, is_data, out, grads):
        """The outputs' gradients side by side along the split axis."""
        x = ins[0]
        axis, _ = split_ranges(attributes(node), ins[1] if len(ins) > 1 else None, x.shape, len(node.output))
        return [array_module(grads[0]).concatenate(grads, axis=axis)] + [None] * (len(ins) - 1), no_bias(grads[0])


def take_ranges(x: Tensor, ranges: dict, shape, out_name: str, ctx) -> Tensor:
    """``x`` with axis ``a`` cut to ``range(*ranges[a])`` for each axis in ``ranges`` (batch untouched)."""
    rank = len(shape)
    for axis, (start, stop, step) in ranges.items():
        if step < 1:
            raise NotDecodable(f"it steps by {step} on axis {axis}; only forward steps are supported")
        if axis == 0 and (start, stop, step) != (0, shape[0], 1):
            raise NotDecodable("it slices the batch axis")
    value = x
    if 1 in ranges and ranges[1] != (0, shape[1], 1):
        if x.rows is not None:
            raise NotDecodable("it slices the channels of a decode target")
        channels = np.arange(*ranges[1])
        value = value.derive(bank=ctx.engine.take(value.bank, channels), channels=len(channels))
    spatial = [ranges.get(a, (0, shape[a], 1)) for a in (2, 3)] if rank == 4 else []
    if spatial and any(r != (0, shape[a], 1) for r, a in zip(spatial, (2, 3))):
        start, step = tuple(r[0] for r in spatial), tuple(r[2] for r in spatial)
        count = tuple(len(range(*r)) for r in spatial)
        value = value.derive(geom=value.geom.sliced(start, step, count, tuple(shape[2:4])))
    elif rank != 4 and any(a > 1 for a in ranges):
        raise NotDecodable(f"it slices axis {max(ranges)} of a rank-{rank} tensor")
    return value.derive(spatial=ctx.spatial(out_name))

