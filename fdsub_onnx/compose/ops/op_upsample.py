"""Resize, Upsample, ConvTranspose (FPN necks, U-Nets, segmentation heads): decoded per position, not bottom-up.

After an upsampling by s, neighbouring output positions read the same input positions in a pattern that
repeats every s steps: a neuron's filter depends on the phase of its output position. Bottom-up composition
holds one filter per channel, so it cannot represent that (``PhaseDependent``); the adjoint route decodes
these layers at one position at a time (``modes.adjoint``), and the layers below still decode bottom-up.
"""

from ...errors import PhaseDependent as NotDecodable
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
