"""Concat on the channel axis: banks aligned in image space and stacked; backwards, the gradient split."""

import numpy as np

from ...errors import NotDecodable, PhaseDependent
from ...graph.geometry import union
from ..backend import array_module
from ..values import Const
from ._rule import OpRule, attributes, data, no_bias, on, per_instance


class Concat(OpRule):
    linear = True
    cone, cone_values = "aligned", "shapes"
    stacks = True

    def apply(self, node, inputs, ctx):
        if any(isinstance(v, Const) for v in inputs) and not all(isinstance(v, Const) for v in inputs):
            raise PhaseDependent("it concatenates a constant with the data (a class or register token): the layers "
                                 "after it decode per position")
        rank = ctx.rank(node.output[0])
        if attributes(node)["axis"] % rank != 1:
            raise NotDecodable(f"it concatenates on axis {attributes(node)['axis']}, not on channels")
        maps = [data(v) for v in inputs]
        if len({x.spatial for x in maps}) > 1:
            raise NotDecodable("its inputs have different spatial sizes")
        geom = union([x.geom for x in maps])
        bank = ctx.engine.concat([x.bank for x in maps], [x.geom for x in maps], geom)
        return maps[0].derive(geom=geom, channels=sum(x.channels for x in maps), bank=bank)

    def backward(self, node, ins, is_data, out, grad):
        """The gradient split back; a constant input's share (a class token) is bias."""
        axis = attributes(node)["axis"] % grad.ndim
        cuts = np.cumsum([x.shape[axis] for x in ins])[:-1]
        pieces = list(array_module(grad).split(grad, cuts.tolist(), axis=axis))
        added = no_bias(grad)
        for piece, x, data_input in zip(pieces, ins, is_data):
            if not data_input:
                added = added + per_instance(piece * on(grad, x))
        return [p if d else None for p, d in zip(pieces, is_data)], added

    def gate_inputs(self, node, data):
        return data

    def gate_map(self, node, gates, shape, constants):
        """The data inputs' gates, with gate 1 at a constant's positions (a class token: a bias, passed as it is)."""
        axis, data = int(attributes(node)["axis"]) % len(shape), iter(gates)
        pieces = []
        for name in node.input:
            if name in constants:
                size = np.shape(constants[name])[axis] if np.ndim(constants[name]) == len(shape) else 1
                pieces.append(np.ones((*shape[:axis], size, *shape[axis + 1:])))
            else:
                pieces.append(next(data))
        return np.concatenate(pieces, axis=axis)
