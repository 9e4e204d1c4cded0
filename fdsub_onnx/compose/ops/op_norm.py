"""LayerNormalization over channels (ConvNeXt, written on a channels-last view of a map).

``y = (x - mean_c(x)) * r * gamma + beta`` with ``r = 1 / sqrt(var_c(x) + eps)``: the centring is linear (a
1x1 window ``I - 1/C`` over channels); ``r`` depends on the data at each position, so ``weights`` mode holds
it at one value, its mean over the positions of the reference input (``modes.gates``), as channel gates are.
"""

from __future__ import annotations

import numpy as np
from onnx import helper

from ...errors import NotDecodable, PhaseDependent
from ..backend import array_module
from ..values import Layout, Tensor
from ._rule import OpRule, attributes, constant, on, optional, per_instance
from .op_arithmetic import Add, Mul, Sub
from .op_layout import Reshape
from .op_reduce import ReduceMean


def mix_channels(x: Tensor, matrix: np.ndarray, bias, ctx) -> Tensor:
    """``x`` with its channels mixed by ``matrix`` [C_out, C] (a 1x1 window): same geometry."""
    weight = np.asarray(matrix, np.float64)[:, :, None, None]
    bank = ctx.engine.conv(x.bank, weight, bias, 1, x.geom.tap_step((1, 1)), x.geom.rf)
    return x.derive(channels=int(matrix.shape[0]), bank=bank)


def _epsilon(node) -> float:
    return float(attributes(node).get("epsilon", 1e-5))


class LayerNormalization(OpRule):
    held_factor = True
    refuses = {"adjoint": "its 1/std depends on the data; the linearized network holds it (modes.gates)"}

    def inverse_std(self, node, x):
        """Per image [count, 1]: 1/sqrt(var + eps) over the last axis, averaged over the positions."""
        return (1 / np.sqrt(x.var(axis=-1) + _epsilon(node))).reshape(len(x), -1).mean(axis=1)[:, None]

    def apply(self, node, inputs, ctx):
        x = inputs[0]
        attrs = attributes(node)
        rank = len(ctx.shape(node.input[0]) or ())
        if int(attrs.get("axis", -1)) % max(rank, 1) != rank - 1:
            raise NotDecodable("only a LayerNormalization over the last axis is read")
        if not isinstance(x, Layout) or not x.channels_last:  # over tokens: held per position by the adjoint
            raise PhaseDependent("a LayerNormalization over tokens: its 1/std is held and the layers after it decode "
                                 "per position")
        source = x.source
        c = source.channels
        gamma = np.broadcast_to(np.asarray(constant(inputs[1], "scale"), np.float64).reshape(-1), (c,))
        beta = optional(inputs, 2)
        beta = np.zeros(c) if beta is None else np.broadcast_to(np.asarray(constant(beta, "bias"), np.float64)
                                                               .reshape(-1), (c,))
        centred = mix_channels(source, np.eye(c) - 1.0 / c, None, ctx)
        held = ctx.held_gate(node)
        if held is None:
            if source.bank is None:
                return Layout(x.index, centred)  # geometry only
            raise NotDecodable("its normalization has no held value")
        scale = float(np.asarray(held).reshape(-1)[0]) * gamma
        return Layout(x.index, centred.derive(bank=ctx.engine.affine(centred.bank, scale, beta)))

    def backward(self, node, ins, is_data, out, grad):
        """LayerNormalization over the last axis, linearized at the instance (``_normalized_tangent``)."""
        x = ins[0]
        attrs = attributes(node)
        if int(attrs.get("axis", -1)) % x.ndim != x.ndim - 1:
            raise NotDecodable("only a LayerNormalization over the last axis is supported")
        gamma = on(grad, ins[1])
        beta = on(grad, ins[2]) if len(ins) > 2 and ins[2] is not None else 0.0
        gx, offset = _normalized_tangent(x, grad, gamma, beta, _epsilon(node), (-1,))
        return [gx] + [None] * (len(ins) - 1), per_instance(grad * offset)

    def linear_nodes(self, node, ctx):
        """Held (``ctx.gates``): over the last axis with its 1/std r held, ``(x - mean(x)) * (r * scale) + bias``."""
        if node.output[0] not in ctx.gates:
            return None
        inverse_std = float(np.asarray(ctx.gates[node.output[0]]).reshape(-1)[0])
        x, out, name = node.input[0], node.output[0], node.name or node.output[0]
        nodes, scaled = _held_centring(x, out, name, np.asarray(inverse_std, np.float32), ctx)
        nodes.append(helper.make_node(Mul.__name__, [scaled, node.input[1]],
                                      [out + ("::gamma" if len(node.input) > 2 else "")], name=f"{name}::scale"))
        if len(node.input) > 2 and node.input[2]:
            nodes.append(helper.make_node(Add.__name__, [out + "::gamma", node.input[2]], [out], name=name))
        shape = ctx.shapes.get(x)
        if shape is not None:  # the tensors it adds: the mean keeps the last axis as 1
            ctx.shapes.update({n.output[0]: shape for n in nodes[1:] if n.output[0] not in ctx.shapes})
            ctx.shapes[f"{out}::mean"] = (*shape[:-1], 1)
        return nodes


