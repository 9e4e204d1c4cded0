"""Backward passes restricted to each instance's receptive-field cone (``local``/``deconvnet``).

A neuron at output position q reads, in every tensor T below it, only a window of T's grid: its *cone*. For a
chain of windowed and elementwise ops the window is affine in q: it starts at ``q * ratio + start`` and has a
fixed ``size`` (``Cone``), found top-down from the node attributes (``cones``): through a window op with stride
s, leading pad p and span ``(k - 1) d + 1`` an output window (a, n) reads the input window
``(a s - p, (n - 1) s + span)``; a tensor read by several nodes takes the union of their windows. Away from the
cone every gradient is zero, so a pass over the cones alone is the pass over whole maps, at a fraction of
its cost (the demo's conv4: 50x50 of the 64x64 conv1 map, 22x22 of the 31x31 pool1 map, 8x8 of 14x14 ...).

The pass runs the ``local`` backward rules unchanged on cones: the forward values are cut to each instance's
cone (``_Cut``, zeros outside the map), a window op sees its padding as part of the window (its pads are set
to 0 and its input cut to the part its output window reads), and each input gradient is put back at its
place in the input's cone, zeroed where the cone leaves the map (padding, which has no gradient). The image's
cone is the instance's receptive field: the pass ends with the instance filters themselves. ``cones`` returns
None when an op of the chain has no cone form here (global pooling, fully connected layers, reshapes,
upsampling, crops, data-dependent constants): the pass then runs over whole maps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from onnx import helper

from ..compose.backend import array_module
from ..compose.kernels import maxpool_switches, padded_size, scatter_sum
from ..compose.ops import RULES
from ..graph.geometry import Window
from ..graph.model import attributes, channel_axis
from .backward import backward, read_values

#: the cone forms (``OpRule.cone``) of windowed ops: a window of the input per output position
WINDOWS = ("window", "average_window", "max_window")


def _form(node) -> str | None:
    """The op's cone form (``OpRule.cone``), None for an op without a class."""
    op = RULES.get(node.op_type)
    return None if op is None else op.cone


@dataclass(frozen=True)
class Cone:
    """The window ``[q * ratio + start, + size)`` (per axis) of a tensor's grid that the target at q reads."""

    ratio: tuple[int, int]
    start: tuple[int, int]
    size: tuple[int, int]
    grid: tuple[int, int]  # the tensor's own spatial size

    def corners(self, positions: np.ndarray) -> np.ndarray:
        return np.asarray(positions, np.int64) * np.asarray(self.ratio) + np.asarray(self.start)

    def union(self, other: Cone) -> Cone:
        start = tuple(min(a, b) for a, b in zip(self.start, other.start))
        end = tuple(max(a + n, b + m) for a, n, b, m in zip(self.start, self.size, other.start, other.size))
        return Cone(self.ratio, start, tuple(e - s for e, s in zip(end, start)), self.grid)


def cones(model, nodes: list, target: str) -> dict[str, Cone] | None:
    """The cone of every data tensor the nodes read or write, or None when a node has no cone form (see above)."""
    shape = model.shapes.get(target)
    if shape is None or len(shape) != 4 or channel_axis(model, target) != 1:
        return None
    found = {target: Cone((1, 1), (0, 0), (1, 1), tuple(shape[2:]))}
    for node in reversed(nodes):
        out = found.get(node.output[0])
        if out is None:
            continue
        demands = reads(model, node, out) if len(node.output) == 1 else None
        if demands is None:
            return None
        for name, cone in demands.items():
            if name in found and found[name].ratio != cone.ratio:
                return None
            found[name] = found[name].union(cone) if name in found else cone
    return found


def reads(model, node, out: Cone) -> dict[str, Cone] | None:
    """Data input -> the window of its grid that ``node``'s output window ``out`` reads (None: no cone form)."""
    data = [name for name in node.input if name and name not in model.constants]
    form = _form(node)
    if form in WINDOWS:
        window = _window_read(model, node, out)
        return None if window is None else {data[0]: window}
    if form == "aligned" and _aligned(model, node, data):
        return {name: Cone(out.ratio, out.start, out.size, tuple(model.shapes[name][2:])) for name in data}
    if form == "pad":
        return _pad_read(model, node, out, data)
    return None


