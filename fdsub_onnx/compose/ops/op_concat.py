"""Concat on the channel axis: banks aligned in image space and stacked."""

from ...errors import NotDecodable
from ...graph.geometry import union
from ._rule import OpRule, attributes, data


class Concat(OpRule):
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
