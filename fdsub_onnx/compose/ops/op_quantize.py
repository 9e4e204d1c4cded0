"""Quantized graphs read as the affine maps they stand for (rounding and saturation ignored).

``QuantizeLinear`` is ``x / scale + zero_point`` and ``DequantizeLinear`` is ``(x - zero_point) * scale``,
per tensor or per channel; a QDQ pair around an activation therefore cancels, and a weight behind a
``DequantizeLinear`` is folded to float when the model is loaded. QOperator graphs and dynamic quantization
chains are rewritten to float ops at load (graph/dequantize.py); what reaches these rules is what that pass
left: ``QLinearConv`` is then the dequantized convolution between the two maps (its filters decode in the
quantized units of its output), and ``ConvInteger`` after ``DynamicQuantizeLinear`` is refused with the reason.
"""

from __future__ import annotations

import numpy as np
from onnx import helper

from ...errors import NotDecodable
from ..values import Layout
from ._rule import Nonlinear, OpRule, attributes, by_slope, constant, data, optional
from ._window import apply_window
from .op_elementwise import Identity


def axis_values(array, channels: int, axis: int, what: str) -> np.ndarray:
    """A per-tensor or per-axis quantization parameter as one value per channel [C] (axis must be 1)."""
    array = np.asarray(array, np.float64).reshape(-1)
    if array.size == 1:
        return np.full(channels, float(array[0]))
    if axis != 1 or array.size != channels:
        raise NotDecodable(f"its {what} has {array.size} values along axis {axis}; only per-tensor or "
                           "per-channel (axis 1) quantization is read")
    return array


def _params(node, inputs, channels: int) -> tuple[np.ndarray, np.ndarray]:
    axis = int(attributes(node).get("axis", 1))
    scale = axis_values(constant(inputs[1], "scale"), channels, axis, "scale")
    zero = optional(inputs, 2)
    zero = np.zeros(channels) if zero is None else axis_values(constant(zero, "zero point"), channels, axis,
                                                              "zero point")
    return scale, zero


class QuantizeLinear(Nonlinear):
    """Locally its scale (the offset holds zero point and rounding); fds passes a gate through it unchanged."""

    passes_gate = True

    def apply(self, node, inputs, ctx):
        return _affine(node, inputs, ctx, lambda scale, zero: (1.0 / scale, zero))

    def slope(self, xp, node, ins, out):
        """The scale broadcast along its axis (the offset ``out - d x`` then holds zero point and rounding)."""
        scale = xp.asarray(ins[1], dtype=out.dtype).reshape(-1)
        if scale.size > 1:
            shape = [1] * ins[0].ndim
            shape[int(attributes(node).get("axis", 1)) % ins[0].ndim] = scale.size
            scale = scale.reshape(shape)
        return scale if isinstance(self, DequantizeLinear) else 1 / scale

    def backward(self, node, ins, is_data, out, grad):
        return by_slope(self, node, ins, out, grad)



class DequantizeLinear(QuantizeLinear):
    def apply(self, node, inputs, ctx):
        return _affine(node, inputs, ctx, lambda scale, zero: (scale, -zero * scale))

    def linear_nodes(self, node, ctx):
        """A QDQ pair around data (same scale and zero point): x, as weights mode reads it (no rounding)."""
        quantize = ctx.producer.get(node.input[0])
        if (quantize is None or quantize.op_type != QuantizeLinear.__name__
                or list(quantize.input[1:]) != list(node.input[1:])):
            return None
        return [helper.make_node(Identity.__name__, [quantize.input[0]], [node.output[0]], name=node.name)]


def _affine(node, inputs, ctx, factors):
    """The per-channel affine map ``factors(scale, zero)`` of a map, or per-tensor of a pending reshape
    (a flattened map before a fully connected layer)."""
    if isinstance(inputs[0], Layout):
        source = inputs[0].source
        scale, zero = _params(node, inputs, 1)
        a, b = factors(scale, zero)
        return Layout(inputs[0].index, source.derive(bank=ctx.engine.affine(source.bank, a[0], b[0])))
    x = data(inputs[0])
    a, b = factors(*_params(node, inputs, x.channels))
    return x.derive(bank=ctx.engine.affine(x.bank, a, b))


class QLinearConv(OpRule):
    """``y_q = conv((x_q - x_zp) * x_s, (w_q - w_zp) * w_s) + B * x_s * w_s) / y_s + y_zp``."""

    refuses = {"backward": "QOperator convolutions have no backward rule; quantize in QDQ format",
               "adjoint": "QOperator convolutions have no backward rule; quantize in QDQ format"}

    def apply(self, node, inputs, ctx):
        x = data(inputs[0])
        attrs = attributes(node)
        x_scale, x_zero = (float(np.asarray(constant(v, n)).reshape(-1)[0])
                           for v, n in ((inputs[1], "input scale"), (inputs[2], "input zero point")))
        w_q = np.asarray(constant(inputs[3], "weight"), np.float64)
        k = w_q.shape[0]
        w_scale = axis_values(constant(inputs[4], "weight scale"), k, 1, "weight scale")
        w_zero = axis_values(constant(inputs[5], "weight zero point"), k, 1, "weight zero point")
        y_scale, y_zero = (float(np.asarray(constant(v, n)).reshape(-1)[0])
                           for v, n in ((inputs[6], "output scale"), (inputs[7], "output zero point")))
        weight = (w_q - w_zero[:, None, None, None]) * w_scale[:, None, None, None]
        bias = optional(inputs, 8)
        bias = np.zeros(k) if bias is None else np.asarray(constant(bias, "bias"), np.float64) * x_scale * w_scale
        x = x.derive(bank=ctx.engine.affine(x.bank, x_scale, -x_zero * x_scale))
        y = apply_window(x, node, ctx, weight, bias, int(attrs.get("group", 1)), attrs)
        return y.derive(bank=ctx.engine.affine(y.bank, 1.0 / y_scale, y_zero))


class DynamicQuantizeLinear(OpRule):
    refuses = {"backward": "dynamic quantization has no backward rule; quantize statically",
               "adjoint": "dynamic quantization has no backward rule; quantize statically"}

    def apply(self, node, inputs, ctx):
        raise NotDecodable("dynamic quantization computes its scale from each input, so no filter holds for all "
                           "inputs, and this chain is not DynamicQuantizeLinear -> ConvInteger/MatMulInteger -> Cast "
                           "-> Mul(scales) with constant weights, which is read as a float op; quantize statically "
                           "or decode the float model")


class ConvInteger(DynamicQuantizeLinear):
    """Fed by DynamicQuantizeLinear in the exports seen (refused there with the reason)."""
