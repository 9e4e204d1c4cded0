"""Pad (any mode): it moves the origin; interior neurons never read padded values.

A crop (negative pads) also narrows the geometry's bounds (see _geometry). Backwards a constant Pad hands on the
gradient of what it kept; what it added (``value`` times the ring's gradient) is bias."""

import numpy as np

from ...errors import NotDecodable
from ._rule import OpRule, attributes, constant, data, optional, per_instance


class Pad(OpRule):
    linear = passes_gate = True
    cone, cone_values = "pad", "shapes"

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

    def backward(self, node, ins, is_data, out, grad):
        x = ins[0]
        attrs = attributes(node)
        pads = np.asarray(attrs["pads"] if "pads" in attrs else ins[1], np.int64)
        if (pads < 0).any() or (len(ins) > 3 and ins[3] is not None) or attrs.get("mode", "constant") != "constant":
            raise NotDecodable("only a constant Pad with non-negative pads on every axis is supported")
        index = (slice(None),) + tuple(slice(int(pads[a]), int(pads[a]) + x.shape[a]) for a in range(1, x.ndim))
        value = (float(np.asarray(ins[2]).reshape(-1)[0]) if len(ins) > 2 and ins[2] is not None and np.size(ins[2])
                 else 0.0)
        ring = grad.copy()
        ring[index] = 0
        return [grad[index]] + [None] * (len(ins) - 1), value * per_instance(ring)

    def gate_map(self, node, gates, shape, constants):
        """The input's gate with NaN on the padded ring (no lower unit there); negative pads crop."""
        attrs = attributes(node)
        pads = np.asarray(attrs["pads"] if "pads" in attrs else constants.get(node.input[1]) if len(node.input) > 1
                          else None, np.int64).reshape(2, -1)
        grown = np.pad(gates[0], [(max(b, 0), max(e, 0)) for b, e in pads.T], constant_values=np.nan)
        return grown[tuple(slice(max(-b, 0), grown.shape[a] - max(-e, 0)) for a, (b, e) in enumerate(pads.T))]
