"""Gather with constant indices: a channel selection or permutation, or an index move on a pending layout.

torch's dynamo exporter writes ConvNeXt's pooled classifier input as ``ReduceMean -> Reshape -> Gather(0..C-1)``
(``as_strided``): an identity. Along the channels of a map Gather keeps (and may repeat) rows of the bank, which
is exact; on a reshaped tensor it moves the index array as Reshape does, and the result settles back to a map
when it is one. A gather along a spatial axis of a map picks arbitrary rows or columns, which no receptive-field
geometry describes, so it is refused unless it is the identity.
"""

from __future__ import annotations

import numpy as np

from ...errors import NotDecodable
from ..backend import array_module
from ..values import Layout, Tensor
from ._rule import OpRule, attributes, batched, constant, instances, known_shape, no_bias
from .op_layout import as_layout, settle


class Gather(OpRule):
    linear = True  # constant indices: a selection, exact without forward values
    cone_values = "shapes"

    def apply(self, node, inputs, ctx):
        shape = known_shape(ctx, node.input[0])
        axis = int(attributes(node).get("axis", 0))
        if not -len(shape) <= axis < len(shape):
            raise NotDecodable(f"its axis {axis} is out of range for a rank-{len(shape)} input")
        axis %= len(shape)
        indices = np.asarray(constant(inputs[1], "index array"), np.int64)
        size = shape[axis]
        if ((indices < -size) | (indices >= size)).any():
            raise NotDecodable(f"an index is out of range for axis {axis} of size {size}")
        indices = indices % size
        x = inputs[0]
        if isinstance(x, Tensor) and len(shape) in (2, 4) and axis >= 1:
            return _on_map(x, axis, indices, size, node.output[0], ctx)
        layout = as_layout(x, node, ctx)
        return settle(Layout(np.take(layout.index, indices, axis=axis), layout.source), ctx)

    def backward(self, node, ins, is_data, out, grad):
        """The gradient added back at the position each index took (a repeated index collects every copy's)."""
        x, xp = ins[0], array_module(grad)
        if is_data[1]:
            raise NotDecodable("its indices are computed from the image")
        axis = attributes(node).get("axis", 0) % x.ndim
        if instances(grad) == 1 and grad.shape == out.shape:  # one instance in its tensors' own shapes, the batch
            m, shape = 1, x.shape  # anywhere: torchvision's q, k, v gathered off a [3, T, 1, C] stack
        elif axis == 0 or x.shape[0] not in (1, len(grad)):
            raise NotDecodable("a Gather over a tensor without its batch axis has no backward rule yet")
        else:  # instances side by side on axis 0; the forward value may be one image's, shared by its instances
            m, shape, axis = len(grad), x.shape[1:], axis - 1
        index = np.asarray(ins[1], np.int64).reshape(-1) % shape[axis]
        pre, post = int(np.prod(shape[:axis])), int(np.prod(shape[axis + 1:]))
        g, gx = grad.reshape(m, pre, len(index), post), xp.zeros((m, pre, shape[axis], post), grad.dtype)
        rest = np.arange(len(index))
        while rest.size:  # one round per copy of the most repeated index (one for a permutation)
            _, first = np.unique(index[rest], return_index=True)
            gx[:, :, xp.asarray(index[rest[first]])] += g[:, :, xp.asarray(rest[first])]
            rest = np.delete(rest, first)
        return [gx.reshape(batched(x, grad)), None], no_bias(grad)


def _on_map(x: Tensor, axis: int, indices: np.ndarray, size: int, out_name: str, ctx) -> Tensor:
    """Channels (axis 1) of a [1, C] or [1, C, H, W] map selected in the given order; a spatial axis only as the
    identity."""
    if indices.ndim == 1 and np.array_equal(indices, np.arange(size)):
        return x.derive(spatial=ctx.spatial(out_name))
    if axis > 1:
        raise NotDecodable(f"it picks positions along spatial axis {axis} of a feature map, which no receptive-field "
                           "geometry describes; only channel selections are followed")
    if indices.ndim != 1:
        raise NotDecodable(f"its indices on the channel axis have {indices.ndim} dimensions; only a list of "
                           "channels is followed")
    if x.rows is not None:
        raise NotDecodable("it selects channels of a decode target")
    return x.derive(bank=ctx.engine.take(x.bank, indices), channels=len(indices), spatial=ctx.spatial(out_name))
