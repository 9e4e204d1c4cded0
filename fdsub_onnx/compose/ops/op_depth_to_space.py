"""DepthToSpace (the pixel shuffle of super-resolution and segmentation heads): channel blocks moved into space.

``y[c, h*b + i, w*b + j] = x[channel(c, i, j), h, w]`` with ``channel = (i*b + j)*C + c`` (DCR, the default) or
``c*b*b + i*b + j`` (CRD). Like an upsampling, neighbouring output positions read different input channels in a
pattern that repeats every b steps: a neuron's filter after it depends on the phase of its position, which one
filter per channel cannot hold (``PhaseDependent``); the adjoint route decodes those layers a position at a time
with the backward rule, the exact inverse permutation (SpaceToDepth of the gradient).
"""

from __future__ import annotations

import numpy as np

from ...errors import NotDecodable, PhaseDependent
from ..backend import array_module
from ._rule import OpRule, attributes, no_bias

#: the axes of ``[N, b, b, C, H, W]`` (DCR) or ``[N, C, b, b, H, W]`` (CRD) in the order of ``[N, C, H, b, W, b]``
ORDER = {"DCR": (0, 3, 4, 1, 5, 2), "CRD": (0, 1, 4, 2, 5, 3)}


class DepthToSpace(OpRule):
    linear = True

    def apply(self, node, inputs, ctx):
        raise PhaseDependent("it moves channel blocks into space (a pixel shuffle): a neuron's filter after it depends "
                             "on the phase of its output position, which one filter per channel cannot hold; the "
                             "layers before it decode")

    def backward(self, node, ins, is_data, out, grad):
        attrs = attributes(node)
        b, mode = int(attrs["blocksize"]), attrs.get("mode", "DCR")
        if mode not in ORDER:
            raise NotDecodable(f"mode {mode!r} is not DCR or CRD")
        m, c, h, w = grad.shape[0], grad.shape[1], grad.shape[2] // b, grad.shape[3] // b
        split = grad.reshape(m, c, h, b, w, b).transpose(np.argsort(ORDER[mode]))  # the forward's axes, undone
        return [array_module(grad).ascontiguousarray(split).reshape(m, c * b * b, h, w)], no_bias(grad)
