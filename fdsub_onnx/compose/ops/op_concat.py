"""Concat on the channel axis: banks aligned in image space and stacked; backwards, the gradient split."""

import numpy as np

from ...errors import NotDecodable
from ...graph.geometry import union
from ..backend import array_module
from ._rule import OpRule, attributes, data, no_bias


class Concat(OpRule):
    linear = True
    cone = "aligned"

    def apply(self, node, inputs, ctx):
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
        axis = attributes(node)["axis"] % grad.ndim
        cuts = np.cumsum([x.shape[axis] for x in ins])[:-1]
        return list(array_module(grad).split(grad, cuts.tolist(), axis=axis)), no_bias(grad)

    def gate_inputs(self, node, data):
        return data

    def gate_map(self, node, gates, shape, constants):
        return np.concatenate(gates, axis=int(attributes(node)["axis"]))
