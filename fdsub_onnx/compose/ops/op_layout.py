"""Reshape, Transpose, Flatten, Squeeze, Unsqueeze on feature maps.

They are followed by moving an index array through the same op: when the result is
again a [1, C, H, W] map whose every channel is one input channel in place, the chain
was a channel permutation (ShuffleNet's shuffle) and the bank is permuted. Anything
else stays a pending Layout, which only a fully connected layer may consume.
"""

from __future__ import annotations

import numpy as np

from ...errors import NotDecodable
from ..backend import array_module
from ..values import Layout, Tensor
from ._rule import OpRule, attributes, batched, no_bias


class Reshape(OpRule):
    linear = passes_gate = True
    cone_values = "shapes"

    def apply(self, node, inputs, ctx):
        layout = as_layout(inputs[0], node, ctx)
        shape = ctx.shape(node.output[0])
        if shape is None:
            raise NotDecodable("its output shape is unknown")
        return settle(Layout(layout.index.reshape(shape), layout.source), ctx)

    def backward(self, node, ins, is_data, out, grad):
        return [grad.reshape(batched(ins[0], grad))] + [None] * (len(ins) - 1), no_bias(grad)


class Flatten(Reshape): ...
class Squeeze(Reshape): ...
class Unsqueeze(Reshape): ...


class Transpose(OpRule):
    linear = passes_gate = True
    cone_values = "shapes"

    def apply(self, node, inputs, ctx):
        layout = as_layout(inputs[0], node, ctx)
        perm = attributes(node).get("perm")
        index = layout.index.transpose(perm) if perm is not None else layout.index.T
        return settle(Layout(np.ascontiguousarray(index), layout.source), ctx)

    def backward(self, node, ins, is_data, out, grad):
        perm = attributes(node).get("perm", list(range(grad.ndim))[::-1])
        return [array_module(grad).transpose(grad, tuple(np.argsort(perm)))], no_bias(grad)

    def gate_map(self, node, gates, shape, constants):
        return gates[0].transpose(attributes(node).get("perm"))


def as_layout(value, node, ctx) -> Layout:
    if isinstance(value, Layout):
        return value
    if not isinstance(value, Tensor):
        raise NotDecodable("expected a feature map input, got a constant")
    shape = ctx.shape(node.input[0])
    if value.rows is not None or shape is None:
        raise NotDecodable("its input shape is unknown")
    return Layout(np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape), value)


def settle(layout: Layout, ctx):
    """Back to a Tensor when the layout is a channel permutation of its source map."""
    index, source = layout.index, layout.source
    h, w = source.spatial
    if index.ndim != 4 or index.shape[0] != 1 or tuple(index.shape[2:]) != (h, w) or index.shape[1] != source.channels:
        return layout
    perm = index[0, :, 0, 0] // (h * w)
    expected = perm[:, None, None] * (h * w) + np.arange(h * w).reshape(h, w)
    if not np.array_equal(index[0], expected):
        return layout
    if np.array_equal(perm, np.arange(source.channels)):
        return source
    return source.derive(bank=ctx.engine.take(source.bank, perm))
