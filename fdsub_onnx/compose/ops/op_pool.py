"""Pooling as a depthwise uniform window.

AveragePool is exact for interior neurons (count_include_pad only changes border windows). MaxPool, in
``weights`` mode, is an average over its window: the uniform switch of docs/method.md; in ``local`` mode its
gradient goes to each window's first maximum (onnxruntime's switch), in ``fds`` its switch is averaged.
"""

import numpy as np
from onnx import helper

from ...graph.geometry import Window
from ..backend import array_module
from ..kernels import maxpool_switches, padded_size, scatter_sum, transposed, window_counts
from ._rule import OpRule, attributes, averaged_node, batched, data, no_bias
from ._window import apply_window, uniform_window
from .op_conv import Conv

_MAX = {"adjoint": "a max is not linear; the adjoint runs on the linearized network, where it is an average"}


class AveragePool(OpRule):
    linear = True
    cone, cone_values = "average_window", "shapes"

    def apply(self, node, inputs, ctx):
        x = data(inputs[0])
        attrs = attributes(node)
        return apply_window(x, node, ctx, uniform_window(x.channels, attrs["kernel_shape"]), None, x.channels, attrs)

    def backward(self, node, ins, is_data, out, grad):
        """Each window's gradient spread evenly over its taps: over all k*k of them, or (``count_include_pad=0``,
        the default) over those inside the input, as onnxruntime divides border windows."""
        x, xp = ins[0], array_module(grad)
        attrs = attributes(node)
        window = Window.of(attrs, x.shape[2:])
        counts = window_counts(window, x.shape[2:], grad.shape[2:], bool(attrs.get("count_include_pad", 0)))
        even = bool((counts == counts.flat[0]).all())  # one divisor: it goes into the weight, not a pass over the map
        weight = xp.full((x.shape[1], 1, *window.kernel), 1.0 / counts.flat[0] if even else 1.0, grad.dtype)
        scaled = grad if even else grad * xp.asarray(1.0 / counts, grad.dtype)
        return [transposed(scaled, weight, x.shape[1], window, batched(x, grad))], no_bias(grad)

    def flops(self, model, node, size):
        return size * float(np.prod(attributes(node).get("kernel_shape", (1, 1))))

    def substituted_node(self, node, stat, model, substitution, constants):
        """A MaxPool of the model (an average in the linearized network): its mean switch as depthwise weights."""
        attrs = attributes(node)
        name = f"{node.output[0]}::substituted"
        channels = model.shapes[node.input[0]][1]
        constants[name] = np.asarray(stat, np.float64).reshape(channels, 1, *attrs["kernel_shape"])
        kept = {k: v for k, v in attrs.items() if k in ("strides", "pads", "dilations", "auto_pad")}
        return helper.make_node(Conv.__name__, [node.input[0], name], list(node.output), name=node.name,
                                group=int(channels), **kept)


class MaxPool(AveragePool):
    """Uniform switch in ``weights`` mode."""

    linear = False
    refuses = _MAX
    cone = "max_window"
    fds = "switch"

    def values_read(self, node, constants):
        """Its switches read the whole maps, input and output (a cone pass cuts neither: ``cone_values``)."""
        return "all"

    def backward(self, node, ins, is_data, out, grad):
        """The gradient goes to each window's first maximum (onnxruntime's switch: the first tap equal to the
        forward output). The switches are found once on the forward values (``maxpool_switches``); one
        ``scatter_sum`` then puts every instance's gradient there, repeated indices (overlapping windows) adding up."""
        x, xp = ins[0], array_module(grad)
        window = Window.of(attributes(node), x.shape[2:])
        c, h, w = x.shape[1:]
        qh, qw = out.shape[2:]
        size = padded_size((h, w), window, (qh, qw))
        switch = maxpool_switches(x, out, window)
        m, plane = len(grad), size[0] * size[1]
        base = (xp.arange(m)[:, None] * c + xp.arange(c)[None, :]) * plane  # [M, C]: each instance's plane start
        index = xp.broadcast_to(switch, (m, c, qh, qw)) + base[:, :, None, None]
        gpad = scatter_sum(index, grad, m * c * plane).reshape(m, c, *size)
        begin = window.begin
        return [gpad[:, :, begin[0] : begin[0] + h, begin[1] : begin[1] + w]], no_bias(grad)

    def linear_nodes(self, node, ctx):
        return [averaged_node(node, AveragePool.__name__, ctx.used, ctx.dilated_ok)]


class GlobalAveragePool(OpRule):
    linear = True

    def apply(self, node, inputs, ctx):
        x = data(inputs[0])
        return apply_window(x, node, ctx, uniform_window(x.channels, x.spatial), None, x.channels, {})

    def backward(self, node, ins, is_data, out, grad):
        x, xp = ins[0], array_module(grad)
        return [xp.broadcast_to(grad / int(np.prod(x.shape[2:])), batched(x, grad)).copy()], no_bias(grad)


class GlobalMaxPool(GlobalAveragePool):
    """Uniform switch in ``weights`` mode."""

    linear = False
    refuses = _MAX

    def backward(self, node, ins, is_data, out, grad):
        x, xp = ins[0], array_module(grad)
        flat = x.reshape(*x.shape[:2], -1)
        g = xp.zeros((len(grad), *flat.shape[1:]), grad.dtype)
        m, c = xp.indices(g.shape[:2])
        g[m, c, xp.broadcast_to(xp.argmax(flat, axis=2), g.shape[:2])] = grad.reshape(*grad.shape[:2])  # first max
        return [g.reshape(batched(x, grad))], no_bias(grad)

    def linear_nodes(self, node, ctx):
        return [averaged_node(node, GlobalAveragePool.__name__, ctx.used, ctx.dilated_ok)]
