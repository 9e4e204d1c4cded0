"""Conv: the substitution step itself (groups, dilations, strides, pads, auto_pad); backwards, the transposed
convolution (``compose.kernels``)."""

import numpy as np
from onnx import helper

from ...graph.geometry import Window
from ..backend import array_module
from ..engine import composes_pieces
from ..kernels import transposed
from ._rule import OpRule, attributes, batched, constant, constant_weight, data, no_bias, on, optional
from ._window import apply_window


class Conv(OpRule):
    linear = True
    cone, cone_values = "window", "shapes"
    fds = "weight"
    default_layer = True

    def apply(self, node, inputs, ctx):
        attrs = attributes(node)
        bias = optional(inputs, 2)
        return apply_window(
            data(inputs[0]),
            node,
            ctx,
            constant(inputs[1], "weight"),
            None if bias is None else constant(bias, "bias"),
            int(attrs.get("group", 1)),
            attrs,
        )

    def backward(self, node, ins, is_data, out, grad):
        x, w = ins[0], on(grad, ins[1])
        attrs = attributes(node)
        gx = transposed(grad, w, int(attrs.get("group", 1)), Window.of(attrs, x.shape[2:], w.shape[2:]),
                        batched(x, grad))
        return [gx, None, None][: len(ins)], conv_bias(grad, ins)

    def substituted_node(self, node, stat, model, substitution, constants):
        name = f"{node.output[0]}::substituted"
        constants[name] = substitution.weight(node, np.asarray(model.constants[node.input[1]], np.float64))
        return helper.make_node(Conv.__name__, [node.input[0], name, *node.input[2:]], list(node.output),
                                name=node.name, **attributes(node))

    def flops(self, model, node, size):
        weight = constant_weight(model, node)
        return size if weight is None else 2.0 * size * np.prod(weight.shape[1:])

    def gradient_is_product(self, model, node):
        weight = constant_weight(model, node)
        return weight is not None and np.ndim(weight) > 1 and np.shape(weight)[1] > 1  # depthwise: strided adds

    def reads_stack(self, node, model):
        """A 1x1 convolution without groups composes a stack piece by piece (``engine.Engine.conv``)."""
        weight = constant_weight(model, node)
        return weight is not None and composes_pieces(np.shape(weight), int(attributes(node).get("group", 1)))

    def forward_product(self, model, node):
        if not self.gradient_is_product(model, node):
            return None
        return "dense" if int(attributes(node).get("group", 1)) == 1 else "slow"


def conv_bias(grad, ins):
    """The bias [M] a (transposed) convolution adds: its bias weighted by the output gradient."""
    has_bias = len(ins) > 2 and ins[2] is not None
    return array_module(grad).einsum("mkhw,k->m", grad, on(grad, ins[2])) if has_bias else no_bias(grad)
