"""Fully connected layers on a flattened feature map: a convolution whose kernel covers the map."""

import numpy as np
from onnx import helper

from ...errors import NotDecodable, PhaseDependent
from ...graph.patterns import Attention, Bilinear
from ..backend import array_module
from ..values import Const, Layout, Tensor
from ._rule import (
    OpRule,
    attributes,
    batched,
    constant,
    constant_weight,
    no_bias,
    on,
    optional,
    per_instance,
    reduce_to,
)
from ._window import apply_window
from .op_arithmetic import Add, Sub
from .op_norm import mix_channels


class Gemm(OpRule):
    matrix_product = True
    linear = True
    fds = "weight"
    cone_values = "shapes"

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


PRODUCT_OF_TENSORS = ("it multiplies two data-dependent tensors (attention's Q K^T, or A V without a Softmax to "
                      "hold); decoded per position with the attention matrix held, where a Softmax gives one")


class MatMul(OpRule):
    matrix_product = True
    linear = True
    fds = "weight"
    reads_last_axis = True
    product_refusal = PRODUCT_OF_TENSORS

    def values_read(self, node, constants):
        """By a constant matrix: none; a product of two tensors (attention's): both factors."""
        return "shapes" if len(node.input) > 1 and node.input[1] in constants else "inputs"

    def substitutes(self, node, constants):
        """A product of two data tensors (attention's) has no weight to substitute: fds holds it instead."""
        return self.fds if len(node.input) > 1 and node.input[1] in constants else None

    def substituted_node(self, node, stat, model, substitution, constants):
        return _substituted_matrix(node, stat, model, substitution, constants)

    def apply(self, node, inputs, ctx):
        if not isinstance(inputs[0], Const) and not isinstance(inputs[1], Const):
            raise PhaseDependent(PRODUCT_OF_TENSORS)
        matrix = constant(inputs[1], "weight matrix")
        x = inputs[0]
        if isinstance(x, Layout) and x.channels_last and matrix.ndim == 2 and matrix.shape[0] == x.source.channels:
            # a pointwise linear layer on a channels-last map (ConvNeXt): a 1x1 window over its channels
            mixed = mix_channels(x.source, matrix.T, None, ctx)
            (h, w), c = mixed.spatial, mixed.channels
            return Layout(np.arange(c * h * w).reshape(1, c, h, w).transpose(0, 2, 3, 1), mixed)
        return fully_connected(x, matrix, None, node, ctx)

    def backward(self, node, ins, is_data, out, grad):
        """``x @ W`` as a fully connected layer; a product with a data tensor on either side (attention's Q K^T and
        A V) by the product rule, whose tangent plane ``a b ~ da b + a db - a b`` is exact at the instance."""
        if is_data[0] and not is_data[1]:
            return _fully_connected_backward(node, ins, out, grad, 1.0, None, attributes(node).get("transB", 0))
        xp = array_module(grad)
        a, b = (v if d else on(grad, v) for v, d in zip(ins, is_data))
        grads = [reduce_to(grad @ xp.swapaxes(b, -1, -2), a.shape) if is_data[0] else None,
                 reduce_to(xp.swapaxes(a, -1, -2) @ grad, b.shape) if is_data[1] else None]
        return grads, -per_instance(grad * xp.matmul(a, b)) if all(is_data) else no_bias(grad)


    def linear_nodes(self, node, ctx):
        """An attention product (``graph.patterns.Attention``) with its matrix held at its reference value."""
        pattern, out = ctx.patterns.get(node.output[0]), node.output[0]
        if isinstance(pattern, Bilinear) and f"{out}::left" in ctx.gates:
            return _tangent_plane(node, ctx)
        if not isinstance(pattern, Attention) or out not in ctx.gates:
            return None
        const = f"{out}::held_attention"
        ctx.held[const] = np.asarray(ctx.gates[out], np.float32)  # one image's matrix, in the tensor's own shape
        inputs = [const if name == pattern.held else name for name in node.input]
        return [helper.make_node(MatMul.__name__, inputs, [out], name=node.name)]

    def flops(self, model, node, size):
        return _matrix_flops(model, node, size)


