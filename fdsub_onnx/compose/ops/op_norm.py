"""LayerNormalization over channels (ConvNeXt, written on a channels-last view of a map).

``y = (x - mean_c(x)) * r * gamma + beta`` with ``r = 1 / sqrt(var_c(x) + eps)``: the centring is linear (a
1x1 window ``I - 1/C`` over channels); ``r`` depends on the data at each position, so ``weights`` mode holds
it at one value, its mean over the positions of the reference input (``modes.gates``), as channel gates are.
"""

from __future__ import annotations

import numpy as np

from ...errors import NotDecodable
from ..values import Layout, Tensor
from ._rule import OpRule, attributes, constant, optional


def mix_channels(x: Tensor, matrix: np.ndarray, bias, ctx) -> Tensor:
    """``x`` with its channels mixed by ``matrix`` [C_out, C] (a 1x1 window): same geometry."""
    weight = np.asarray(matrix, np.float64)[:, :, None, None]
    bank = ctx.engine.conv(x.bank, weight, bias, 1, x.geom.tap_step((1, 1)), x.geom.rf)
    return x.derive(channels=int(matrix.shape[0]), bank=bank)


class LayerNormalization(OpRule):
    def apply(self, node, inputs, ctx):
        x = inputs[0]
        attrs = attributes(node)
        rank = len(ctx.shape(node.input[0]) or ())
        if not isinstance(x, Layout) or not x.channels_last or int(attrs.get("axis", -1)) % max(rank, 1) != rank - 1:
            raise NotDecodable("only a LayerNormalization over the channels of a channels-last map is read")
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
