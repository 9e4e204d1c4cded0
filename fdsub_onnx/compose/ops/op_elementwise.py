"""Elementwise ops: pass-through ops, rectifiers, smooth nonlinearities (read by their slope), LRN, Softmax.

In ``weights`` mode each is the identity (docs/method.md): it keeps a pending reshape (Layout) as it is, so e.g. a
Relu inside a channel shuffle does not break it; LRN mixes neighbouring channels and is treated as identity too,
as its effect is a local contrast normalization. In ``local`` mode each is its exact linearization at the
instance: a rectifier its forward on/off mask, a smooth op its slope there with the offset ``f(x) - f'(x) x`` as
the bias it adds; ``deconvnet`` rectifies the backward signal instead (Zeiler & Fergus).
"""

from __future__ import annotations

import math

from onnx import TensorProto

from ...errors import NotDecodable, PhaseDependent
from ..backend import array_module
from ..values import Layout, Tensor
from ._rule import NO_BANK_RULE, Nonlinear, attributes, by_slope, identity_node, no_bias, per_instance

#: the float element types (onnx.TensorProto) a Cast may go to and stay the identity
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16)


class Elementwise(Nonlinear):
    """Read as the identity in ``weights`` mode; the cone pass reads it position by position."""

    family = True

    cone = "aligned"
    keeps_neuron = True

    def apply(self, node, inputs, ctx):
        if not isinstance(inputs[0], (Tensor, Layout)):
            raise NotDecodable("expected a feature map input, got a constant")
        return inputs[0]

    def linear_nodes(self, node, ctx):
        return [identity_node(node, ctx.used)]


class Identity(Elementwise):
    linear = True
    refuses = {}
    passes_gate = True

    def backward(self, node, ins, is_data, out, grad):
        return [grad] + [None] * (len(ins) - 1), no_bias(grad)


class Dropout(Identity): ...


class Cast(Identity):
    """A cast between float types (a half-precision model read as float32, ``graph.precision``): the identity. A
    cast of the data to an integer or boolean type is refused (shape arithmetic's casts are folded before)."""

    def apply(self, node, inputs, ctx):
        if attributes(node).get("to") not in FLOAT_TYPES:
            raise NotDecodable("it casts the data to a non-float type")
        return super().apply(node, inputs, ctx)

    def linear_nodes(self, node, ctx):
        """Kept as it is: in the linearized network a cast of shape arithmetic (int32 to int64) must stay a cast."""
        return None


class Relu(Elementwise):
    cone_values = "inputs"  # its mask reads the input alone
    passes_gate = gate_slope = True

    def backward(self, node, ins, is_data, out, grad):
        """The forward on/off mask: the exact local linearization."""
        return [grad * (ins[0] > 0)], no_bias(grad)

    def deconvnet(self, node, ins, is_data, out, grad):
        """Zeiler & Fergus: the backward signal itself rectified (the forward mask is not used)."""
        return [array_module(grad).maximum(grad, 0)] + [None] * (len(ins) - 1), no_bias(grad)


class Slope(Elementwise):
    """An op whose local linearization is its slope at the forward value (``slope``), the offset its bias."""

    family = True
    passes_gate = gate_slope = True

    def slope(self, xp, node, ins, out):
        raise NotImplementedError

    def backward(self, node, ins, is_data, out, grad):
        return by_slope(self, node, ins, out, grad)


def _leaky_signal(grad, ins, alpha):
    """A leaky rectifier applied to the backward signal: g where g > 0, alpha * g below (the forward is not used)."""
    xp = array_module(grad)
    return [xp.where(grad > 0, grad, alpha * grad)] + [None] * (len(ins) - 1), no_bias(grad)


class LeakyRelu(Slope):
    def slope(self, xp, node, ins, out):
        return xp.where(ins[0] > 0, 1.0, attributes(node).get("alpha", 0.01))

    def deconvnet(self, node, ins, is_data, out, grad):
        return _leaky_signal(grad, ins, attributes(node).get("alpha", 0.01))


