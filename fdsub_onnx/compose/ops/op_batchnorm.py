"""BatchNormalization (inference): a per-channel affine map folded into the bank."""

import numpy as np

from ...errors import NotDecodable
from ._rule import OpRule, attributes, constant, data


def scale_shift(node, gamma, beta, mean, var, xp=np):
    """A BatchNormalization's ``(s, t)`` of ``y = s x + t`` per channel, in the arrays' module ``xp`` and dtype
    (the bank rule here, the backward rule of ``local``, the folding of ``compose.linear_model``)."""
    scale = gamma / xp.sqrt(var + attributes(node).get("epsilon", 1e-5))
    return scale, beta - mean * scale


class BatchNormalization(OpRule):
    def apply(self, node, inputs, ctx):
        attrs = attributes(node)
        if attrs.get("training_mode", 0):
            raise NotDecodable("training_mode=1 normalizes by batch statistics; export the model in eval mode")
        x = data(inputs[0])
        gamma, beta, mean, var = (constant(v, n).astype(np.float64)
                                  for v, n in zip(inputs[1:5], ("scale", "B", "mean", "var")))
        return x.derive(bank=ctx.engine.affine(x.bank, *scale_shift(node, gamma, beta, mean, var)))
