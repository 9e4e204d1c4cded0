"""Resize, Upsample, ConvTranspose: refused with their reason (FPN necks, U-Nets, segmentation heads).

After an upsampling by s, neighbouring output positions read the same input positions in a pattern that
repeats every s steps: a neuron's filter depends on the phase of its output position. Bottom-up composition
holds one filter per channel, so it cannot represent that; the layers below still decode.
"""

from ...errors import NotDecodable
from ._rule import OpRule

PHASE = ("a neuron's filter after it depends on the phase of its output position (upsampling repeats input "
         "positions every scale steps), which one filter per channel cannot hold; the layers before it decode")


class Resize(OpRule):
    def apply(self, node, inputs, ctx):
        raise NotDecodable(f"it upsamples: {PHASE}")


class Upsample(Resize): ...


class ConvTranspose(OpRule):
    def apply(self, node, inputs, ctx):
        raise NotDecodable(f"a transposed convolution upsamples: {PHASE}")
