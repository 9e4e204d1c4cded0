"""Instance windows and their mean per pixel: what `local`, `deconvnet` and the Neuron Feature share.

An instance's window ``[O + q*S, O + q*S + R)`` (per axis) may reach past the image. The part in the padding is
no evidence of the neuron's filter (nor of its patch), so a neuron's mean is taken per pixel, over the instances
whose window holds that pixel inside the image, each weighted by its instance weight (``instance_weights``): a
weighted denominator per pixel. A pixel inside no instance's window, or only inside those of weight 0, is 0.
Example: windows of 5 rows, two instances of weights 3 and 1, the first with its top 2 rows above the image:
those rows are the second's alone, the other 3 rows (3 * first + second) / 4.
"""

from __future__ import annotations

import numpy as np

from ..compose.backend import array_module


def field_part(geom, image_size, out_size) -> tuple[tuple[int, int], tuple[int, int]]:
    """(offset, size) of the part of the receptive field that meets the image for some output position
    (``Geometry.image_span``): all a window of any instance can hold inside the image, so all that `local`,
    `deconvnet` and the Neuron Feature keep. The whole field unless it is wider than the image allows:
    EfficientNet-Lite2's conv_head at 260 px keeps 516 x 516 px of its 1,115 x 1,115."""
    out_size = tuple(out_size) if len(out_size) == 2 else (1, 1)  # a vector layer: one position
    (y0, y1), (x0, x1) = geom.image_span(tuple(image_size), out_size)
    return (y0, x0), (y1 - y0, x1 - x0)


def cropped(geom, crop, size) -> dict:
    """The ``Decoded`` fields of filters cut to ``field_part``: none where that is the whole field."""
    if tuple(crop) == (0, 0) and tuple(size) == tuple(geom.rf):
        return {}
    return {"crop": tuple(crop), "field": tuple(geom.rf)}


def cut(maps, corners: np.ndarray, rf) -> np.ndarray:
    """[M, C, R_y, R_x]: the window of ``maps[m]`` ([M, C, H, W], NumPy or CuPy) at ``corners[m]``, zero outside."""
    (ry, rx), (h, w) = rf, maps.shape[2:]
    xp = array_module(maps)
    out = xp.zeros((len(maps), maps.shape[1], ry, rx), maps.dtype)
    for m, (y, x) in enumerate(np.asarray(corners, np.int64).reshape(-1, 2)):
        y0, y1, x0, x1 = max(y, 0), min(y + ry, h), max(x, 0), min(x + rx, w)
        if y1 > y0 and x1 > x0:
            out[m, :, y0 - y : y1 - y, x0 - x : x1 - x] = maps[m, :, y0:y1, x0:x1]
    return out


def inside(corners: np.ndarray, rf, size) -> np.ndarray:
    """[M, R_y, R_x] float64: 1 where the window at ``corners[m]`` lies inside an image of ``size`` (H, W), else 0."""
    corners = np.asarray(corners, np.int64).reshape(-1, 2)
    ys, xs = corners[:, :1] + np.arange(rf[0]), corners[:, 1:] + np.arange(rf[1])
    rows, cols = (ys >= 0) & (ys < size[0]), (xs >= 0) & (xs < size[1])
    return (rows[:, :, None] & cols[:, None, :]).astype(np.float64)


class PixelMean:
    """The weighted mean per pixel of the windows of K neurons' instances (module docstring), summed in float64
    in the order ``add`` is called."""

    def __init__(self, neurons: int, channels: int, rf, size):
        self.rf, self.size = tuple(rf), tuple(size)
        self.total = np.zeros((neurons, channels, *self.rf))
        self.mass = np.zeros((neurons, *self.rf))

    def add(self, rows: np.ndarray, corners: np.ndarray, weights: np.ndarray, windows: np.ndarray) -> None:
        """Instance m of neuron row ``rows[m]``: its window ``windows[m]`` [C, R_y, R_x] (zero outside the image),
        cut at ``corners[m]``, with weight ``weights[m]``."""
        rows, weights = np.asarray(rows), np.asarray(weights, np.float64)
        total = weights[:, None, None, None] * windows
        mass = weights[:, None, None] * inside(corners, self.rf, self.size)
        if len(np.unique(rows)) == len(rows):  # one instance per neuron (the usual batch): no repeats
            self.total[rows] += total
            self.mass[rows] += mass
        else:
            np.add.at(self.total, rows, total)
            np.add.at(self.mass, rows, mass)

    def mean(self) -> np.ndarray:
        """[K, C, R_y, R_x] float64: total / mass per pixel, 0 where the mass is 0."""
        return np.divide(self.total, self.mass[:, None], out=np.zeros_like(self.total), where=self.mass[:, None] > 0)
