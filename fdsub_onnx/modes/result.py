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

    def interior(self, image_size, out_size) -> np.ndarray:
        """Boolean [Q_y, Q_x] mask of output positions whose receptive field lies in the image (and bounds)."""
        return self.geometry.interior(image_size, out_size)
