"""Add, Sub, Mul, Div, Sum: residual sums of feature maps and per-channel constants."""

from __future__ import annotations

import numpy as np

from ...errors import NotDecodable
from ...graph.geometry import union
from ...graph.patterns import ChannelGate, SelfGated
from ..values import Const, Layout, Tensor
from ._rule import OpRule, data, per_channel


class Add(OpRule):
    def apply(self, node, inputs, ctx):
        return add(inputs, [1.0] * len(inputs), node, ctx)


class Sum(Add):
    """n-ary Add."""


class Sub(OpRule):
    def apply(self, node, inputs, ctx):
        return add(inputs, [1.0, -1.0], node, ctx)


class Mul(OpRule):
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


class Div(OpRule):
    def apply(self, node, inputs, ctx):
        a, b = inputs
        if not isinstance(b, Const):
            raise NotDecodable("it divides by a data-dependent tensor")
        x = data(a)
        divisor = per_channel(b.value, x.channels, ctx.rank(node.output[0]))
        if np.any(divisor == 0):
            raise NotDecodable("it divides by zero")
        return scale(x, 1.0 / divisor, ctx)


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
    shift = sum((s * per_channel(v.value, c, rank) for v, s in zip(inputs, signs) if isinstance(v, Const)), np.zeros(c))
    banks = [x.bank if s == 1.0 else ctx.engine.affine(x.bank, s, 0.0) for x, s in maps]
    geom = union([x.geom for x, _ in maps])
    bank = ctx.engine.sum(banks, [x.geom for x, _ in maps], geom)
    return maps[0][0].derive(geom=geom, bank=ctx.engine.affine(bank, 1.0, shift))

