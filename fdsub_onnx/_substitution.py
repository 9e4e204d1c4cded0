"""The data-driven substitution of METHOD.md's `fds` mode: per-neuron statistics of lower activations.

For a Conv or fully connected node with weight W [K, C/g, k_y, k_x], ``a_bar[k, c, i, j]`` is the
mean of the node's input activation (channel c, window offset (i, j)) over neuron k's top-N
instances, weighted by k's activation (``instance_weights``). The substituted weight is
``W * a_bar`` pruned by the ``select`` rule; for MaxPool the statistic is the mean switch
position (one-hot argmax of each instance's window), used as the pooling weight itself.
The walker's op rules stay the same: ``apply_window`` asks ``Substitution.weight`` for the
weight to compose with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._capture import TopN, _Runner, capture_top, instance_weights
from ._errors import FdsubError
from ._geometry import resolve_pads
from ._walker import _ancestors
from .ops._rule import attributes

SELECTS = ("all", "positive", "max", "topk:K")
SUBSTITUTED_OPS = ("Conv", "Gemm", "MatMul", "MaxPool")  # AveragePool keeps its fixed uniform weights


@dataclass
class Substitution:
    """Per-node statistics (keyed by the node's output tensor) and the selection rule."""

    stats: dict[str, np.ndarray]
    select: str = "positive"
    tops: dict[str, TopN] | None = None  # the instances each statistic came from

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
    topk = _parse_select(select)
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
                      progress=None) -> Substitution:
    """Capture the top-N of every substituted node up to ``targets`` (tensor names) and average their input windows.

    One onnxruntime pass per node for its top-N and one for its input windows: simple, not yet fast.
    """
    _parse_select(select)
    targets = [targets] if isinstance(targets, str) else list(targets)
    nodes = [n for n in _ancestors(model, targets) if n.op_type in SUBSTITUTED_OPS]
    stats, tops = {}, {}
    for step, node in enumerate(nodes):
        if progress is not None:
            progress(step, len(nodes), node.output[0])
        tops[node.output[0]] = found = capture_top(model, node.output[0], images, top=top, batch_size=batch_size)
        stats[node.output[0]] = _window_means(model, node, found, images, batch_size)
    if progress is not None:
        progress(len(nodes), len(nodes), None)
    return Substitution(stats, select, tops)


def _window_means(model, node, top: TopN, images, batch_size: int) -> np.ndarray:
    """Activation-weighted mean, per neuron, of the node's input window at each of its instances."""
    name = node.input[0]
    shape = model.shapes.get(name)
    if shape is None or len(shape) not in (2, 4):
        raise FdsubError(f"the input {name!r} of node {model.node_name(node)!r} has shape {shape}; fds needs a map or a vector")
    weights = instance_weights(top)
    weights /= np.maximum(weights.sum(axis=1, keepdims=True), 1e-30)
    run = (lambda batch: batch) if name == model.input_name else _Runner(model, name, shape)
    window = _Window(model, node, shape)
    total = None
    needed = np.unique(top.image_index[top.image_index >= 0])
    for first, batch in images.batches(batch_size):
        in_batch = needed[(needed >= first) & (needed < first + len(batch))]
        if len(in_batch) == 0:
            continue
        acts = run(batch).reshape(len(batch), *shape[1:])
        rows, slots = np.nonzero((top.image_index >= first) & (top.image_index < first + len(batch)))
        cut = window.cut(acts, rows, top.image_index[rows, slots] - first, top.position[rows, slots])
        part = np.zeros((top.values.shape[0], *cut.shape[1:]))
        np.add.at(part, rows, weights[rows, slots].reshape(-1, *[1] * (cut.ndim - 1)) * cut)
        total = part if total is None else total + part
    return (total if total is not None else np.zeros(window.stat_shape(top.values.shape[0]))).astype(np.float32)


class _Window:
    """Which input values a node's output position reads (zeros in the padding)."""

    def __init__(self, model, node, shape):
        self.op, self.rank = node.op_type, len(shape)
        self.channels, self.neurons = shape[1], model.shapes[node.output[0]][1]
        if self.rank == 2:
            return
        attrs = attributes(node)
        if node.op_type == "MaxPool":
            kernel, self.groups = tuple(attrs["kernel_shape"]), shape[1]
        else:
            weight = model.constants[node.input[1]]
            kernel, self.groups = tuple(weight.shape[2:]), int(attrs.get("group", 1))
        self.kernel = kernel
        self.strides = tuple(attrs.get("strides", (1, 1)))
        self.dilations = tuple(attrs.get("dilations", (1, 1)))
        self.begin, self.end = resolve_pads(tuple(shape[2:]), kernel, self.strides, self.dilations,
                                            tuple(attrs.get("pads", ())), attrs.get("auto_pad", "NOTSET"))

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
        ys = position[:, :1] * self.strides[0] + np.arange(self.kernel[0]) * self.dilations[0]  # [M, k_y]
        xs = position[:, 1:] * self.strides[1] + np.arange(self.kernel[1]) * self.dilations[1]  # [M, k_x]
        per_group = self.channels // self.groups
        channels = (rows // (self.neurons // self.groups))[:, None] * per_group + np.arange(per_group)  # [M, C/g]
        cut = padded[image[:, None, None, None], channels[:, :, None, None], ys[:, None, :, None], xs[:, None, None, :]]
        if self.op == "MaxPool":  # the switch: one-hot of the first maximum of each window
            flat = cut.reshape(len(cut), per_group, -1)
            cut = np.zeros_like(flat)
            np.put_along_axis(cut, np.argmax(flat, axis=2)[..., None], 1.0, axis=2)
            cut = cut.reshape(len(cut), per_group, *self.kernel)
        return cut


def _parse_select(select: str) -> int | None:
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
