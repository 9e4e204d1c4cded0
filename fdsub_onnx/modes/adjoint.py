"""The adjoint (top-down) route of ``weights`` mode: a neuron's filter at one output position is the input
gradient of the linearized network (docs/method.md, "Routes").

Bottom-up composition builds the filter of every channel of every layer below the one asked, each as large
as its receptive field; the adjoint starts from the neurons asked instead. A batch of one-hot seeds (the
neurons at the position) runs backwards through the network that ``weights`` mode decodes
(``compose.linear_model.linear_model``: nonlinearities as the identity, MaxPool as an average, gates held), with
the backward rules of ``local`` mode, which need no forward value on a linear network: one GEMM-shaped pass
per batch. The gradient with respect to the image is the filter, and the bias is what the pass gathers (the
network's response to the zero image). It is exact at every position, the border included, and through ops
whose filters depend on the phase of the output position (Resize, ConvTranspose).

Meet in the middle (``split``): the pass stops at a tensor T that every path from the image to the layer
crosses; the gradient over T's grid, a kernel over T's neurons, is then substituted by T's bottom-up bank in
one ``Engine.conv`` step. Exact wherever the positions it reads of T are interior to T.
"""

from __future__ import annotations

import numpy as np

from ..compose.backend import get_backend, resolve_device
from ..compose.engine import Bank, Engine
from ..compose.linear_model import adjoint_problem, folded
from ..compose.values import Tensor
from ..compose.walker import walk
from ..errors import FdsubError
from ..graph.geometry import Geometry
from ..graph.model import Model, ancestors, channel_axis, grid
from .backward import backward, one_hot, seed_at

#: the reading of each op's class the adjoint runs: its backward rule where it is exact on a linear network without
#: forward values (``OpRule.linear``; a product of two maps has no data-free rule)
ADJOINT = "adjoint"
__all__ = ["ADJOINT", "adjoint_problem", "decode_at", "gradients", "per_seed_bytes"]


class _Shapes(dict):
    """The forward values a linear network's rules read: zeros of each tensor's shape (one image's, as a pass over
    forward values has them), as broadcast views (no memory); the rules read only their shapes."""

    def __init__(self, model: Model, dtype):
        super().__init__()
        self.model, self.zero = model, np.zeros((), dtype)

    def __missing__(self, name):
        shape = self.model.shapes.get(name)
        if shape is None:
            raise FdsubError(f"weights mode (adjoint): the shape of {name!r} could not be inferred")
        value = np.broadcast_to(self.zero, tuple(shape))
        self[name] = value
        return value


def gradients(linear: Model, target: str, neurons, position, backend, dtype, stop: str | None = None,
              batch: int | None = None, progress=None):
    """Yield ``(rows, grad, bias)`` per batch of seeds: the gradient of ``target``'s ``neurons[rows]`` at
    ``position`` with respect to the image (or to ``stop``) [m, C, H, W], and their bias [m] (what the nodes
    between contribute). ``batch`` seeds per pass (default all)."""
    neurons = np.asarray(neurons, np.int64)
    axis = channel_axis(linear, target)  # of the network as exported (folding may fuse the layer's own node)
    linear = folded(linear, {target, stop}, dtype)
    nodes = ancestors(linear, [target])
    source = linear.input_name
    if stop is not None:
        below = {id(n) for n in ancestors(linear, [stop])}
        nodes, source = [n for n in nodes if id(n) not in below], stop
    batch = len(neurons) if batch is None else max(1, int(batch))
    shape = linear.shapes.get(target)
    if shape is None:
        raise FdsubError(f"weights mode (adjoint): the shape of layer {target!r} could not be inferred")
    merged = shape[0] != linear.input_shape[0]  # windows or patches on the batch axis: one seed, in its own shape
    batch = 1 if merged else batch
    values = _Shapes(linear, dtype)  # one image's shapes, whatever the batch of seeds
    for start in range(0, len(neurons), batch):
        rows = slice(start, min(start + batch, len(neurons)))
        m = rows.stop - rows.start
        if merged:
            seed = seed_at(backend, linear, target, shape, neurons[start], position, dtype)
        else:
            seed = one_hot(backend, (m, *shape[1:]), neurons[rows], np.broadcast_to(position, (m, 2)), dtype,
                           axis)
        grads, bias = backward(linear, nodes, values, {target: seed}, ADJOINT,
                               "weights (adjoint)", instances=1 if merged else None)
        grad = grads.get(source)
        if grad is None:
            raise FdsubError(f"layer {target!r} does not depend on {source!r}")
        yield rows, grad, bias
        if progress is not None:
            progress(rows.stop, len(neurons))


def per_seed_bytes(linear: Model, target: str, itemsize: int, stop: str | None = None) -> int:
    """About the memory one seed costs in a pass: the gradients alive at once plus the temporaries of the
    largest step (a padded input and the transposed output gradient), from the shapes alone."""
    nodes = ancestors(linear, [target])
    if stop is not None:
        below = {id(n) for n in ancestors(linear, [stop])}
        nodes = [n for n in nodes if id(n) not in below]
    size = {name: int(np.prod(s[1:])) for name, s in linear.shapes.items()}
    live, peak, largest = {target: size.get(target, 1)}, 0, 0
    for node in reversed(nodes):
        if not any(o in live for o in node.output):
            continue
        for name in node.output:
            live.pop(name, None)
        for name in node.input:
            if name and name not in linear.constants:
                live[name] = size.get(name, 1)
                largest = max(largest, size.get(name, 1))
        peak = max(peak, sum(live.values()))
    return (peak + 3 * largest) * itemsize