def _window_read(model, node, out: Cone) -> Cone | None:
    x = model.shapes.get(node.input[0])
    attrs = attributes(node)
    weight = model.constants.get(node.input[1]) if len(node.input) > 1 else None  # a convolution's
    if x is None or len(x) != 4 or (len(node.input) > 1 and weight is None):
        return None
    window = Window.of(attrs, tuple(x[2:]), None if weight is None else tuple(weight.shape[2:]))
    return Cone(tuple(r * s for r, s in zip(out.ratio, window.strides)),
                tuple(a * s - b for a, s, b in zip(out.start, window.strides, window.begin)),
                tuple((n - 1) * s + span for n, s, span in zip(out.size, window.strides, window.span)),
                tuple(x[2:]))


def _aligned(model, node, data) -> bool:
    """All data inputs are maps of the output's grid (no broadcast of a map or of a spatial constant)."""
    out = model.shapes.get(node.output[0])
    if out is None or len(out) != 4:
        return False
    if any(tuple(model.shapes.get(name, ())[2:]) != tuple(out[2:]) for name in data):
        return False
    constants = [model.constants[n] for n in node.input if n in model.constants]
    return all(np.ndim(c) < 2 or int(np.prod(np.shape(c)[-2:])) == 1 for c in constants) or RULES[
        node.op_type].cone_any_constant


def _pad_read(model, node, out: Cone, data) -> dict | None:
    attrs = attributes(node)
    x = model.shapes.get(node.input[0])
    pads = attrs.get("pads")
    if pads is None and len(node.input) > 1 and node.input[1] in model.constants:
        pads = model.constants[node.input[1]]
    value = model.constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if (x is None or len(x) != 4 or pads is None or len(np.ravel(pads)) != 8 or attrs.get("mode", "constant") !=
            "constant" or (value is not None and np.any(np.asarray(value) != 0)) or (len(node.input) > 3 and
                                                                                 node.input[3])):
        return None
    pads = [int(p) for p in np.ravel(pads)]
    if min(pads) < 0 or any(pads[a] or pads[a + 4] for a in (0, 1)):
        return None
    return {data[0]: Cone(out.ratio, (out.start[0] - pads[2], out.start[1] - pads[3]), out.size, tuple(x[2:]))}


class _Cut(dict):
    """Each forward value cut to every instance's cone: [M, C, n_y, n_x], zeros where the cone leaves the map. A
    value no rule reads (``read_values``) is not cut: it is NaN of that shape, without memory, so that a rule
    reading it after all makes NaN filters, not quietly wrong ones."""

    def __init__(self, values: dict, found: dict, positions: np.ndarray, read: set):
        super().__init__()
        self.values, self.found, self.positions, self.read = values, found, positions, read

    def __missing__(self, name):
        value, cone = self.values[name], self.found.get(name)
        if cone is None or value.ndim != 4:
            return value
        if name not in self.read:
            xp = array_module(value)
            return xp.broadcast_to(xp.asarray(np.nan, value.dtype), (len(self.positions), value.shape[1], *cone.size))
        self[name] = cut = windows_at(value[0], cone.corners(self.positions), cone.size)
        return cut


def windows_at(plane, corners: np.ndarray, size) -> object:
    """[M, C, n_y, n_x]: the windows of ``plane`` [C, Y, X] at ``corners`` [M, 2], zeros where they leave it."""
    xp = array_module(plane)
    (ny, nx) = size
    lo = np.minimum(corners.min(axis=0), 0)
    hi = np.maximum(corners.max(axis=0) + np.asarray(size) - np.asarray(plane.shape[1:]), 0)
    padded = xp.pad(plane, ((0, 0), (-lo[0], hi[0]), (-lo[1], hi[1])))
    if xp is np:
        cut = sliding_window_view(padded, (ny, nx), axis=(1, 2))[:, corners[:, 0] - lo[0], corners[:, 1] - lo[1]]
        return np.ascontiguousarray(cut.transpose(1, 0, 2, 3))
    return xp.stack([padded[:, y - lo[0] : y - lo[0] + ny, x - lo[1] : x - lo[1] + nx] for y, x in corners])


