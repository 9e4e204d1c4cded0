"""BatchNormalization (inference): a per-channel affine map folded into the bank."""

import numpy as np

from ...errors import NotDecodable
from ._rule import OpRule, attributes, constant, data


class BatchNormalization(OpRule):
    def apply(self, node, inputs, ctx):
        attrs = attributes(node)
        if attrs.get("training_mode", 0):
            raise NotDecodable("training_mode=1 normalizes by batch statistics; export the model in eval mode")
        x = data(inputs[0])
        gamma, beta, mean, var = (constant(v, n).astype(np.float64)
                                  for v, n in zip(inputs[1:5], ("scale", "B", "mean", "var")))
        scale = gamma / np.sqrt(var + attrs.get("epsilon", 1e-5))
        return x.derive(bank=ctx.engine.affine(x.bank, scale, beta - mean * scale))
