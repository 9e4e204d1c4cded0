"""Add, Sub, Mul, Div, Sum: residual sums of feature maps and per-channel constants."""

from __future__ import annotations

import numpy as np
from onnx import helper

from ...errors import NotDecodable, PhaseDependent
from ...graph.geometry import union
from ...graph.patterns import ChannelGate, SelfGated, TokenScale
from ..values import Const, Layout, Tensor
from ._rule import OpRule, data, no_bias, on, per_channel, per_instance, reduce_to
from .op_elementwise import Identity

_PRODUCT_OF_MAPS = "it multiplies two data-dependent tensors, which has no data-free rule"
POSITION_BIAS = ("it adds a constant that varies over positions (a position embedding): the bias depends on the "
                 "position, so the layers after it decode per position")


class Arithmetic(OpRule):
    """A sum or product of maps and constants: position by position on one grid; with one constant operand a
    per-channel affine map."""

    family = True

    linear = True
    cone = "aligned"
    affine_by_constant = True

    def gate_inputs(self, node, data):  # a per-channel constant: in the bank already
        return data if len(data) == 1 else None


class Add(Arithmetic):
    cone_values = "shapes"  # a sum: the gradient passes as it is

    def apply(self, node, inputs, ctx):
        return add(inputs, [1.0] * len(inputs), node, ctx)

    def backward(self, node, ins, is_data, out, grad):
        return _sum_backward(ins, is_data, grad, -1.0 if isinstance(self, Sub) else 1.0)


class Sum(Add):
    """n-ary Add."""

    affine_by_constant = False

    def gate_inputs(self, node, data):
        return None


class Sub(Add):
    def apply(self, node, inputs, ctx):
        return add(inputs, [1.0, -1.0], node, ctx)


def _sum_backward(ins, is_data, grad, sign: float):
    """The gradient to each data input (summed over what it was broadcast on); a constant's share is bias."""
    grads, added = [], no_bias(grad)
    for index, (x, data_input) in enumerate(zip(ins, is_data)):
        factor = sign if index == 1 else 1.0
        if data_input:  # a forward value, batched over instances
            grads.append(reduce_to(grad if factor == 1.0 else -grad, x.shape))
        else:  # a constant: the gradient summed over the axes it is broadcast on first (one read of the map)
            grads.append(None)
            summed = reduce_to(grad, x.shape)
            added = added + factor * per_instance(summed * on(grad, x))
    return grads, added


