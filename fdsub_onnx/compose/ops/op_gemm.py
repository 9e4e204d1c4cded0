"""Fully connected layers on a flattened feature map: a convolution whose kernel covers the map."""

import numpy as np
from onnx import helper

from ...errors import NotDecodable
from ..values import Layout, Tensor
from ._rule import OpRule, attributes, batched, constant, no_bias, on, optional
from ._window import apply_window
from .op_norm import mix_channels


class Gemm(OpRule):
    linear = True
    fds = "weight"

    def substituted_node(self, node, stat, model, substitution, constants):
        return _substituted_matrix(node, stat, model, substitution, constants)

    def apply(self, node, inputs, ctx):
        attrs = attributes(node)
        if attrs.get("transA", 0):
            raise NotDecodable("transA=1 (features as columns) is not supported")
        matrix = constant(inputs[1], "weight matrix")
        matrix = matrix.T if attrs.get("transB", 0) else matrix
        bias = optional(inputs, 2)
        bias = None if bias is None else attrs.get("beta", 1.0) * constant(bias, "bias")
        return fully_connected(inputs[0], attrs.get("alpha", 1.0) * matrix, bias, node, ctx)

    def backward(self, node, ins, is_data, out, grad):
        attrs = attributes(node)
        if attrs.get("transA", 0):
            raise NotDecodable("Gemm with transA=1 is not supported")
        return _fully_connected_backward(node, ins, out, grad, attrs.get("alpha", 1.0), attrs.get("beta", 1.0),
                                         attrs.get("transB", 0))

    def flops(self, model, node, size):
        return _matrix_flops(model, node, size)


class MatMul(OpRule):
    linear = True
    fds = "weight"

    def substituted_node(self, node, stat, model, substitution, constants):
        return _substituted_matrix(node, stat, model, substitution, constants)

    def apply(self, node, inputs, ctx):
        matrix = constant(inputs[1], "weight matrix")
        x = inputs[0]
        if isinstance(x, Layout) and x.channels_last and matrix.ndim == 2 and matrix.shape[0] == x.source.channels:
            # a pointwise linear layer on a channels-last map (ConvNeXt): a 1x1 window over its channels
            mixed = mix_channels(x.source, matrix.T, None, ctx)
            (h, w), c = mixed.spatial, mixed.channels
            return Layout(np.arange(c * h * w).reshape(1, c, h, w).transpose(0, 2, 3, 1), mixed)
        return fully_connected(x, matrix, None, node, ctx)

    def backward(self, node, ins, is_data, out, grad):
        return _fully_connected_backward(node, ins, out, grad, 1.0, None, attributes(node).get("transB", 0))

    def flops(self, model, node, size):
        return _matrix_flops(model, node, size)


def _substituted_matrix(node, stat, model, substitution, constants):
    """fds on the linearized network: a fully connected layer on a vector with its substituted matrix."""
    if len(model.shapes.get(node.input[0], ())) != 2:
        return None
    attrs = attributes(node)
    gemm = node.op_type == Gemm.__name__
    matrix = np.asarray(model.constants[node.input[1]], np.float64)
    if gemm:
        matrix = attrs.get("alpha", 1.0) * (matrix.T if attrs.get("transB", 0) else matrix)
    n = matrix.shape[1]
    weight = substitution.weight(node, matrix.T.reshape(n, -1, 1, 1))
    name = f"{node.output[0]}::substituted"
    constants[name] = np.ascontiguousarray(weight.reshape(n, -1).T)
    inputs = [node.input[0], name, *node.input[2:3]]
    kept = {"beta": attrs["beta"]} if gemm and "beta" in attrs else {}
    return helper.make_node(node.op_type, inputs, list(node.output), name=node.name, **kept)


def _matrix_flops(model, node, size):
    weight = model.constants.get(node.input[1]) if len(node.input) > 1 else None
    return size if weight is None else 2.0 * float(np.prod(weight.shape))


def fully_connected(value, matrix: np.ndarray, bias, node, ctx) -> Tensor:
    """``features @ matrix + bias`` where features flatten a map [C, H, W] (in C order or any other)."""
    source, (c, h, w), order = _flattened(value)
    if matrix.ndim != 2 or matrix.shape[0] != c * h * w:
        raise NotDecodable(f"weight matrix {list(matrix.shape)} does not take {c * h * w} features")
    if order is not None:  # feature j is source position order[j]: row j of the matrix belongs there
        placed = np.empty_like(matrix)
        placed[order] = matrix
        matrix = placed
    n = matrix.shape[1]
    weight = matrix.T.reshape(n, c, h, w)
    if bias is not None:
        bias = np.broadcast_to(np.asarray(bias).reshape(-1), (n,))
    return apply_window(source, node, ctx, weight, bias, 1, {})


def _flattened(value):
    """(source map, its [C, H, W], the source position of each feature or None for C order)."""
    if isinstance(value, Tensor) and value.spatial == (1, 1):
        return value, (value.channels, 1, 1), None
    if isinstance(value, Layout):
        source = value.source
        size = source.channels * source.spatial[0] * source.spatial[1]
        flat = value.index.reshape(-1)
        if value.index.ndim == 2 and value.index.shape[0] == 1 and np.array_equal(np.sort(flat), np.arange(size)):
            # C order, or another order of the same values (an NHWC map flattened): the matrix rows follow it
            return source, (source.channels, *source.spatial), None if np.array_equal(flat, np.arange(size)) else flat
    raise NotDecodable("its input is not a feature map flattened into one vector per image")


def _fully_connected_backward(node, ins, out, grad, alpha, beta, trans_b):
    """The gradient through ``x @ (alpha * W)`` (+ ``beta * C``, whose share is bias); on the last axis of a map
    (a channels-last pointwise layer) a product per position."""
    matrix = on(grad, ins[1])
    matrix = matrix.T if trans_b else matrix
    if beta is None and grad.ndim > 2:
        return [grad @ matrix.T, None], no_bias(grad)
    g2 = grad.reshape(len(grad), -1)
    added = no_bias(grad)
    if beta is not None and len(ins) > 2 and ins[2] is not None:
        added = (g2 * beta * on(grad, ins[2]).reshape(1, -1)).sum(axis=1)
    return [(alpha * g2 @ matrix.T).reshape(batched(ins[0], grad)), None, None][: len(ins)], added
