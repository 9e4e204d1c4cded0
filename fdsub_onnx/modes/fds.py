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

from ..data.topn import TopN, instance_weights, start_top
from ..errors import FdsubError
from ..graph.geometry import Window
from ..graph.model import ancestors, attributes
from ..graph.patterns import ChannelGate
from ..runtime.capture import merge_top, update_top
from ..runtime.cluster import Ordered, map_blocks, merge_ordered
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
                      progress=None, device="cpu", client=None) -> Substitution:
    """Capture the top-N of every substituted node up to ``targets`` (tensor names) and average their input windows.

    Two onnxruntime passes over the images in all: one for every node's top-N, one for their input windows.
    ``progress(done, total)`` counts images over both passes; ``device`` picks onnxruntime's provider. With a
    Dask ``client`` both passes run in blocks of images on the cluster, with the same statistics bit for bit.
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
    tops, means = _top_of_every_node(model, nodes, images, top, batch_size, progress, gates, device, client)
    stats = _window_means(model, nodes, tops, images, batch_size, progress, device, client)
    return Substitution(stats, select, tops, means)


def _gates(model, nodes) -> dict[str, str]:
    """Mul output -> gate tensor of each channel gate (squeeze-and-excitation, ``graph.patterns``) among ``nodes``.
    In fds mode each gate is held at its mean over the images."""
    outputs = {node.output[0] for node in nodes}
    return {mul: p.gate for mul, p in model.patterns.items() if isinstance(p, ChannelGate) and mul in outputs}


def _top_of_every_node(model, nodes, images, top, batch_size, progress, gates, device, client):
    """First pass: each node's top-N instances (all neurons, one per image), and each gate's mean."""
    names = [n.output[0] for n in nodes]
    options = {"names": names, "gates": gates, "top": top, "batch_size": batch_size}
    reads = names + list(gates.values())
    done = _passed(progress, 0, len(images))
    if client is None:
        states, sums = _first_pass(model, images, Forward(model, reads, device), 0, len(images), **options,
                                   progress=done)
    else:
        states, sums = map_blocks(client, _first_pass, model, images, reads, device, 0, len(images), batch_size,
                                  _merge_first_passes, options, progress=done)
    states = {name: dataclasses.replace(state, sources=list(images.sources), images_done=len(images))
              for name, state in states.items()}
    return states, {mul: total / len(images) for mul, total in sums.total.items()}


def _first_pass(model, images, forward, lo, hi, names, gates, top, batch_size, progress=None):
    """Images ``lo..hi-1`` of the first pass: the top-N of each node (without image names) and the gate sums."""
    shapes = {name: model.shapes[name] for name in names}
    states = {name: start_top(np.arange(shapes[name][1]), name, None, 1, top) for name in names}
    sums = Ordered(_add_gates, {mul: 0.0 for mul in gates} if lo == 0 else None)
    for first, batch in images.batches(batch_size, lo):
        if first >= hi:
            break
        values = forward(batch)
        sums.add({mul: np.asarray(values[gate], np.float64).sum(axis=(0, 2, 3)) for mul, gate in gates.items()})
        for name in names:
            acts = np.asarray(values[name], np.float32).reshape(len(batch), shapes[name][1], -1)
            width = shapes[name][3] if len(shapes[name]) == 4 else 1
            states[name] = update_top(states[name], acts, first, width)
        if progress is not None:
            progress(first + len(batch))
    for state in states.values():
        state.ranges = [[lo, min(hi, len(images))]]  # which images it holds, for merge_top's overlap check
    return states, sums


def _add_gates(total: dict, entry: dict) -> dict:
    return {mul: total[mul] + entry[mul] for mul in total}


def _merge_first_passes(parts):
    states = {name: merge_top([states[name] for states, _ in parts]) for name in parts[0][0]}
    return states, merge_ordered([sums for _, sums in parts])


def _window_means(model, nodes, tops, images, batch_size, progress, device, client) -> dict[str, np.ndarray]:
    """Second pass: per node and neuron, the activation-weighted mean of the input window at its instances."""
    weights = {}
    for name, found in tops.items():
        w = instance_weights(found)
        weights[name] = w / np.maximum(w.sum(axis=1, keepdims=True), 1e-30)
    names = [n.output[0] for n in nodes]
    places = {name: (tops[name].image_index, tops[name].position) for name in names}
    options = {"names": names, "places": places, "weights": weights, "batch_size": batch_size}
    reads = [n.input[0] for n in nodes]
    done = _passed(progress, len(images), len(images))
    if client is None:
        sums = _window_pass(model, images, Forward(model, reads, device), 0, len(images), **options, progress=done)
    else:
        sums = map_blocks(client, _window_pass, model, images, reads, device, 0, len(images), batch_size,
                          merge_ordered, options, progress=done)
    return {name: total.astype(np.float32) for name, total in sums.total.items()}


def _window_pass(model, images, forward, lo, hi, names, places, weights, batch_size, progress=None) -> Ordered:
    """Images ``lo..hi-1`` of the second pass: per batch holding instances, their weighted windows summed per neuron
    (batches without an instance are not read)."""
    nodes = [model.producer[name] for name in names]
    windows = {n.output[0]: _Window(model, n, model.shapes[n.input[0]]) for n in nodes}
    sums = Ordered(_add_windows, {name: np.zeros(windows[name].stat_shape(len(weights[name]))) for name in names}
                   if lo == 0 else None)
    for first in range(lo, hi, batch_size):
        stop = min(first + batch_size, len(images))
        found = {name: np.nonzero((index >= first) & (index < stop)) for name, (index, _) in places.items()}
        if not any(len(rows) for rows, _ in found.values()):
            continue
        _, batch = next(images.batches(batch_size, first))
        values = forward(batch)
        entry = {}
        for node in nodes:
            name, (index, position) = node.output[0], places[node.output[0]]
            rows, slots = found[name]
            if len(rows) == 0:
                continue
            acts = np.asarray(values[node.input[0]], np.float64).reshape(len(batch), *model.shapes[node.input[0]][1:])
            cut = windows[name].cut(acts, rows, index[rows, slots] - first, position[rows, slots])
            weighted = weights[name][rows, slots].reshape(-1, *[1] * (cut.ndim - 1)) * cut
            starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])  # rows come sorted from np.nonzero
            entry[name] = (rows[starts], np.add.reduceat(weighted, starts, axis=0))
        sums.add(entry)
        if progress is not None:
            progress(stop)
    return sums


def _add_windows(totals: dict, entry: dict) -> dict:
    for name, (rows, values) in entry.items():
        totals[name][rows] += values
    return totals


def _passed(progress, offset: int, count: int):
    """``progress(done, total)`` over both passes as ``done(images reached in one pass, *ignored)``; None without."""
    if progress is None:
        return None
    return lambda at, *_: progress(offset + at, 2 * count)


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
