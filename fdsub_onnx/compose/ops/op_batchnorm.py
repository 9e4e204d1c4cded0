"""BatchNormalization (inference): a per-channel affine map folded into the bank."""

import numpy as np

from ...errors import NotDecodable
from ...graph.fold import scale_shift
from ..backend import array_module
from ._rule import OpRule, attributes, constant, data, on


class BatchNormalization(OpRule):
    linear = True
    channel_affine = True
    keeps_stack = True
    cone, cone_any_constant = "aligned", True
    keeps_neuron = True
    passes_gate = True  # per channel: the bank carries it

    def apply(self, node, inputs, ctx):
        attrs = attributes(node)
        if attrs.get("training_mode", 0):
            raise NotDecodable("training_mode=1 normalizes by batch statistics; export the model in eval mode")
        x = data(inputs[0])
        gamma, beta, mean, var = (constant(v, n).astype(np.float64)
                                  for v, n in zip(inputs[1:5], ("scale", "B", "mean", "var")))
        return x.derive(bank=ctx.engine.affine(x.bank, *scale_shift(node, gamma, beta, mean, var)))

    def backward(self, node, ins, is_data, out, grad):
        scale, shift = scale_shift(node, *(on(grad, v) for v in ins[1:5]), xp=array_module(grad))
        return [grad * scale[:, None, None]], array_module(grad).einsum("mkhw,k->m", grad, shift)