class _ConePass:
    """The rules of one pass, each run on cones: inputs cut to what the node reads, gradients put back."""

    def __init__(self, model, found: dict, positions: np.ndarray, reading: str, values: dict):
        self.model, self.found, self.positions, self.reading, self.values = model, found, positions, reading, values
        self.unpadded, self.offsets = {}, {}

    def step(self, op, node, ins, is_data, out, grad):
        """``op``'s reading on cones (``backward``'s ``run``)."""
        out_cone = self.found[node.output[0]]
        demands = reads(self.model, node, out_cone)
        xp = array_module(grad)
        # whether the rule's gradients need zeroing where the cones leave the map: a rule position by position
        # keeps the zeros its output's gradient has there
        mask = op.cone != "aligned"
        if op.cone == "pad":  # the same values on a shifted grid; what the pad added has no gradient
            grads, added = [grad] + [None] * (len(ins) - 1), xp.zeros(len(grad), grad.dtype)
        elif op.cone == "max_window":  # a max's rule in both modes: the switches
            grads, added = [self._maxpool(node, out_cone, demands[node.input[0]], grad)], xp.zeros(len(grad),
                                                                                                 grad.dtype)
            mask = False  # the switches lie in the map
        else:
            cut = [self._part(v, self.found[name], demands[name]) if name in demands else v
                   for name, v in zip(node.input, ins)]
            if op.cone == "average_window":  # each window divides by its taps inside the map, as onnxruntime
                grad = grad * xp.asarray(self._average_scale(node, out_cone, len(grad)), grad.dtype)
            rule = getattr(op, self.reading)
            grads, added = rule(self._unpadded(node, op.cone) if op.cone in WINDOWS else node, cut, is_data, out,
                                grad)
        placed = [self._placed(g, demands[name], self.found[name], mask) if g is not None and name in demands
                  else g for name, g in zip(node.input, grads)]
        return placed, added

    def _maxpool(self, node, out_cone: Cone, in_cone: Cone, grad):
        """MaxPool on cones: the switches found once on the image's whole maps (``maxpool_switches``) as offsets
        from each window's first tap, read at each instance's output cone; in the input cone, which holds the
        pool's padding, window q starts at ``q * s``, so one ``scatter_sum`` over ``start + offset`` puts every
        instance's gradient there, repeated indices (overlapping windows) adding up."""
        xp = array_module(grad)
        x, y = self.values[node.input[0]], self.values[node.output[0]]
        window = Window.of(attributes(node), tuple(x.shape[2:]))
        ny, nx = in_cone.size
        offset, none = self._switch_offsets(node, x, y, window, nx)  # [C, Q_y, Q_x]
        m, c = len(grad), x.shape[1]
        # outside the map the cut reads offset 0, a real tap: the gradient there is zero (``_placed``)
        local = windows_at(offset, out_cone.corners(self.positions)[:m], out_cone.size)  # [M, C, n_y, n_x]
        start = (np.arange(out_cone.size[0])[:, None] * window.strides[0] * nx
                 + np.arange(out_cone.size[1])[None, :] * window.strides[1])
        flat = local + (xp.asarray(start)[None, None] + (xp.arange(m * c) * (ny * nx)).reshape(m, c, 1, 1))
        weights = xp.where(local >= 0, grad, 0) if none else grad
        return scatter_sum(xp.maximum(flat, 0) if none else flat, weights, m * c * ny * nx).reshape(m, c, ny, nx)

    def _switch_offsets(self, node, x, y, window: Window, width: int):
        """([C, Q_y, Q_x] the offset ``i*d*width + j*d`` in an input cone of ``width`` columns of each window's
        first maximum from its first tap, whether any window has none (NaN: offset -1)), once per pass."""
        if (id(node), width) not in self.offsets:
            xp = array_module(x)
            padded = padded_size(tuple(x.shape[2:]), window, tuple(y.shape[2:]))[1]
            switch = maxpool_switches(x, y, window)[0]
            qy, qx = xp.indices(switch.shape[1:])
            dy, dx = switch // padded - qy * window.strides[0], switch % padded - qx * window.strides[1]
            ok = (dy >= 0) & (dy < window.span[0]) & (dx >= 0) & (dx < window.span[1])
            self.offsets[id(node), width] = xp.where(ok, dy * width + dx, -1), not bool(ok.all())
        return self.offsets[id(node), width]

    @staticmethod
    def _part(value, cone: Cone, part: Cone):
        """The part ``part`` of a value cut to ``cone`` (same grid, ``part`` inside ``cone``)."""
        (y, x), (ny, nx) = (p - c for p, c in zip(part.start, cone.start)), part.size
        return value[:, :, y : y + ny, x : x + nx]

    def _placed(self, g, part: Cone, cone: Cone, mask: bool = True):
        """A gradient over ``part`` put back in ``cone``, zero where the cone leaves the map (``mask``: made so;
        else it already is)."""
        xp = array_module(g)
        (y, x), (ny, nx) = (p - c for p, c in zip(part.start, cone.start)), part.size
        if part.size == cone.size:
            full = g
        else:
            full = xp.zeros((len(g), g.shape[1], *cone.size), g.dtype)
            full[:, :, y : y + ny, x : x + nx] = g
        inside = self._inside(cone, len(g)) if mask else None
        return full if inside is None or inside.all() else full * xp.asarray(inside[:, None], g.dtype)

    def _inside(self, cone: Cone, m: int) -> np.ndarray:
        """[M, n_y, n_x]: which positions of each instance's cone lie in the map."""
        corners = cone.corners(self.positions)[:m]
        rows = corners[:, :1] + np.arange(cone.size[0])[None]
        cols = corners[:, 1:] + np.arange(cone.size[1])[None]
        ok_y, ok_x = (rows >= 0) & (rows < cone.grid[0]), (cols >= 0) & (cols < cone.grid[1])
        return ok_y[:, :, None] & ok_x[:, None, :]

    def _average_scale(self, node, out_cone: Cone, m: int) -> np.ndarray:
        """[M, 1, n_y, n_x]: k*k over each window's own divisor (the cut window has no padding of its own)."""
        attrs = attributes(node)
        window = Window.of(attrs, tuple(self.model.shapes[node.input[0]][2:]))
        include = bool(attrs.get("count_include_pad", 0))
        corners = out_cone.corners(self.positions)[:m]
        grid = tuple(self.model.shapes[node.input[0]][2:])
        return np.stack([np.prod(window.kernel) / _counts(window, grid, corner, out_cone.size, include)
                         for corner in corners])[:, None]

    def _unpadded(self, node, form: str):
        """The node with its pads set to 0: the cut input already holds the padding as part of its window."""
        if id(node) not in self.unpadded:
            attrs = {k: v for k, v in attributes(node).items() if k not in ("pads", "auto_pad", "count_include_pad")}
            if form == "average_window":
                attrs["count_include_pad"] = 1
            self.unpadded[id(node)] = helper.make_node(node.op_type, list(node.input), list(node.output),
                                                       name=node.name, pads=[0, 0, 0, 0], **attrs)
        return self.unpadded[id(node)]