class Mul(Arithmetic):
    product_refusal = _PRODUCT_OF_MAPS

    def values_read(self, node, constants):
        """By a constant: none (its gradient is the constant's); a product of two tensors: both factors."""
        return "shapes" if any(name in constants for name in node.input) else "inputs"

    def apply(self, node, inputs, ctx):
        a, b = inputs
        if isinstance(a, Const) and isinstance(b, Const):
            raise NotDecodable("both inputs are constants")
        if isinstance(a, Const) or isinstance(b, Const):
            x, c = (b, a) if isinstance(a, Const) else (a, b)
            if isinstance(x, Layout):  # e.g. a per-channel scale on an NHWC view of a map
                return on_layout(x, c.value, scale=True, ctx=ctx)
            x = data(x)
            return scale(x, per_channel(c.value, x.channels, ctx.rank(node.output[0])), ctx)
        pattern = ctx.pattern(node)
        if isinstance(pattern, TokenScale):
            raise PhaseDependent(_TOKEN_SCALE)
        if isinstance(pattern, SelfGated):  # x * f(x): an elementwise nonlinearity of x, read as slope * x
            x = ctx.value(pattern.x)
            if np.all(np.asarray(pattern.slope) == 1.0) or not isinstance(x, (Tensor, Layout)):
                return x
            if isinstance(x, Layout):
                if np.ndim(pattern.slope):
                    raise NotDecodable("a per-channel slope on a reshaped map is not read")
                return on_layout(x, np.asarray(pattern.slope), scale=True, ctx=ctx)
            return scale(x, np.broadcast_to(np.asarray(pattern.slope, np.float64), (x.channels,)), ctx)
        if isinstance(pattern, ChannelGate):  # a per-channel gate held at a value (it keeps x's geometry)
            x = data(inputs[list(node.input).index(pattern.x)])
            held = ctx.held_gate(node)
            if held is None:
                if x.bank is None:
                    return x  # geometry only: no value needed
                raise NotDecodable("its channel gate has no held value")
            return scale(x, np.asarray(held, np.float64).reshape(-1), ctx)
        raise NotDecodable(
            "it multiplies two data-dependent tensors that are neither x * f(x) nor a per-channel gate over a map"
        )


    def backward(self, node, ins, is_data, out, grad):
        a, b = ins
        if all(is_data):
            return self._product_of_maps(a, b, grad)
        const = on(grad, b if is_data[0] else a)
        factor = 1.0 / const if isinstance(self, Div) else const
        x = a if is_data[0] else b
        g = reduce_to(grad * factor, x.shape)
        return ([g, None] if is_data[0] else [None, g]), no_bias(grad)

    def _product_of_maps(self, a, b, grad):
        """Two data inputs: a gate (the input broadcast over the other, e.g. squeeze-and-excitation) is held at
        its value for the instance; equal shapes (SiLU as x * sigmoid(x)) take the product rule, whose tangent
        plane ``a*b ~ b*da + a*db - a*b`` is exact at the instance."""
        if isinstance(self, Div) and a.size > b.size and _per_position(a, b):  # x / scale: c/d ~ c/d0 - c0 d/d0^2
            return ([reduce_to(grad / b, a.shape), reduce_to(-grad * a / b**2, b.shape)],  # + c0/d0, exact there
                    per_instance(grad * (a / b)))
        if isinstance(self, Div):
            raise NotDecodable("a division of two feature maps is not supported")
        if a.size != b.size and _per_position(a, b):  # a normalization's scale: the exact tangent plane
            return ([reduce_to(grad * b, a.shape), reduce_to(grad * a, b.shape)], -per_instance(grad * a * b))
        if a.size != b.size:
            gate_is_b = b.size < a.size
            held = b if gate_is_b else a
            x = a if gate_is_b else b
            g = reduce_to(grad * held, x.shape)
            return ([g, None] if gate_is_b else [None, g]), no_bias(grad)
        return [grad * b, grad * a], -per_instance(grad * a * b)

    def linear_nodes(self, node, ctx):
        """The export patterns it ends (``graph.patterns``): x * f(x) as ``slope * x``, a channel gate held at its
        value (``ctx.gates``) as a product with that constant."""
        pattern = ctx.patterns.get(node.output[0])
        if isinstance(pattern, SelfGated):
            if np.all(np.asarray(pattern.slope) == 1.0):
                return [helper.make_node(Identity.__name__, [pattern.x], [node.output[0]], name=node.name)]
            const = f"{node.output[0]}::slope"
            slope = np.asarray(pattern.slope, np.float32).reshape(-1)
            ctx.held[const] = slope.reshape(1, -1, 1, 1) if slope.size > 1 else slope.reshape(())
            return [helper.make_node(Mul.__name__, [pattern.x, const], [node.output[0]], name=node.name)]
        if isinstance(pattern, ChannelGate) and node.output[0] in ctx.gates:
            value = np.asarray(ctx.gates[node.output[0]], np.float32).reshape(-1)
            const = f"{node.output[0]}::held_gate"
            ctx.held[const] = value.reshape(1, -1, 1, 1)
            return [helper.make_node(Mul.__name__, [pattern.x, const], [node.output[0]], name=node.name)]
        if isinstance(pattern, TokenScale) and node.output[0] in ctx.gates:  # its factor held at one value
            const = f"{node.output[0]}::held_scale"
            ctx.held[const] = np.asarray(np.asarray(ctx.gates[node.output[0]]).reshape(-1)[0], np.float32)
            return [helper.make_node(Mul.__name__, [pattern.x, const], [node.output[0]], name=node.name)]
        return None



class Div(Mul):
    def apply(self, node, inputs, ctx):
        a, b = inputs
        if isinstance(ctx.pattern(node), TokenScale):
            raise PhaseDependent(_TOKEN_SCALE)
        if not isinstance(b, Const):
            raise NotDecodable("it divides by a data-dependent tensor")
        x = data(a)
        divisor = per_channel(b.value, x.channels, ctx.rank(node.output[0]))
        if np.any(divisor == 0):
            raise NotDecodable("it divides by zero")
        return scale(x, 1.0 / divisor, ctx)