def _tangent_plane(node, ctx) -> list:
    """A product of two data tensors read at the reference input (L, R held there): ``a @ R + L @ b - L @ R``."""
    out, name = node.output[0], node.name or node.output[0]
    left, right = (np.asarray(ctx.gates[f"{out}::{side}"], np.float32) for side in ("left", "right"))
    held = {side: f"{out}::held_{side}" for side in ("left", "right", "product")}
    ctx.held[held["left"]], ctx.held[held["right"]] = left, right
    ctx.held[held["product"]] = np.matmul(ctx.held[held["left"]], ctx.held[held["right"]])
    a, b = node.input[:2]
    parts = [f"{out}::by_right", f"{out}::by_left", f"{out}::sum"]
    nodes = [helper.make_node(MatMul.__name__, [a, held["right"]], [parts[0]], name=f"{name}::by_right"),
             helper.make_node(MatMul.__name__, [held["left"], b], [parts[1]], name=f"{name}::by_left"),
             helper.make_node(Add.__name__, parts[:2], [parts[2]], name=f"{name}::sum"),
             helper.make_node(Sub.__name__, [parts[2], held["product"]], [out], name=name)]
    shape = ctx.shapes.get(out)
    if shape is not None:
        ctx.shapes.update(dict.fromkeys(parts, shape))
    return nodes


def _substituted_matrix(node, stat, model, substitution, constants):
    """fds on the linearized network: a fully connected layer on a vector, or a MatMul on tokens or a channels-last
    map (one statistic per output and input channel, read position by position), with its substituted matrix."""
    rank = len(model.shapes.get(node.input[0], ()))
    if rank != 2 and not (node.op_type == MatMul.__name__ and rank >= 3):
        return None
    attrs = attributes(node)
    gemm = node.op_type == Gemm.__name__
    matrix = np.asarray(model.constants[node.input[1]], np.float64)
    if matrix.ndim != 2:
        return None
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
    """Two FLOPs per output value and term of its sum: ``size`` values (every position of a product on tokens, not
    one) times the contracted axis (a constant matrix's input side, else the first factor's last axis)."""
    weight = constant_weight(model, node)
    if weight is not None and np.ndim(weight) >= 2:
        transposed = node.op_type == Gemm.__name__ and attributes(node).get("transB", 0)
        return 2.0 * size * int(np.shape(weight)[-1] if transposed else np.shape(weight)[-2])
    first = model.shapes.get(node.input[0]) if node.input else None
    return 2.0 * size * int(first[-1]) if first else size


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
    if isinstance(value, Layout):  # tokens or windows mixed over their last axis: the adjoint reads them per position
        raise PhaseDependent("its input is a reshaped tensor (tokens, windows or heads), not a feature map flattened "
                             "into one vector: the layers after it decode per position")
    raise NotDecodable("its input is not a feature map flattened into one vector per image")


#: below this share of nonzero rows or columns, a product reads only those (a cut costs about a tenth of a product)
SPARSE_SHARE = 0.8


def _last_axis_product(grad, matrix):
    """``grad @ matrix.T`` for ``x @ matrix`` on the last axis of ``grad`` [..., C_out], as one product over every
    position, reading only the positions and outputs whose gradient is not zero where few are: a seed at one token
    before attention spreads it, the outputs of a held factor (attention's q and k) that no gradient reaches."""
    xp = array_module(grad)
    flat = grad.reshape(-1, grad.shape[-1])
    rows, columns = flat.any(axis=1), flat.any(axis=0)
    few_rows = int(rows.sum()) < SPARSE_SHARE * len(rows)
    if int(columns.sum()) < SPARSE_SHARE * len(columns):
        flat, matrix = flat[:, columns], matrix[:, columns]
    if few_rows:
        out = xp.zeros((len(rows), matrix.shape[0]), grad.dtype)
        out[rows] = flat[rows] @ matrix.T
    else:
        out = flat @ matrix.T
    return out.reshape(*grad.shape[:-1], matrix.shape[0])


def _fully_connected_backward(node, ins, out, grad, alpha, beta, trans_b):
    """The gradient through ``x @ (alpha * W)`` (+ ``beta * C``, whose share is bias); on the last axis of a map
    (a channels-last pointwise layer) a product per position."""
    matrix = on(grad, ins[1])
    matrix = matrix.T if trans_b else matrix
    if beta is None and grad.ndim > 2 and matrix.ndim == 2:  # one matrix over the last axis: one product
        return [_last_axis_product(grad, matrix), None], no_bias(grad)
    if beta is None and grad.ndim > 2:  # batched products of the last two axes (a matrix per head)
        return [grad @ array_module(grad).swapaxes(matrix, -1, -2), None], no_bias(grad)
    g2 = grad.reshape(len(grad), -1)
    added = no_bias(grad)
    if beta is not None and len(ins) > 2 and ins[2] is not None:  # per instance: rows may be one image's tokens
        added = per_instance(grad * (beta * on(grad, ins[2])))
    return [(alpha * g2 @ matrix.T).reshape(batched(ins[0], grad)), None, None][: len(ins)], added
