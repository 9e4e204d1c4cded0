"""Conv: the substitution step itself (groups, dilations, strides, pads, auto_pad)."""

from ._rule import OpRule, attributes, constant, data, optional
from ._window import apply_window


class Conv(OpRule):
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
