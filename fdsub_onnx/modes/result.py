"""The result of every mode: the decoded filters of some neurons of one layer."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..defaults import html_view
from ..graph.geometry import Geometry


@dataclass
class Decoded:
    """Decoded filters of some neurons of one layer.

    For neuron ``neurons[k]`` at output position (qy, qx) whose receptive field lies in the image (``exact_at``
    "interior"), or at ``position`` alone (``exact_at`` "position": a position whose field reads padding, or a
    layer after an upsampling, whose ``stride`` is then (0, 0)), with the image zero-extended beyond its border:
    response = sum(filters[k] * image[:, oy+qy*sy : oy+qy*sy+ry, ox+qx*sx : ox+qx*sx+rx]) + bias[k].

    ``filters`` may hold only part of the receptive field: the rows and columns that overlap the image for some
    output position (``crop`` is the offset of that part in the field of size ``field``; ``origin`` is that of
    the part held). The formula is the same: what was left out never meets a pixel.
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
    position: tuple[int, int] | None = None  # the output position a weights decode was made at
    exact_at: str = "interior"  # where the formula holds: "interior" positions, or "position" alone
    crop: tuple[int, int] = (0, 0)  # offset of ``filters`` in the receptive field
    field: tuple[int, int] | None = None  # the whole receptive field (None: that of ``filters``)
    plan: object = None  # how a weights decode was computed (``modes.plan.Plan``)

    @property
    def receptive_field(self) -> tuple[int, int]:
        return tuple(self.filters.shape[2:])

    @property
    def geometry(self) -> Geometry:
        """The layer's geometry (stride, whole receptive field, its origin, crop bounds)."""
        rf = tuple(self.field) if self.field is not None else self.receptive_field
        origin = (self.origin[0] - self.crop[0], self.origin[1] - self.crop[1])
        return Geometry(tuple(self.stride), rf, origin, self.bounds)

    def __repr__(self) -> str:
        """One screen in a notebook: what was decoded and how, not the arrays."""
        k = len(self.neurons)
        shown = ", ".join(str(int(n)) for n in self.neurons[:8]) + (", ..." if k > 8 else "")
        lines = [f"Decoded({self.mode} mode, layer {self.layer!r}: {k} neurons [{shown}])",
                 f"  filters {list(self.filters.shape)} {self.filters.dtype}, stride {tuple(self.stride)}, "
                 f"origin {tuple(self.origin)}, exact at {self.exact_at}"
                 + ("" if self.position is None else f" (position {tuple(self.position)})"),
                 f"  bias in [{float(np.min(self.bias)):.4g}, {float(np.max(self.bias)):.4g}]" if k else "  no bias"]
        if self.instance_filters is not None:
            lines.append(f"  instance filters {list(self.instance_filters.shape)}")
        if self.instances is not None:
            lines.append(f"  instances: top {getattr(self.instances, 'top', '?')} per neuron")
        if self.gates:
            lines.append(f"  {len(self.gates)} data-dependent factors held (gates)")
        bad = [kind for kind in self.degenerate if kind]
        if bad:
            lines.append(f"  {len(bad)} degenerate filters ({', '.join(sorted(set(bad)))})")
        return "\n".join(lines)

    def _repr_html_(self) -> str | None:
        """The notebook view: a summary table and a grid of the filters (``present/notebook.py``)."""
        return html_view(self)

    @property
    def degenerate(self) -> list[str | None]:
        """Per neuron, why its filter cannot stand for it ('not finite': an overflow or NaN, in the filter or its
        bias; 'all zero'), or None."""
        return [degenerate_kind(f, b) for f, b in zip(self.filters, self.bias)]

    def interior(self, image_size, out_size) -> np.ndarray:
        """Boolean [Q_y, Q_x] mask of the output positions where the formula holds: those whose receptive field
        lies in the image (and bounds), or ``position`` alone."""
        if self.exact_at == "position":
            mask = np.zeros(tuple(out_size), bool)
            mask[tuple(self.position)] = True
            return mask
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
