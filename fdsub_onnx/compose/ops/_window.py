"""Windowed ops (Conv, pooling, fully connected): geometry and composition in one place."""

from __future__ import annotations

import numpy as np

from ...errors import NotDecodable
from ...graph.geometry import Window
from ..values import Tensor


def apply_window(x: Tensor, node, ctx, weight: np.ndarray, bias, groups: int, attrs: dict) -> Tensor:
    """Compose ``x`` through a 2-D window op whose kernel is ``weight`` [C_out, C_in/g, k_y, k_x]."""
    kernel = tuple(weight.shape[2:])
    if len(kernel) != 2:
        raise NotDecodable(f"only 2-D windows are supported, kernel has {len(kernel)} spatial axes")
    if x.channels % groups or weight.shape[1] * groups != x.channels:
        raise NotDecodable(f"weight shape {list(weight.shape)} with group={groups} does not match "
                           f"{x.channels} input channels")
    window = Window.of(attrs, x.spatial, kernel)
    geom = x.geom.window(window.kernel, window.strides, window.dilations, window.begin)
    rows = ctx.rows(node)
    weight = ctx.substitute(node, weight)
    bank = ctx.engine.conv(x.bank, weight, bias, groups, x.geom.tap_step(window.dilations), geom.rf, rows=rows)
    return Tensor(geom, int(weight.shape[0]), ctx.spatial(node.output[0]), bank, rows)


def uniform_window(channels: int, kernel) -> np.ndarray:
    """Depthwise weights 1/(k_y*k_x): average pooling as a convolution.

    A read-only broadcast view: geometry alone needs only its shape, so a huge window costs no memory there.
    """
    kernel = tuple(int(k) for k in kernel)
    if min(kernel, default=1) < 1:
        raise NotDecodable(f"kernel {list(kernel)} has an empty axis")
    return np.broadcast_to(np.float64(1.0 / np.prod(kernel, dtype=np.float64)), (channels, 1, *kernel))