class PRelu(Slope):
    cone_any_constant = True

    def slope(self, xp, node, ins, out):
        return xp.where(ins[0] > 0, 1.0, xp.asarray(ins[1], out.dtype))

    def deconvnet(self, node, ins, is_data, out, grad):
        return _leaky_signal(grad, ins, array_module(grad).asarray(ins[1], grad.dtype))


class Clip(Slope):
    cone_any_constant = True

    def slope(self, xp, node, ins, out):
        return (out == ins[0]).astype(out.dtype)

    def deconvnet(self, node, ins, is_data, out, grad):
        """A Clip whose lower bound is 0 (ReLU6) is a rectifier: the backward signal rectified; any other Clip keeps
        its forward slope (``local``)."""
        low = attributes(node).get("min") if len(ins) < 2 or ins[1] is None else float(ins[1].reshape(-1)[0])
        if low is not None and float(low) == 0.0:
            return Relu.deconvnet(self, node, ins, is_data, out, grad)
        return self.backward(node, ins, is_data, out, grad)


class HardSigmoid(Slope):
    def slope(self, xp, node, ins, out):
        attrs = attributes(node)
        inner = attrs.get("alpha", 0.2) * ins[0] + attrs.get("beta", 0.5)
        return xp.where((inner > 0) & (inner < 1), attrs.get("alpha", 0.2), 0.0)


class HardSwish(Slope):
    def slope(self, xp, node, ins, out):
        x = ins[0]
        return xp.where(x < -3, 0.0, xp.where(x > 3, 1.0, x / 3 + 0.5))


class Sigmoid(Slope):
    def slope(self, xp, node, ins, out):
        return out * (1 - out)


class Tanh(Slope):
    def slope(self, xp, node, ins, out):
        return 1 - out**2


class Softplus(Slope):
    def slope(self, xp, node, ins, out):
        return 1 / (1 + xp.exp(-ins[0]))


class Elu(Slope):
    def slope(self, xp, node, ins, out):
        return xp.where(ins[0] > 0, 1.0, out + attributes(node).get("alpha", 1.0))


class Selu(Slope):
    def slope(self, xp, node, ins, out):
        attrs = attributes(node)
        alpha, gamma = attrs.get("alpha", 1.67326319217681884765625), attrs.get("gamma", 1.05070102214813232421875)
        return xp.where(ins[0] > 0, gamma, out + gamma * alpha)


class Celu(Slope):
    def slope(self, xp, node, ins, out):
        return xp.where(ins[0] > 0, 1.0, out / attributes(node).get("alpha", 1.0) + 1)


class Gelu(Slope):
    def slope(self, xp, node, ins, out):
        """x * Phi(x): Phi read off the forward value (out / x; NumPy has no erf), or the tanh form's own slope."""
        x = ins[0]
        if attributes(node).get("approximate", "none") == "tanh":
            k = math.sqrt(2 / math.pi)
            t = xp.tanh(k * (x + 0.044715 * x**3))
            return 0.5 * (1 + t) + 0.5 * x * (1 - t**2) * k * (1 + 3 * 0.044715 * x**2)
        small = xp.abs(x) < 1e-6
        phi = xp.where(small, 0.5, out / xp.where(small, 1.0, x))
        return phi + x * xp.exp(-(x**2) / 2) / math.sqrt(2 * math.pi)


class Mish(Slope):
    def slope(self, xp, node, ins, out):
        x = ins[0]
        t = xp.tanh(xp.logaddexp(0, x))  # tanh(softplus(x))
        return t + x * (1 - t**2) / (1 + xp.exp(-x))


class Erf(Slope):
    """Inside GELU's exact form (``graph.patterns`` reads the product); alone it has no bank rule."""

    keeps_neuron = False
    refuses = Slope.refuses | {"apply": NO_BANK_RULE}

    def linear_nodes(self, node, ctx):
        return None

    def slope(self, xp, node, ins, out):
        return 2 / math.sqrt(math.pi) * xp.exp(-ins[0] ** 2)


