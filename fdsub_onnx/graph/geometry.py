"""Receptive-field geometry: the one place where stride, receptive field and origin are computed.

A tensor's geometry (per spatial axis) says which input pixels its neuron at output
position q reads: ``[O + q*S, O + q*S + R)``. The image itself has S=1, R=1, O=0.

A crop (negative Pad) also leaves ``bounds``: the image-space span ``[lo, hi)`` per axis
that the kept positions cover. A later padded window reads zeros where cropped pixels
were, so only neurons whose receptive field lies inside ``bounds`` obey the identity.

A windowed op (Conv, pooling) with kernel k, stride s, dilation d and leading pad p,
applied to a tensor of geometry (S, R, O), gives::

    S' = S * s
    R' = R + (k - 1) * d * S
    O' = O - p * S

Worked example: a 3x3 conv, stride 2, pad 1 on the image gives S=2, R=3, O=-1; a second
3x3 conv, stride 1, pad 1 on top gives S=2, R=3+2*2=7, O=-1-2=-3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import NotDecodable

Pair = tuple[int, int]
_UNBOUNDED = 1 << 62  # a bound no image reaches


@dataclass(frozen=True)
class Geometry:
    """Accumulated stride, receptive field and origin of a tensor, as (y, x) pairs."""

    stride: Pair = (1, 1)
    rf: Pair = (1, 1)
    origin: Pair = (0, 0)
    bounds: tuple[Pair, Pair] | None = None  # ((lo_y, hi_y), (lo_x, hi_x)); None: the whole image

    def window(self, kernel: Pair, stride: Pair, dilation: Pair, pad_begin: Pair) -> Geometry:
        """Geometry after a windowed op (see the module docstring)."""
        return Geometry(
            stride=_pair(s * t for s, t in zip(self.stride, stride)),
            rf=_pair(r + (k - 1) * d * s for r, k, d, s in zip(self.rf, kernel, dilation, self.stride)),
            origin=_pair(o - p * s for o, p, s in zip(self.origin, pad_begin, self.stride)),
            bounds=self.bounds,
        )

    def shifted(self, pad_begin: Pair, pad_end: Pair = (0, 0), size: Pair | None = None) -> Geometry:
        """Geometry after padding the spatial grid of ``size`` positions (a crop for negative pads)."""
        origin = _pair(o - p * s for o, p, s in zip(self.origin, pad_begin, self.stride))
        bounds = self.bounds
        if size is not None and min(*pad_begin, *pad_end) < 0:
            kept = []
            for a in range(2):
                first, last = max(0, -pad_begin[a]), size[a] - 1 - max(0, -pad_end[a])
                kept.append((self.origin[a] + first * self.stride[a],
                             self.origin[a] + last * self.stride[a] + self.rf[a]))
            bounds = _intersect(bounds, tuple(kept))
        return Geometry(self.stride, self.rf, origin, bounds)

    def sliced(self, start: Pair, step: Pair, count: Pair, size: Pair) -> Geometry:
        """Geometry after keeping the positions ``start, start + step, ...`` (``count`` of them) of a grid of
        ``size`` (a strided Slice, e.g. YOLO's Focus): ``S' = S * step``, ``O' = O + start * S``, R unchanged.

        Where a dropped position held data next to the kept ones (a crop), a later padded window reads zeros
        where that data was: ``bounds`` narrows to the kept span as for a negative Pad.
        """
        stride = _pair(s * t for s, t in zip(self.stride, step))
        origin = _pair(o + a * s for o, a, s in zip(self.origin, start, self.stride))
        kept = []
        for a in range(2):
            first, last = start[a], start[a] + (count[a] - 1) * step[a]
            if first - step[a] >= 0 or last + step[a] < size[a]:
                o, s = self.origin[a], self.stride[a]
                kept.append((o + first * s, o + last * s + self.rf[a]))
            else:
                kept.append((-_UNBOUNDED, _UNBOUNDED))
        bounds = self.bounds if kept == [(-_UNBOUNDED, _UNBOUNDED)] * 2 else _intersect(self.bounds, tuple(kept))
        return Geometry(stride, self.rf, origin, bounds)

    def tap_step(self, dilation: Pair) -> Pair:
        """Image-space distance between neighbouring kernel taps."""
        return _pair(d * s for d, s in zip(dilation, self.stride))

    def corner(self, positions) -> np.ndarray:
        """The image-space corner ``O + q*S`` (y, x) of the window of each output position q (``[..., 2]``)."""
        return np.asarray(self.origin, np.int64) + np.asarray(positions, np.int64) * np.asarray(self.stride, np.int64)

    def image_span(self, image_size, out_size) -> tuple[Pair, Pair]:
        """Per axis, the part ``[u0, u1)`` of the receptive field that overlaps the image ``[0, n)`` for some output
        position q in ``[0, Q)``: ``u0 = max(0, -O - (Q - 1) S)``, ``u1 = min(R, n - O)``. Example: R = 2263,
        O = -1021, S = 32, Q = 7 on a 224 image gives [829, 1245), 416 of the 2263 columns."""
        return tuple((max(0, -o - (q - 1) * s), max(min(r, n - o), max(0, -o - (q - 1) * s) + 1))
                     for o, s, r, q, n in zip(self.origin, self.stride, self.rf, out_size, image_size))

    def cone(self, window: tuple[Pair, Pair], out_size) -> tuple[Pair, Pair]:
        """Per axis, the positions ``[p0, p1)`` of this tensor's grid (clipped to ``[0, Q)``) whose receptive field
        lies inside the image-space ``window`` ((start, size) per axis): what a neuron with that window reads."""
        span = []
        for (start, size), o, s, r, q in zip(window, self.origin, self.stride, self.rf, out_size):
            first, last = -((o - start) // s), (start + size - r - o) // s  # ceil and floor
            span.append((max(0, first), max(max(0, first), min(q, last + 1))))
        return tuple(span)

    def interior(self, image_size, out_size) -> np.ndarray:
        """Boolean [Q_y, Q_x] mask of the output positions whose window lies inside the image and ``bounds``."""
        masks = []
        for a in range(2):
            lo, hi = 0, int(image_size[a])
            if self.bounds is not None:
                lo, hi = max(lo, self.bounds[a][0]), min(hi, self.bounds[a][1])
            start = self.origin[a] + np.arange(out_size[a]) * self.stride[a]
            masks.append((start >= lo) & (start + self.rf[a] <= hi))
        return masks[0][:, None] & masks[1][None, :]


@dataclass(frozen=True)
class Window:
    """A windowed node's attributes, read once: kernel, strides, dilations and the pads with ``auto_pad`` applied.

    ``Window.of(attributes(conv), (8, 8))`` for a 3x3 conv, stride 2, ``auto_pad=SAME_UPPER`` on an 8x8 input gives
    kernel (3, 3), strides (2, 2), dilations (1, 1), begin (0, 0), end (1, 1).
    """

    kernel: Pair
    strides: Pair
    dilations: Pair
    begin: Pair
    end: Pair

    @classmethod
    def of(cls, attrs: dict, in_size: Pair, kernel: Pair | None = None) -> Window:
        """The window of a node with attributes ``attrs`` (Conv, pooling) on an input of ``in_size``; ``kernel``
        when it is not an attribute (a Conv's weight shape)."""
        kernel = _pair(kernel if kernel is not None else attrs["kernel_shape"])
        strides, dilations = _pair(attrs.get("strides", (1, 1))), _pair(attrs.get("dilations", (1, 1)))
        begin, end = resolve_pads(tuple(in_size), kernel, strides, dilations, tuple(attrs.get("pads", ())),
                                  attrs.get("auto_pad", "NOTSET"))
        return cls(kernel, strides, dilations, begin, end)

    @property
    def span(self) -> Pair:
        """Input extent one window covers: ``(k - 1) * d + 1`` per axis."""
        return _pair((k - 1) * d + 1 for k, d in zip(self.kernel, self.dilations))


def union(geoms: list[Geometry]) -> Geometry:
    """Smallest geometry covering every input's window (for Add, Sum, Concat)."""
    strides = {g.stride for g in geoms}
    if len(strides) != 1:
        raise NotDecodable(f"inputs have different strides {sorted(strides)}; they cannot be aligned")
    origin = _pair(min(g.origin[a] for g in geoms) for a in range(2))
    end = _pair(max(g.origin[a] + g.rf[a] for g in geoms) for a in range(2))
    bounds = None
    for g in geoms:
        bounds = _intersect(bounds, g.bounds)
    return Geometry(geoms[0].stride, _pair(e - o for e, o in zip(end, origin)), origin, bounds)


def _intersect(a, b):
    if a is None or b is None:
        return a if b is None else b
    return tuple((max(x[0], y[0]), min(x[1], y[1])) for x, y in zip(a, b))


def resolve_pads(
    in_size: Pair, kernel: Pair, stride: Pair, dilation: Pair, pads: tuple[int, ...], auto_pad: str
) -> tuple[Pair, Pair]:
    """Leading and trailing pads per axis, applying ONNX ``auto_pad`` rules.

    SAME_UPPER with input 8, kernel 3, stride 2: output ceil(8/2)=4, total pad
    (4-1)*2+3-8 = 1, split as begin 0, end 1 (SAME_LOWER: begin 1, end 0).
    """
    if auto_pad in ("", "NOTSET"):
        pads = tuple(pads) if pads else (0, 0, 0, 0)
        return _pair(pads[:2]), _pair(pads[2:4])
    if auto_pad == "VALID":
        return (0, 0), (0, 0)
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise NotDecodable(f"unknown auto_pad {auto_pad!r}")
    begin, end = [], []
    for n, k, s, d in zip(in_size, kernel, stride, dilation):
        total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
        small, large = total // 2, total - total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else large)
        end.append(large if auto_pad == "SAME_UPPER" else small)
    return _pair(begin), _pair(end)


def _pair(values) -> Pair:
    a, b = values
    return (int(a), int(b))