_TOKEN_SCALE = ("a normalization's scale over the last axis (RMSNorm, a LayerNorm written out), held per position: the "
                "layers after it decode per position")


def _per_position(a, b) -> bool:
    """Whether the smaller of two data factors is one number per position over the last axis of the other."""
    small, large = (a, b) if a.size < b.size else (b, a)
    return small.ndim == large.ndim >= 3 and small.shape[-1] == 1 and small.shape[1:-1] == large.shape[1:-1]


def scale(x: Tensor, factor: np.ndarray, ctx) -> Tensor:
    return x.derive(bank=ctx.engine.affine(x.bank, factor, 0.0))


def on_layout(layout: Layout, constant: np.ndarray, scale: bool, ctx, sign: float = 1.0) -> Layout:
    """A constant multiplied (``scale``) or added (``sign``) elementwise to a pending reshape of a map (a tf2onnx
    NHWC view): read through the layout's index, it must be one value per channel of the source map."""
    index, source = layout.index, layout.source
    values = np.broadcast_to(np.asarray(constant, np.float64), index.shape).reshape(-1)
    per_source = np.empty(index.size)
    per_source[index.reshape(-1)] = values
    per_source = per_source.reshape(source.channels, -1)
    if not np.allclose(per_source, per_source[:, :1]):
        if not scale:  # a bias per position (a position embedding): the filters hold, the bias is the position's
            raise PhaseDependent(POSITION_BIAS)
        raise NotDecodable("its constant varies over space in the map's own layout")
    value = per_source[:, 0]
    bank = ctx.engine.affine(source.bank, value, 0.0) if scale else ctx.engine.affine(source.bank, 1.0, sign * value)
    return Layout(index, source.derive(bank=bank))


def add(inputs: list, signs: list[float], node, ctx) -> Tensor:
    """Signed sum of feature maps (aligned in image space) and per-channel constants."""
    layouts = [v for v in inputs if isinstance(v, Layout)]
    if len(layouts) == 1 and len(inputs) == 2 and any(isinstance(v, Const) for v in inputs):
        const, sign = next((v, s) for v, s in zip(inputs, signs) if isinstance(v, Const))
        if signs[list(map(id, inputs)).index(id(layouts[0]))] != 1.0:
            raise NotDecodable("it subtracts a reshaped map from a constant")
        return on_layout(layouts[0], const.value, scale=False, ctx=ctx, sign=sign)
    maps = [(data(v), s) for v, s in zip(inputs, signs) if not isinstance(v, Const)]
    if not maps:
        raise NotDecodable("all inputs are constants")
    channels = {x.channels for x, _ in maps}
    if len(channels) == 2 and 1 in channels:  # a one-channel map broadcast over the others (x - mean over C)
        wide = max(channels)
        maps = [(x if x.channels == wide else x.derive(channels=wide, bank=ctx.engine.take(x.bank, [0] * wide)), s)
                for x, s in maps]
        channels = {wide}
    spatial = {x.spatial for x, _ in maps}
    if len(channels) > 1 or len(spatial) > 1:
        raise NotDecodable(f"it broadcasts feature maps of different shapes (channels {sorted(channels)}, "
                           f"sizes {sorted(spatial)})")
    c, rank = channels.pop(), ctx.rank(node.output[0])
    try:
        shift = sum((s * per_channel(v.value, c, rank) for v, s in zip(inputs, signs) if isinstance(v, Const)),
                    np.zeros(c))
    except NotDecodable:
        raise PhaseDependent(POSITION_BIAS) from None
    banks = [x.bank if s == 1.0 else ctx.engine.affine(x.bank, s, 0.0) for x, s in maps]
    geom = union([x.geom for x, _ in maps])
    bank = ctx.engine.sum(banks, [x.geom for x, _ in maps], geom)
    return maps[0][0].derive(geom=geom, bank=ctx.engine.affine(bank, 1.0, shift))

