"""ReduceMean, ReduceMax, ReduceSum: global pooling as exporters write it, and channel means (LayerNorm's centring).

Over the spatial axes (keepdims or not) a reduction is global pooling: a uniform window over the whole map
(ReduceMax reads as its average in ``weights`` mode, as GlobalMaxPool does; ReduceSum is the mean times H*W).
Over the channel axis it is a 1x1 window with weights 1/C (one output channel).
"""

from __future__ import annotations

import numpy as np

from ...errors import NotDecodable
from ...graph.ranges import reduce_axes
from ._rule import OpRule, attributes, constant, data, optional
from ._window import apply_window, uniform_window


class ReduceMean(OpRule):
    scale_by_count = False  # ReduceSum: the mean times the number of values reduced

    def apply(self, node, inputs, ctx):
        x = data(inputs[0])
        shape = ctx.shape(node.input[0])
        if shape is None or len(shape) != 4:
            raise NotDecodable(f"it reduces a tensor of shape {shape}; only maps [N, C, H, W] are supported")
        given = optional(inputs, 1)
        axes = reduce_axes(attributes(node), None if given is None else constant(given, "axes"), len(shape))
        if axes == {2, 3}:
            weight, groups, count = uniform_window(x.channels, x.spatial), x.channels, x.spatial[0] * x.spatial[1]
        elif axes == {1}:
            weight, groups, count = np.full((1, x.channels, 1, 1), 1.0 / x.channels), 1, x.channels
        else:
            raise NotDecodable(f"it reduces axes {sorted(axes)}; only the spatial axes or the channel axis are read")
        if self.scale_by_count:
            weight = weight * count
        return apply_window(x, node, ctx, weight, None, groups, {})


class ReduceMax(ReduceMean):
    """Its average in ``weights`` mode (the uniform switch)."""


class ReduceSum(ReduceMean):
    scale_by_count = True