class InstanceNormalization(OpRule):
    """Each channel normalized over its positions (axes 2 on): an instance norm on a map, or torch's export of a
    GroupNorm, which reshapes a map to ``[N, G, C/G * H * W]`` and normalizes each group so. Its 1/std is held per
    channel (the reference's, as a layer norm's); its centring is a mean over the whole map, so the layers after it
    decode per position; ``local`` takes its exact Jacobian. ``GroupNormalization`` is the same reading with groups
    of channels."""

    held_factor = True
    keeps_neuron = True  # each channel normalized on its own: the dead-neuron probe follows a layer through it
    refuses = {"adjoint": "its 1/std depends on the data; the linearized network holds it (modes.gates)"}

    def groups(self, node, channels: int) -> int:
        """How many groups of channels are normalized together: one per channel."""
        return channels

    def per_channel(self, value, channels: int) -> np.ndarray:
        """A scale or bias [C] (GroupNormalization-18's per group, repeated over each group's channels)."""
        value = np.asarray(value).reshape(-1)
        return np.repeat(value, channels // len(value)) if len(value) != channels else value

    def inverse_std(self, node, x):
        """Per image and group [count, G]: 1/sqrt(var + eps) over each group's channels and positions."""
        return 1 / np.sqrt(x.reshape(len(x), self.groups(node, x.shape[1]), -1).var(axis=2) + _epsilon(node))

    def apply(self, node, inputs, ctx):
        raise PhaseDependent(f"a {node.op_type} centres each channel over the whole map and holds its 1/std: the "
                             "layers after it decode per position")

    def backward(self, node, ins, is_data, out, grad):
        """Per group over its channels and positions, as LayerNormalization's over the last axis: g' = g * scale,
        g_x = r (g' - mean(g') - x^ mean(g' x^)); the offset ``out - J x`` = ``bias + scale x^ (1 - eps r^2)``."""
        xp, x = array_module(grad), ins[0]
        channels = x.shape[1]
        g = self.groups(node, channels)

        def grouped(value):  # [count, G, C/G * positions]
            return value.reshape(len(value), g, -1)

        def spread(value):  # a per-channel constant over the positions, grouped
            per_channel = on(grad, self.per_channel(value, channels)).reshape((1, channels) + (1,) * (x.ndim - 2))
            return grouped(xp.broadcast_to(per_channel, (1, *x.shape[1:])))

        gx, offset = _normalized_tangent(grouped(x), grouped(grad), spread(ins[1]), spread(ins[2]), _epsilon(node),
                                         (2,))
        return [gx.reshape(grad.shape), None, None], per_instance(grouped(grad) * offset)

    def linear_nodes(self, node, ctx):
        """Held (``ctx.gates``: 1/std per group): the map grouped to ``[N, G, L]`` (where it is not already so),
        ``(x - mean over L) * r``, back to its shape, times the scale and plus the bias per channel; None (the node
        kept, which the adjoint refuses) without a shape, a constant scale and bias, or the held value."""
        x, out, name = node.input[0], node.output[0], node.name or node.output[0]
        shape = ctx.shapes.get(x)
        if out not in ctx.gates or shape is None or len(shape) < 3 or not all(
                n in ctx.constants for n in node.input[1:3]):
            return None
        channels = int(shape[1])
        g = self.groups(node, channels)
        held = np.broadcast_to(np.asarray(ctx.gates[out], np.float64).reshape(-1), (g,))
        nodes, source = [], x
        if len(shape) != 3 or g != channels:
            source = f"{out}::grouped"
            ctx.held[f"{source}::shape"] = np.asarray([0, g, -1], np.int64)
            nodes.append(helper.make_node(Reshape.__name__, [x, f"{source}::shape"], [source], name=f"{name}::group"))
            ctx.shapes[source] = (shape[0], g, int(np.prod(shape[1:])) // g)
        centring, scaled = _held_centring(source, out, name, held.astype(np.float32).reshape(1, g, 1), ctx)
        nodes += centring
        ctx.shapes.update({f"{out}::centred": ctx.shapes.get(source, shape), scaled: ctx.shapes.get(source, shape),
                           f"{out}::mean": (*ctx.shapes.get(source, shape)[:-1], 1)})
        if source != x:
            back = f"{out}::ungrouped"
            ctx.held[f"{back}::shape"] = np.asarray([0, *shape[1:]], np.int64)
            nodes.append(helper.make_node(Reshape.__name__, [scaled, f"{back}::shape"], [back], name=f"{name}::back"))
            ctx.shapes[back], scaled = tuple(shape), back
        per_channel = (1, channels) + (1,) * (len(shape) - 2)
        scale, shift = f"{out}::scale", f"{out}::shift"
        ctx.held[scale], ctx.held[shift] = (self.per_channel(ctx.constants[n], channels).astype(np.float32)
                                            .reshape(per_channel) for n in node.input[1:3])
        nodes += [helper.make_node(Mul.__name__, [scaled, scale], [f"{out}::scaled_affine"], name=f"{name}::scale"),
                  helper.make_node(Add.__name__, [f"{out}::scaled_affine", shift], [out], name=name)]
        ctx.shapes[f"{out}::scaled_affine"] = tuple(shape)
        return nodes


class GroupNormalization(InstanceNormalization):
    """Channels normalized in ``num_groups`` groups over their channels and positions (opset 18: scale and bias per
    group; opset 21: per channel): read as InstanceNormalization's reading on groups of channels."""

    keeps_neuron = False  # a channel's value depends on its group's other channels

    def groups(self, node, channels: int) -> int:
        return int(attributes(node).get("num_groups", channels))


def _normalized_tangent(x, grad, gamma, beta, eps: float, axes: tuple):
    """``(input gradient, offset)`` of ``gamma * (x - mean) / std + beta`` over ``axes``, linearized at ``x``: with
    x^ = (x - mean) r, r = 1/std and g' = g gamma, ``r (g' - mean(g') - x^ mean(g' x^))``; the offset ``out - J x``
    is ``beta + gamma x^ (1 - eps r^2)``, so the local identity stays exact."""
    xp = array_module(grad)
    centred = x - x.mean(axis=axes, keepdims=True)
    r = 1 / xp.sqrt((centred**2).mean(axis=axes, keepdims=True) + eps)
    hat = centred * r
    g = grad * gamma
    gx = r * (g - g.mean(axis=axes, keepdims=True) - hat * (g * hat).mean(axis=axes, keepdims=True))
    return gx, beta + gamma * hat * (1 - eps * r**2)


def _held_centring(x: str, out: str, name: str, factor: np.ndarray, ctx) -> tuple[list, str]:
    """``(nodes, output)``: ``(x - mean over the last axis) * factor``, the norm's 1/std held in ``factor`` (a
    constant the nodes add to ``ctx.held``), for the rest of its linearized nodes (of norm ``out``, node ``name``)
    to scale and shift."""
    mean, centred, scaled, held = f"{out}::mean", f"{out}::centred", f"{out}::scaled", f"{out}::factor"
    ctx.held[held] = factor
    if ctx.opset >= 18:
        ctx.held[f"{out}::axes"] = np.asarray([-1], np.int64)
        reduce = helper.make_node(ReduceMean.__name__, [x, f"{out}::axes"], [mean], name=f"{name}::mean", keepdims=1)
    else:
        reduce = helper.make_node(ReduceMean.__name__, [x], [mean], name=f"{name}::mean", axes=[-1], keepdims=1)
    return [reduce, helper.make_node(Sub.__name__, [x, mean], [centred], name=f"{name}::centre"),
            helper.make_node(Mul.__name__, [centred, held], [scaled], name=f"{name}::held")], scaled
