"""Pad (any mode): it moves the origin; interior neurons never read padded values.

A crop (negative pads) also narrows the geometry's bounds (see _geometry)."""

import numpy as np

from ...errors import NotDecodable
from ._rule import OpRule, attributes, constant, data, optional


class Pad(OpRule):
    def apply(self, node, inputs, ctx):
        x = data(inputs[0])
        attrs = attributes(node)
        pads = np.asarray(attrs["pads"] if "pads" in attrs else constant(inputs[1], "pads"), dtype=np.int64)
        rank = len(ctx.shape(node.input[0]))
        axes = optional(inputs, 3)
        axes = range(rank) if axes is None else [int(a) % rank for a in constant(axes, "axes")]
        begin, end = {}, {}
        for i, axis in enumerate(axes):
            begin[axis], end[axis] = int(pads[i]), int(pads[i + len(pads) // 2])
        if any(begin.get(a, 0) or end.get(a, 0) for a in (0, 1)):
            raise NotDecodable("it pads the batch or channel axis")
        if rank != 4:
            raise NotDecodable(f"it pads a rank-{rank} tensor")
        geom = x.geom.shifted((begin.get(2, 0), begin.get(3, 0)), (end.get(2, 0), end.get(3, 0)), x.spatial)
        return x.derive(geom=geom, spatial=ctx.spatial(node.output[0]))
