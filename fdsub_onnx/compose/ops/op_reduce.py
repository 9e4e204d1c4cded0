"""ReduceMean, ReduceMax, ReduceSum: global pooling as exporters write it, and channel means (LayerNorm's centring).

Over the spatial axes (keepdims or not) a reduction is global pooling: a uniform window over the whole map
(ReduceMax reads as its average in ``weights`` mode, as GlobalMaxPool does; ReduceSum is the mean times H*W).
Over the channel axis it is a 1x1 window with weights 1/C (one output channel).
"""

from __future__ import annotations

import numpy as np

from ...errors import NotDecodable
from ...graph.ranges import reduce_axes
from ..backend import array_module
from ._rule import OpRule, attributes, averaged_node, batched, constant, data, no_bias, optional
from ._window import apply_window, uniform_window


class ReduceMean(OpRule):
    scale_by_count = False  # ReduceSum: the mean times the number of values reduced
    linear = True

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

    def backward(self, node, ins, is_data, out, grad):
        """Mean and Sum spread the gradient evenly over what they reduce (``reduced``)."""
        x, g, axes = _reduced(node, ins, grad)
        count = 1 if self.scale_by_count else int(np.prod([x.shape[a] for a in axes]))
        return ([array_module(grad).broadcast_to(g / count, batched(x, grad)).copy()] + [None] * (len(ins) - 1),
                no_bias(grad))


def _reduced(node, ins, grad):
    """(input, the output gradient with the reduced axes kept as 1, those axes)."""
    x = ins[0]
    axes = tuple(sorted(reduce_axes(attributes(node), ins[1] if len(ins) > 1 else None, x.ndim) - {0}))
    kept = list(batched(x, grad))
    for a in axes:
        kept[a] = 1
    return x, grad.reshape(kept), axes


class ReduceMax(ReduceMean):
    """Its average in ``weights`` mode (the uniform switch); in ``local`` the gradient goes to the first maximum."""

    linear = False
    refuses = {"adjoint": "a max is not linear; the adjoint runs on the linearized network, where it is a mean"}

    def backward(self, node, ins, is_data, out, grad):
        x, g, axes = _reduced(node, ins, grad)
        xp = array_module(grad)
        moved = xp.moveaxis(x, axes, tuple(range(x.ndim - len(axes), x.ndim)))
        flat = moved.reshape(*moved.shape[: x.ndim - len(axes)], -1)
        hit = xp.zeros(flat.shape, grad.dtype)
        xp.put_along_axis(hit, xp.argmax(flat, axis=-1)[..., None], 1.0, axis=-1)
        mask = xp.moveaxis(hit.reshape(moved.shape), tuple(range(x.ndim - len(axes), x.ndim)), axes)
        return [g * mask] + [None] * (len(ins) - 1), no_bias(grad)

    def linear_nodes(self, node, ctx):
        return [averaged_node(node, ReduceMean.__name__, ctx.used, ctx.dilated_ok)]


class ReduceSum(ReduceMean):
    scale_by_count = True
