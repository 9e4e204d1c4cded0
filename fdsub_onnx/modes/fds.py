"""The data-driven substitution of docs/method.md's `fds` mode: per-neuron statistics of lower activations.

For a Conv or fully connected node with weight W [K, C/g, k_y, k_x], ``a_bar[k, c, i, j]`` is the
mean of the node's input activation (channel c, window offset (i, j)) over neuron k's top-N
instances, weighted by k's activation (``instance_weights``). The substituted weight is
``W * a_bar`` pruned by the ``select`` rule; for MaxPool the statistic is the mean switch
position (one-hot argmax of each instance's window), used as the pooling weight itself.
The walker's op rules stay the same: ``apply_window`` asks ``Substitution.weight`` for the
weight to compose with.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from onnx import helper

from ..data.topn import TopN, instance_weights, start_top
from ..errors import FdsubError
from ..graph.geometry import Window
from ..graph.model import Model, ancestors, attributes
from ..graph.patterns import ChannelGate
from ..runtime.capture import update_top
from ..runtime.session import Forward

SELECTS = ("all", "positive", "max", "topk:K")
SUBSTITUTED_OPS = ("Conv", "Gemm", "MatMul", "MaxPool")  # AveragePool keeps its fixed uniform weights


@dataclass
class Substitution:
    """Per-node statistics (keyed by the node's output tensor) and the selection rule."""

    stats: dict[str, np.ndarray]
    select: str = "positive"
    tops: dict[str, TopN] | None = None  # the instances each statistic came from
    gates: dict[str, np.ndarray] = field(default_factory=dict)  # Mul output -> mean gate per channel

    def weight(self, node, weight: np.ndarray) -> np.ndarray:
        """The weight ``node`` composes with: substituted where statistics exist, else as given."""
        stat = self.stats.get(node.output[0])
        if stat is None:
            return weight
        if node.op_type == "MaxPool":
            return stat.reshape(weight.shape)
        return select_contributions(weight * stat.reshape(weight.shape), self.select)


def select_contributions(contrib: np.ndarray, select: str) -> np.ndarray:
    """Keep the contributions [K, C, k_y, k_x] that ``select`` names (per neuron and window offset)."""
    topk = parse_select(select)
    if select == "all":
        return contrib
    if select == "positive":
        return np.where(contrib > 0, contrib, 0)
    keep = 1 if select == "max" else min(topk, contrib.shape[1])
    order = np.argsort(-contrib, axis=1, kind="stable")[:, :keep]
    mask = np.zeros(contrib.shape, bool)
    np.put_along_axis(mask, order, True, axis=1)
    return np.where(mask, contrib, 0)


def gather_statistics(model, targets, images, top: int = 100, select: str = "positive", batch_size: int = 32,
                      progress=None, device="cpu") -> Substitution:
    """Capture the top-N of every substituted node up to ``targets`` (tensor names) and average their input windows.

    Two onnxruntime passes over the images in all: one for every node's top-N, one for their input windows.
    ``progress(done, total)`` counts images over both passes; ``device`` picks onnxruntime's provider.
    """
    parse_select(select)
    targets = [targets] if isinstance(targets, str) else list(targets)
    nodes = [n for n in ancestors(model, targets) if n.op_type in SUBSTITUTED_OPS]
    for node in nodes:
        shape = model.shapes.get(node.input[0])
        if shape is None or len(shape) not in (2, 4):
            raise FdsubError(f"the input {node.input[0]!r} of node {model.node_name(node)!r} has shape {shape}; "
                             "fds needs a map or a vector")
    gates = _gates(model, ancestors(model, targets))
    tops, means = _top_of_every_node(model, nodes, images, top, batch_size, progress, gates, device)
    stats = _window_means(model, nodes, tops, images, batch_size, progress, device)
    return Substitution(stats, select, tops, means)


def _gates(model, nodes) -> dict[str, str]:
    """Mul output -> gate tensor of each channel gate (squeeze-and-excitation, ``graph.patterns``) among ``nodes``.
    In fds mode each gate is held at its mean over the images."""
    outputs = {node.output[0] for node in nodes}
    return {mul: p.gate for mul, p in model.patterns.items() if isinstance(p, ChannelGate) and mul in outputs}


def _top_of_every_node(model, nodes, images, top, batch_size, progress, gates, device):
    """First pass: each node's top-N instances (all neurons, one per image), and each gate's mean."""
    names = [n.output[0] for n in nodes]
    shapes = {name: model.shapes[name] for name in names}
    states = {name: start_top(np.arange(shapes[name][1]), name, images, 1, top) for name in names}
    sums = {mul: 0.0 for mul in gates}
    forward = Forward(model, names + list(gates.values()), device)
    for first, batch in images.batches(batch_size):
        values = forward(batch)
        for mul, gate in gates.items():
            sums[mul] = sums[mul] + np.asarray(values[gate], np.float64).sum(axis=(0, 2, 3))
        for name in names:
            acts = np.asarray(values[name], np.float32).reshape(len(batch), shapes[name][1], -1)
            width = shapes[name][3] if len(shapes[name]) == 4 else 1
            states[name] = update_top(states[name], acts, first, width)
        if progress is not None:
            progress(first + len(batch), 2 * len(images))
    for state in states.values():
        state.images_done = len(images)
    return states, {mul: total / len(images) for mul, total in sums.items()}


def _window_means(model, nodes, tops, images, batch_size, progress, device) -> dict[str, np.ndarray]:
    """Second pass: per node and neuron, the activation-weighted mean of the input window at its instances."""
    windows = {n.output[0]: _Window(model, n, model.shapes[n.input[0]]) for n in nodes}
    weights = {}
    for name, found in tops.items():
        w = instance_weights(found)
        weights[name] = w / np.maximum(w.sum(axis=1, keepdims=True), 1e-30)
    totals = {name: np.zeros(windows[name].stat_shape(tops[name].values.shape[0])) for name in tops}
    forward = Forward(model, [n.input[0] for n in nodes], device)
    for first, batch in images.batches(batch_size):
        values = forward(batch)
        for node in nodes:
            name, found = node.output[0], tops[node.output[0]]
            rows, slots = np.nonzero((found.image_index >= first) & (found.image_index < first + len(batch)))
            if len(rows) == 0:
                continue
            acts = np.asarray(values[node.input[0]], np.float64).reshape(len(batch), *model.shapes[node.input[0]][1:])
            cut = windows[name].cut(acts, rows, found.image_index[rows, slots] - first, found.position[rows, slots])
            weighted = weights[name][rows, slots].reshape(-1, *[1] * (cut.ndim - 1)) * cut
            starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])  # rows come sorted from np.nonzero
            totals[name][rows[starts]] += np.add.reduceat(weighted, starts, axis=0)
        if progress is not None:
            progress(len(images) + first + len(batch), 2 * len(images))
    return {name: total.astype(np.float32) for name, total in totals.items()}


