"""Pooling as a depthwise uniform window.

AveragePool is exact for interior neurons (count_include_pad only changes border
windows). MaxPool, in ``weights`` mode, is an average over its window: the uniform
switch of docs/method.md.
"""

from ._rule import OpRule, attributes, data
from ._window import apply_window, uniform_window


class AveragePool(OpRule):
    def apply(self, node, inputs, ctx):
        x = data(inputs[0])
        attrs = attributes(node)
        return apply_window(x, node, ctx, uniform_window(x.channels, attrs["kernel_shape"]), None, x.channels, attrs)


class MaxPool(AveragePool):
    """Uniform switch in ``weights`` mode."""


class GlobalAveragePool(OpRule):
    def apply(self, node, inputs, ctx):
        x = data(inputs[0])
        return apply_window(x, node, ctx, uniform_window(x.channels, x.spatial), None, x.channels, {})


class GlobalMaxPool(GlobalAveragePool):
    """Uniform switch in ``weights`` mode."""
