"""Add, Sub, Mul, Div, Sum: residual sums of feature maps and per-channel constants."""

from __future__ import annotations

import numpy as np

from ...errors import NotDecodable
from ...graph.geometry import union
from ..values import Const, Tensor
from ._rule import OpRule, data, per_channel

GATES = ("Sigmoid", "HardSigmoid", "Tanh", "HardSwish")


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
            x = data(x)
            return scale(x, per_channel(c.value, x.channels, ctx.rank(node.output[0])), ctx)
        gated = _self_gated(node, ctx)
        if gated is not None:
            return data(inputs[gated])
        held = ctx.held_gate(node)
        if held is not None:  # fds: the gate at its mean over the images (see _substitution)
            x = data(a) if ctx.spatial(node.input[0]) != (1, 1) else data(b)
            return scale(x, held, ctx)
        raise NotDecodable(
            "it multiplies two data-dependent tensors (a multiplicative gate such as squeeze-and-excitation), "
            "which has no data-free rule; decode it with images (fds or local mode)"
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


def add(inputs: list, signs: list[float], node, ctx) -> Tensor:
    """Signed sum of feature maps (aligned in image space) and per-channel constants."""
    maps = [(data(v), s) for v, s in zip(inputs, signs) if not isinstance(v, Const)]
    if not maps:
        raise NotDecodable("all inputs are constants")
    channels = {x.channels for x, _ in maps}
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


def _self_gated(node, ctx):
    """Index of x in x * sigmoid(x) (SiLU, swish): an elementwise nonlinearity, identity here."""
    for i, j in ((0, 1), (1, 0)):
        producer = ctx.producer(node.input[j])
        if producer is not None and producer.op_type in GATES and producer.input[0] == node.input[i]:
            return i
    return None