class _NormPart(Slope):
    """A step of a normalization's scale written out (RMSNorm's and a legacy LayerNorm's ``Sqrt``, ``Pow``,
    ``Reciprocal``): ``graph.patterns.TokenScale`` holds the scale it computes; alone it has no bank rule, and
    ``local`` follows its slope."""

    family = True
    keeps_neuron = False
    refuses = Slope.refuses | {"apply": NO_BANK_RULE}

    def linear_nodes(self, node, ctx):
        return None


class Sqrt(_NormPart):
    def slope(self, xp, node, ins, out):
        return 0.5 / out


class Reciprocal(_NormPart):
    def slope(self, xp, node, ins, out):
        return -(out**2)


class Pow(_NormPart):
    def slope(self, xp, node, ins, out):
        """``p x^(p-1)`` for a constant exponent p (a data exponent is refused)."""
        p = xp.asarray(ins[1], out.dtype) if len(ins) > 1 and ins[1] is not None else None
        if p is None or p.size != 1:
            raise NotDecodable("only a power by one constant is followed")
        return p * ins[0] ** (p - 1)


class LRN(Elementwise):
    cone_any_constant = True
    passes_gate = True  # fds treats it as the identity

    def backward(self, node, ins, is_data, out, grad):
        """LRN's linearization at the instance: its Jacobian across the channel window (vector-Jacobian product),
        with the offset ``out - J x`` as the bias it adds, so that the local identity stays exact.

        y_c = x_c d_c^-b with d_c = bias + a/n S_c and S_c the sum of x^2 over channels [c - lo, c + hi]."""
        x = ins[0]
        attrs = attributes(node)
        size, alpha = int(attrs["size"]), attrs.get("alpha", 1e-4)
        beta, bias = attrs.get("beta", 0.75), attrs.get("bias", 1.0)
        lo, hi = (size - 1) // 2, size // 2  # floor and ceil of (size - 1) / 2
        squares = _channel_window_sum(x**2, lo, hi)
        d = bias + alpha / size * squares
        scale = d**-beta  # y = x * scale
        coupling = 2 * alpha * beta / size * x * scale / d  # -dy_c/dx_c' = coupling_c * x_c' for c' in c's window
        gx = grad * scale - x * _channel_window_sum(grad * coupling, hi, lo)  # the window, transposed
        offset = coupling * squares  # out - J x
        return [gx], per_instance(grad * offset)


def _channel_window_sum(a, lo, hi):
    """``sum(a[:, c - lo : c + hi + 1])`` for every channel c (zeros beyond the edges): one shifted add per offset."""
    xp = array_module(a)
    channels = a.shape[1]
    padded = xp.concatenate([xp.zeros_like(a[:, :lo]), a, xp.zeros_like(a[:, :hi])], axis=1)
    total = padded[:, : channels].copy()
    for t in range(1, lo + hi + 1):
        total += padded[:, t : t + channels]
    return total


class Softmax(Elementwise):
    """A normalization over one axis. An attention matrix is held where the product reads it
    (``graph.patterns.Attention``), so bottom-up composition refuses a softmax of a map (it mixes the channels at
    each position nonlinearly) while letting a per-position decode pass (the linearized network reads a softmax
    that no product holds as the identity); in ``local`` its Jacobian at the instance, ``g_x = y (g - sum(g y))``
    over the axis, the offset ``y - J x`` the bias."""

    keeps_neuron = False
    cone = None  # over any axis, not position by position

    def apply(self, node, inputs, ctx):
        if isinstance(inputs[0], Layout):  # over a reshaped map (YOLOv8's distribution focal loss head)
            raise PhaseDependent("a softmax over a reshaped map (a detection head's distribution over bins): read as "
                                 "the identity, the layers after it decode per position")
        raise NotDecodable("a softmax over a feature map mixes its channels nonlinearly; weights mode reads a softmax "
                           "only as an attention matrix, held where a product reads it")

    def backward(self, node, ins, is_data, out, grad):
        axis = int(attributes(node).get("axis", -1))
        x, y = ins[0], out
        gx = y * (grad - (grad * y).sum(axis=axis, keepdims=True))
        offset = y - y * (x - (y * x).sum(axis=axis, keepdims=True))  # y - J x
        return [gx], per_instance(grad * offset)