def decode_at(model: Model, linear: Model, target: str, neurons, position, geom: Geometry | None, dtype, device,
              split: str | None = None, batch: int | None = None, gates: dict | None = None, progress=None):
    """``(filters, bias, corner, crop)`` of ``neurons`` of ``target`` at ``position`` by the adjoint route.

    With the layer's geometry ``geom`` (translation-invariant layers) the filters cover the part of the
    receptive field that overlaps the image for some position (``Geometry.image_span``), placed as at
    ``position`` (zeros outside the image there); ``crop`` is that part's offset in the field. Without it
    (a layer after an upsampling) they cover the smallest box of the image holding every nonzero gradient,
    whose corner is ``corner``. ``split`` is the tensor to meet bottom-up banks at (None: the image).
    """
    device = resolve_device(device)
    backend = get_backend(device.backend)
    dtype = np.dtype(dtype)
    c, h, w = model.input_shape[1:]
    out_size = grid(model, target)
    neurons = np.asarray(neurons, np.int64)
    meet = _Meeting(model, split, backend, dtype, gates) if split is not None else None
    if geom is not None:
        span = geom.image_span((h, w), out_size)
        crop = (span[0][0], span[1][0])
        size = (span[0][1] - span[0][0], span[1][1] - span[1][0])
        corner = tuple(int(v) for v in geom.corner(position) + np.asarray(crop))
    else:
        crop, size, corner = (0, 0), (h, w), (0, 0)
    filters = np.zeros((len(neurons), c, *size), dtype)
    bias = np.zeros(len(neurons), dtype)
    for rows, grad, added in _passes(linear, target, neurons, position, backend, dtype, split, batch, progress):
        added = backend.to_numpy(added)
        if meet is not None:
            piece, piece_corner, beta = meet.substituted(grad, geom, position, out_size)
            added = added + beta
        else:
            piece, piece_corner = backend.to_numpy(grad), (0, 0)
        _place(filters[rows], piece, piece_corner, corner)
        bias[rows] = added
    if geom is None:  # the smallest box holding the filters
        support = np.abs(filters).sum(axis=(0, 1))
        ys, xs = np.nonzero(support.any(axis=1))[0], np.nonzero(support.any(axis=0))[0]
        if len(ys):
            filters = filters[:, :, ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1]
            corner = (int(ys[0]), int(xs[0]))
        else:
            filters, corner = filters[:, :, :1, :1], (0, 0)
    return filters, bias, corner, crop


def _passes(linear, target, neurons, position, backend, dtype, split, batch, progress):
    """``gradients`` of one network for every neuron, or (``linear`` a function of the neurons giving one network
    per neuron: fds's factors held at each neuron's instances) of each neuron's own."""
    if isinstance(linear, Model):
        yield from gradients(linear, target, neurons, position, backend, dtype, split, batch, progress)
        return
    for i, network in enumerate(linear(neurons)):
        for _, grad, bias in gradients(network, target, neurons[i : i + 1], position, backend, dtype, split):
            yield slice(i, i + 1), grad, bias
        if progress is not None:
            progress(i + 1, len(neurons))


def _place(out, piece, piece_corner, corner) -> None:
    """Add ``piece`` [m, C, a, b] whose top-left is image position ``piece_corner`` into ``out`` [m, C, R_y, R_x]
    whose top-left is ``corner`` (what falls outside ``out`` is dropped: it never meets a pixel)."""
    src, dst = [], []
    for a in range(2):
        start = piece_corner[a] - corner[a]
        lo, hi = max(0, start), min(out.shape[2 + a], start + piece.shape[2 + a])
        if hi <= lo:
            return
        dst.append(slice(lo, hi))
        src.append(slice(lo - start, hi - start))
    out[:, :, dst[0], dst[1]] += piece[:, :, src[0], src[1]]


class _Meeting:
    """The bottom-up bank of a split tensor T, and the substitution of a gradient over T's grid by it."""

    def __init__(self, model, split, backend, dtype, gates):
        self.engine = Engine(backend, dtype)
        value = next((v for node, v in walk(model, self.engine, targets=[split], compose=True, gates=gates)
                      if node.output[0] == split), None)
        if not isinstance(value, Tensor) or value.bank is None:
            raise FdsubError(f"tensor {split!r} has no bottom-up bank to meet the adjoint at")
        self.tensor = value

    def substituted(self, grad, geom, position, out_size):
        """``(filters, corner, bias)``: the gradient over T's cone of ``position`` composed with T's bank."""
        t = self.tensor
        backend = self.engine.backend
        grad = backend.to_numpy(grad)
        if geom is not None:
            window = tuple((int(c), int(r)) for c, r in zip(geom.corner(position), geom.rf))
            (y0, y1), (x0, x1) = t.geom.cone(window, t.spatial)
        else:
            (y0, y1), (x0, x1) = (0, t.spatial[0]), (0, t.spatial[1])
        kernel = np.ascontiguousarray(grad[:, :, y0:y1, x0:x1])
        ky, kx = kernel.shape[2:]
        step = t.geom.stride
        out_rf = (t.geom.rf[0] + (ky - 1) * step[0], t.geom.rf[1] + (kx - 1) * step[1])
        bank = self.engine.conv(Bank(t.bank.filters, t.bank.bias), kernel, None, 1, step, out_rf)
        corner = tuple(int(v) for v in t.geom.corner((y0, x0)))
        return backend.to_numpy(bank.filters), corner, backend.to_numpy(bank.bias)