def _counts(window: Window, grid, corner, size, include_pad: bool) -> np.ndarray:
    """[n_y, n_x]: the divisor of the windows of output positions ``corner + i`` (``window_counts``, shifted)."""
    per_axis = []
    for n, a, q, k, s, d, b, e in zip(grid, corner, size, window.kernel, window.strides, window.dilations,
                                      window.begin, window.end):
        lo, hi = (-b, n + e) if include_pad else (0, n)
        taps = (a + np.arange(q))[:, None] * s - b + np.arange(k)[None, :] * d
        per_axis.append(((taps >= lo) & (taps < hi)).sum(axis=1))
    return np.maximum(np.outer(*per_axis), 1)


def cone_gradients(model, target: str, values: dict, neurons, positions, reading: str, label: str, nodes: list,
                   found: dict):
    """Instance filters [M, C, R_y, R_x] (the image's cone: each instance's receptive field) and local biases [M]
    of M instances of one image, whose forward ``values`` (tensor -> [1, ...]) they share."""
    positions = np.asarray(positions, np.int64).reshape(-1, 2)
    first = values[target]
    xp = array_module(first)
    seed = xp.zeros((len(neurons), first.shape[1], 1, 1), first.dtype)
    seed[np.arange(len(neurons)), np.asarray(neurons), 0, 0] = 1.0
    cone_pass = _ConePass(model, found, positions, reading, values)
    cut = _Cut(values, found, positions, read_values(model, nodes, cut=True))
    grads, bias = backward(model, nodes, cut, {target: seed}, reading, label, cone_pass.step)
    return grads[model.input_name], bias
