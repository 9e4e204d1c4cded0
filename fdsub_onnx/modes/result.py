"""The result of every mode: the decoded filters of some neurons of one layer."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..graph.geometry import Geometry


@dataclass
class Decoded:
    """Decoded filters of some neurons of one layer.

    For neuron ``neurons[k]`` at output position (qy, qx) whose receptive field lies in
    the image: response = sum(filters[k] * image[:, oy+qy*sy : oy+qy*sy+ry, ox+qx*sx : ox+qx*sx+rx]) + bias[k].
    """

    filters: np.ndarray  # [K, C_image, R_y, R_x]
    bias: np.ndarray  # [K]
    neurons: np.ndarray  # [K]
    stride: tuple[int, int]
    origin: tuple[int, int]
    layer: str
    mode: str
    bounds: tuple[tuple[int, int], tuple[int, int]] | None = None  # set after a crop; see graph.geometry
    instance_filters: np.ndarray | None = None  # local/deconvnet --per-instance: [K, N, C, R_y, R_x]
    instance_bias: np.ndarray | None = None  # [K, N]
    instances: object = None  # the TopN a data-driven decode used (saved as top.npz)
    gates: dict = field(default_factory=dict)  # Mul output -> per-channel value each channel gate was held at

    @property
    def receptive_field(self) -> tuple[int, int]:
        return tuple(self.filters.shape[2:])

    @property
    def geometry(self) -> Geometry:
        """The layer's geometry as these filters carry it (stride, receptive field, origin, crop bounds)."""
        return Geometry(tuple(self.stride), self.receptive_field, tuple(self.origin), self.bounds)

    @property
    def degenerate(self) -> list[str | None]:
        """Per neuron, why its filter cannot stand for it ('not finite': an overflow or NaN, in the filter or its
        bias; 'all zero'), or None."""
        return [degenerate_kind(f, b) for f, b in zip(self.filters, self.bias)]

    def interior(self, image_size, out_size) -> np.ndarray:
        """Boolean [Q_y, Q_x] mask of output positions whose receptive field lies in the image (and bounds)."""
        return self.geometry.interior(image_size, out_size)


CONSTANT = 1e-6  # a filter whose range is at most this share of its peak is constant


def degenerate_kind(filters: np.ndarray, bias: float = 0.0, constant: bool = False) -> str | None:
    """'not finite', 'all zero' or (with ``constant``) 'constant' for a filter that shows nothing; None otherwise."""
    f = np.asarray(filters, np.float64)
    if not (np.isfinite(f).all() and np.isfinite(bias)):
        return "not finite"
    peak = float(np.abs(f).max()) if f.size else 0.0
    if peak == 0:
        return "all zero"
    if constant and f.size > 1 and float(np.ptp(f)) <= CONSTANT * peak:
        return "constant"
    return None
