"""What flows along the graph walker's edges: constants, decodable data tensors, layouts, blocks."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..graph.geometry import Geometry, Pair
from .engine import Bank


@dataclass
class Const:
    """A tensor known before any image is seen (initializer or folded subgraph)."""

    value: np.ndarray


@dataclass
class Tensor:
    """A data tensor [1, C, H, W] (or [1, C]) with its geometry and, when decoding, its bank.

    ``rows`` is set when the bank holds only those channels (a decode target's neurons).
    """

    geom: Geometry
    channels: int
    spatial: Pair
    bank: Bank | None = None
    rows: np.ndarray | None = None

    def derive(self, **changes) -> Tensor:
        return replace(self, **changes)


@dataclass
class Layout:
    """A data tensor being reshaped or transposed (e.g. a channel shuffle).

    ``index[...]`` is the flat position (c*H*W + y*W + x) in ``source`` of each element.
    """

    index: np.ndarray
    source: Tensor

    @property
    def channels_last(self) -> bool:
        """Whether this is the source map [1, C, H, W] seen as [1, H, W, C] (an NHWC transpose)."""
        (h, w), c = self.source.spatial, self.source.channels
        return self.index.shape == (1, h, w, c) and np.array_equal(
            self.index, np.arange(c * h * w).reshape(1, c, h, w).transpose(0, 2, 3, 1))


@dataclass
class Blocked:
    """A tensor that cannot be decoded; ``reason`` names the op, the node and why.

    ``per_position``: bottom-up cannot decode it, but the adjoint route can, one output position at a time (it
    follows an upsampling, ``PhaseDependent``)."""

    reason: str
    per_position: bool = False


def map_of(value) -> Tensor | None:
    """The feature map a value holds: a Tensor, or the source of a channels-last view of one (ConvNeXt's pointwise
    MatMul layers: the same neurons, each position's channels on the last axis); None otherwise."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, Layout) and value.channels_last:
        return value.source
    return None