class _Window:
    """Which input values a node's output position reads (zeros in the padding)."""

    def __init__(self, model, node, shape):
        self.op, self.rank = node.op_type, len(shape)
        self.channels, self.neurons = shape[1], model.shapes[node.output[0]][1]
        if self.rank == 2:
            return
        attrs = attributes(node)
        if node.op_type == "MaxPool":
            kernel, self.groups = None, shape[1]
        else:
            kernel, self.groups = model.constants[node.input[1]].shape[2:], int(attrs.get("group", 1))
        window = Window.of(attrs, shape[2:], kernel)
        self.kernel, self.strides, self.dilations = window.kernel, window.strides, window.dilations
        self.begin, self.end = window.begin, window.end

    def stat_shape(self, k: int) -> tuple[int, ...]:
        if self.rank == 2:
            return (k, self.channels)
        return (k, self.channels // self.groups, *self.kernel)

    def cut(self, acts: np.ndarray, rows, image, position) -> np.ndarray:
        """[M, C/g, k_y, k_x] windows (or [M, F] vectors) of instance m = (neuron rows[m], image, position)."""
        if self.rank == 2:
            return acts[image]
        (by, bx), (ey, ex) = self.begin, self.end
        padded = np.pad(acts, ((0, 0), (0, 0), (by, ey + self.kernel[0] * self.dilations[0]),
                               (bx, ex + self.kernel[1] * self.dilations[1])))
        (ky, kx), (dy, dx) = self.kernel, self.dilations
        view = sliding_window_view(padded, ((ky - 1) * dy + 1, (kx - 1) * dx + 1), axis=(2, 3))[..., ::dy, ::dx]
        ys, xs = position[:, 0] * self.strides[0], position[:, 1] * self.strides[1]  # window corners
        per_group = self.channels // self.groups
        if self.groups == 1:
            cut = view[image, :, ys, xs]  # [M, C, k_y, k_x]
        else:
            channels = (rows // (self.neurons // self.groups))[:, None] * per_group + np.arange(per_group)
            cut = view[image[:, None], channels, ys[:, None], xs[:, None]]  # [M, C/g, k_y, k_x]
        if self.op == "MaxPool":  # the switch: one-hot of the first maximum of each window
            flat = cut.reshape(len(cut), per_group, -1)
            cut = np.zeros_like(flat)
            np.put_along_axis(cut, np.argmax(flat, axis=2)[..., None], 1.0, axis=2)
            cut = cut.reshape(len(cut), per_group, *self.kernel)
        return cut


def parse_select(select: str) -> int | None:
    if select in ("all", "positive", "max"):
        return None
    if select.startswith("topk:"):
        try:
            k = int(select[5:])
        except ValueError:
            k = 0
        if k >= 1:
            return k
    raise FdsubError(f"--select must be one of {', '.join(SELECTS)} (K a positive integer); got {select!r}")


def substituted(linear: Model, substitution: Substitution) -> Model | str:
    """The linearized network with each substituted node's weight replaced as bottom-up fds composes it, so the
    adjoint route decodes ``fds`` too: a Conv's weight becomes ``select(W * a_bar)``, a MaxPool (an average in
    ``linear``) a depthwise Conv with its mean switch, a fully connected layer's matrix the substituted one.
    A string says why it cannot (a fully connected layer on a map flattened in another order than C)."""
    nodes, constants = [], dict(linear.constants)
    for node in linear.nodes:
        stat = substitution.stats.get(node.output[0]) if node.output else None
        if stat is None:
            nodes.append(node)
            continue
        name = f"{node.output[0]}::substituted"
        attrs = attributes(node)
        if node.op_type == "Conv":
            constants[name] = substitution.weight(node, np.asarray(linear.constants[node.input[1]], np.float64))
            nodes.append(helper.make_node("Conv", [node.input[0], name, *node.input[2:]], list(node.output),
                                          name=node.name, **attrs))
        elif node.op_type == "AveragePool":  # a MaxPool of the model: the mean switch as depthwise weights
            channels = linear.shapes[node.input[0]][1]
            constants[name] = np.asarray(stat, np.float64).reshape(channels, 1, *attrs["kernel_shape"])
            kept = {k: v for k, v in attrs.items() if k in ("strides", "pads", "dilations", "auto_pad")}
            nodes.append(helper.make_node("Conv", [node.input[0], name], list(node.output), name=node.name,
                                          group=int(channels), **kept))
        elif node.op_type in ("Gemm", "MatMul") and len(linear.shapes.get(node.input[0], ())) == 2:
            matrix = np.asarray(linear.constants[node.input[1]], np.float64)
            if node.op_type == "Gemm":
                matrix = attrs.get("alpha", 1.0) * (matrix.T if attrs.get("transB", 0) else matrix)
            n = matrix.shape[1]
            weight = substitution.weight(node, matrix.T.reshape(n, -1, 1, 1))
            constants[name] = np.ascontiguousarray(weight.reshape(n, -1).T)
            inputs = [node.input[0], name, *node.input[2:3]]
            kept = {"beta": attrs["beta"]} if node.op_type == "Gemm" and "beta" in attrs else {}
            nodes.append(helper.make_node(node.op_type, inputs, list(node.output), name=node.name, **kept))
        else:
            return f"the fds statistics of {node.op_type} node {linear.node_name(node)!r} have no data-free form here"
    return dataclasses.replace(linear, nodes=nodes, constants=constants,
                               producer={o: n for n in nodes for o in n.output})
