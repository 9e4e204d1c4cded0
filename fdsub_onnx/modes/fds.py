"""The data-driven substitution of docs/method.md's `fds` mode: per-neuron statistics of the lower units.

For a Conv or fully connected node with weight W [K, C/g, k_y, k_x], ``g_bar[k, c, i, j]`` is the
mean *gate* of the lower unit (channel c, window offset (i, j)) over neuron k's top-N instances,
weighted by k's activation (``instance_weights``): the slope of the elementwise nonlinearities
between that unit's own linear op and this node (ReLU 1/0, Clip 1 inside its range, LeakyReLU 1 or
alpha, smooth ones their derivative), so a statistic in [0, 1]-like units that does not count the
lower unit's scale a second time (its filter carries it). The substituted weight is ``W * g_bar``
pruned by the ``select`` rule; ``weighting="activation"`` uses the mean input activation instead
(the first variant, kept for comparison). A node that reads the image keeps its weights: pixels are
not neurons. For MaxPool the statistic is the mean switch (one-hot of each instance's first maximum,
times the gate there), used as the pooling weight itself. The walker's op rules stay the same:
``apply_window`` asks ``Substitution.weight`` for the weight to compose with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..compose.ops.op_arithmetic import GATES
from ..data.topn import TopN, instance_weights, start_top
from ..errors import FdsubError
from ..graph.geometry import Window
from ..graph.model import ancestors, attributes
from ..runtime.capture import update_top
from ..runtime.session import Forward
from .backward import LOCAL_RULES

SELECTS = ("all", "positive", "max", "topk:K")
WEIGHTINGS = ("gate", "activation")
DEFAULT_SELECT = "positive"  # the select rule and weighting `fds` uses unless told (README: the fidelity benchmark)
DEFAULT_WEIGHTING = "gate"
SUBSTITUTED_OPS = ("Conv", "Gemm", "MatMul", "MaxPool")  # AveragePool keeps its fixed uniform weights
#: elementwise nonlinearities: their gate is their slope at the forward value (``local``'s rule on a unit signal)
SLOPE_OPS = ("Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu",
             "Celu", "Softplus", "Gelu", "Mish")
#: ops that pass a gate on unchanged (linear per element, or treated as identity in fds; reshapes move it)
PASSING_OPS = ("Identity", "Dropout", "LRN", "BatchNormalization", "Reshape", "Flatten", "Squeeze", "Unsqueeze")


@dataclass
class Substitution:
    """Per-node statistics (keyed by the node's output tensor) and the selection rule."""

    stats: dict[str, np.ndarray]
    select: str = DEFAULT_SELECT
    weighting: str = DEFAULT_WEIGHTING  # what ``stats`` hold: mean gates, or mean activations (the first variant)
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


def gather_statistics(model, targets, images, top: int = 100, select: str = DEFAULT_SELECT, batch_size: int = 32,
                      progress=None, device="cpu", weighting: str = DEFAULT_WEIGHTING) -> Substitution:
    """Capture the top-N of every substituted node up to ``targets`` (tensor names) and average the gates
    (``weighting="gate"``) or activations (``"activation"``) of their input windows.

    Two onnxruntime passes over the images in all: one for every node's top-N, one for their input windows.
    ``progress(done, total)`` counts images over both passes; ``device`` picks onnxruntime's provider.
    """
    parse_select(select)
    parse_weighting(weighting)
    targets = [targets] if isinstance(targets, str) else list(targets)
    nodes = [n for n in ancestors(model, targets) if n.op_type in SUBSTITUTED_OPS]
    for node in nodes:
        shape = model.shapes.get(node.input[0])
        if shape is None or len(shape) not in (2, 4):
            raise FdsubError(f"the input {node.input[0]!r} of node {model.node_name(node)!r} has shape {shape}; "
                             "fds needs a map or a vector")
    gates = _gates(model, ancestors(model, targets))
    tops, means = _top_of_every_node(model, nodes, images, top, batch_size, progress, gates, device)
    stats = _window_means(model, nodes, tops, images, batch_size, progress, device, weighting, gates)
    return Substitution(stats, select, weighting, tops, means)


def _gates(model, nodes) -> dict[str, str]:
    """Mul nodes of two data inputs where one is a [N, C, 1, 1] gate over a map (squeeze-and-excitation):
    Mul output -> gate tensor. In fds mode each gate is held at its mean over the images."""
    gates = {}
    for node in nodes:
        if node.op_type != "Mul" or any(name in model.constants for name in node.input):
            continue
        shapes = [model.shapes.get(name) for name in node.input]
        if all(s is not None and len(s) == 4 for s in shapes):
            small = [s[2] * s[3] == 1 for s in shapes]
            if small[0] != small[1]:
                gates[node.output[0]] = node.input[0] if small[0] else node.input[1]
    return gates


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


def _window_means(model, nodes, tops, images, batch_size, progress, device, weighting, held) -> dict[str, np.ndarray]:
    """Second pass: per node and neuron, the activation-weighted mean gate (or activation) of the input window at
    its instances. Gates are averaged over the instances whose window holds a lower unit at that offset (padding
    has none; an offset no instance holds keeps gate 1); activations count the padding as the zeros it is."""
    chains = {n.output[0]: _gate_chain(model, n.input[0], held) for n in nodes}
    nodes = [n for n in nodes if n.op_type == "MaxPool" or not chains[n.output[0]][1]]  # pixels are not neurons
    windows = {n.output[0]: _Window(model, n, model.shapes[n.input[0]]) for n in nodes}
    weights = {}
    for node in nodes:
        w = instance_weights(tops[node.output[0]])
        weights[node.output[0]] = w / np.maximum(w.sum(axis=1, keepdims=True), 1e-30)
    sums = {n.output[0]: [np.zeros(windows[n.output[0]].stat_shape(len(tops[n.output[0]].neurons)))] * 2
            for n in nodes}
    in_chains = {id(c) for n in nodes for c in chains[n.output[0]][0]} if weighting == "gate" else set()
    chain_nodes = [c for c in model.nodes if id(c) in in_chains]  # graph order
    wanted = [n.input[0] for n in nodes] + [t for c in chain_nodes for t in [*c.input, c.output[0]]
                                             if t and t not in model.constants]
    forward = Forward(model, wanted, device)
    for first, batch in images.batches(batch_size):
        values = forward(batch)
        gate_maps = _gate_maps(model, chain_nodes, values, held)
        for node in nodes:
            name, found = node.output[0], tops[node.output[0]]
            rows, slots = np.nonzero((found.image_index >= first) & (found.image_index < first + len(batch)))
            if len(rows) == 0:
                continue
            image, position = found.image_index[rows, slots] - first, found.position[rows, slots]
            acts = np.asarray(values[node.input[0]], np.float64).reshape(len(batch), *model.shapes[node.input[0]][1:])
            gate = None
            if weighting == "gate":
                gate = gate_maps.get(node.input[0], np.ones_like(acts)).reshape(acts.shape)
            value = _instance_values(windows[name], acts, gate, rows, image, position)
            weighted = weights[name][rows, slots].reshape(-1, *[1] * (value.ndim - 1))
            starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])  # rows come sorted from np.nonzero
            inside = np.isfinite(value)
            num, den = sums[name]
            sums[name] = [num + _grouped(weighted * np.where(inside, value, 0), rows, starts, num),
                          den + _grouped(weighted * inside, rows, starts, den)]
        if progress is not None:
            progress(len(images) + first + len(batch), 2 * len(images))
    with np.errstate(invalid="ignore", divide="ignore"):
        return {name: np.where(den > 0, num / den, 1.0).astype(np.float32) for name, (num, den) in sums.items()}


def _grouped(weighted, rows, starts, like):
    """Sums of ``weighted`` per neuron row, as an array shaped like ``like`` (zeros for the other rows)."""
    total = np.zeros_like(like)
    total[rows[starts]] = np.add.reduceat(weighted, starts, axis=0)
    return total


def _instance_values(window, acts, gate, rows, image, position):
    """Per instance, what its statistic averages: the gates of the input window (NaN where it reads padding), its
    activations (zero there) or, for MaxPool, the one-hot switch (times the gate at the switch)."""
    if window.op == "MaxPool":
        switch = window.switch(acts, rows, image, position)
        if gate is None:
            return switch
        return np.where(switch > 0, np.nan_to_num(window.cut(gate, rows, image, position, np.nan)), 0.0)
    if gate is None:
        return window.cut(acts, rows, image, position, 0.0)
    return window.cut(gate, rows, image, position, np.nan)


def _gate_chain(model, name: str, held: dict) -> tuple[list, bool]:
    """The nodes whose gates reach tensor ``name`` (back to the ops that start a gate), and whether a path from
    the image reaches it through them (then ``name`` holds pixels, not neurons)."""
    chain, pixels, stack = {}, False, [name]
    while stack:
        tensor = stack.pop()
        if tensor == model.input_name:
            pixels = True
        node = model.producer.get(tensor)
        passed = None if node is None else _passed(model, node, held)
        if passed is not None and id(node) not in chain:
            chain[id(node)] = node
            stack.extend(passed)
    return [n for n in model.nodes if id(n) in chain], pixels


def _passed(model, node, held: dict) -> list[str] | None:
    """The data inputs whose gate ``node`` passes on (times its own slope); None where ``node`` starts a gate
    (a Conv, a pool, a sum of maps, any op not listed: the lower unit itself)."""
    data = [n for n in node.input if n and n not in model.constants]
    op = node.op_type
    if op in SLOPE_OPS or op in PASSING_OPS or op in ("Pad", "Transpose"):
        return data[:1]
    if op == "Concat":
        return data
    if op in ("Mul", "Div", "Add", "Sub") and len(data) == 1:  # a per-channel constant: in the bank already
        return data
    if op == "Mul" and node.output[0] in held:  # a held SE gate: the map's gate passes
        return [n for n in data if n != held[node.output[0]]]
    if op == "Mul" and _self_gated(model, node) is not None:
        return [node.input[_self_gated(model, node)]]
    return None


def _self_gated(model, node):
    """Index of x in x * gate(x) (SiLU, swish), or None."""
    for i, j in ((0, 1), (1, 0)):
        producer = model.producer.get(node.input[j])
        if producer is not None and producer.op_type in GATES and producer.input[0] == node.input[i]:
            return i
    return None


def _gate_maps(model, chain: list, values: dict, held: dict) -> dict[str, np.ndarray]:
    """Each chain tensor's gate map for the batch (float64; NaN where no lower unit is, e.g. a Pad's ring)."""
    gates = {}

    def gate(name):
        if name not in gates:
            gates[name] = np.ones(values[name].shape)
        return gates[name]

    def forward(name):
        return np.asarray(values[name], np.float64) if name not in model.constants else model.constants[name]

    for node in chain:
        out, ins = forward(node.output[0]), [forward(n) if n else None for n in node.input]
        is_data = [bool(n) and n not in model.constants for n in node.input]
        passed = _passed(model, node, held)
        if node.op_type in SLOPE_OPS:
            gates[node.output[0]] = gate(passed[0]) * _slope(node, ins, is_data, out)
        elif node.op_type == "Mul" and node.output[0] not in held and len(passed) == 1 and all(is_data):
            x_at = _self_gated(model, node)  # SiLU: d(x g(x))/dx = g(x) + x g'(x)
            x, g = ins[x_at], ins[1 - x_at]
            producer = model.producer[node.input[1 - x_at]]
            slope = g + x * _slope(producer, [x] + [forward(n) for n in producer.input[1:]],
                                   [True] + [False] * (len(producer.input) - 1), g)
            gates[node.output[0]] = gate(passed[0]) * slope
        elif node.op_type == "Pad":
            gates[node.output[0]] = _padded_gate(node, gate(passed[0]), ins)
        elif node.op_type == "Transpose":
            perm = attributes(node).get("perm")
            gates[node.output[0]] = gate(passed[0]).transpose(perm)
        elif node.op_type == "Concat":
            gates[node.output[0]] = np.concatenate([gate(n) for n in passed], axis=int(attributes(node)["axis"]))
        else:  # passed unchanged: reshaped, or broadcast by a constant operand
            g = gate(passed[0])
            gates[node.output[0]] = g.reshape(out.shape) if g.size == out.size else np.broadcast_to(g, out.shape)
    return gates


def _slope(node, ins, is_data, out):
    """An elementwise op's slope at the forward value: its ``local`` rule applied to a unit backward signal."""
    ones = np.ones(out.shape)
    return LOCAL_RULES[node.op_type](node, ins, is_data, out, ones)[0][0]


def _padded_gate(node, gate, ins):
    """A Pad's gate: the input's, with NaN on the padded ring (no lower unit there); negative pads crop."""
    attrs = attributes(node)
    pads = np.asarray(attrs["pads"] if "pads" in attrs else ins[1], np.int64).reshape(2, -1)
    grown = np.pad(gate, [(max(b, 0), max(e, 0)) for b, e in pads.T], constant_values=np.nan)
    return grown[tuple(slice(max(-b, 0), grown.shape[a] - max(-e, 0)) for a, (b, e) in enumerate(pads.T))]


class _Window:
    """Which input values a node's output position reads (``fill`` in the padding)."""

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

    def cut(self, values: np.ndarray, rows, image, position, fill: float) -> np.ndarray:
        """[M, C/g, k_y, k_x] windows (or [M, F] vectors) of instance m = (neuron rows[m], image, position)."""
        if self.rank == 2:
            return values[image]
        (by, bx), (ey, ex) = self.begin, self.end
        padded = np.pad(values, ((0, 0), (0, 0), (by, ey + self.kernel[0] * self.dilations[0]),
                                 (bx, ex + self.kernel[1] * self.dilations[1])), constant_values=fill)
        (ky, kx), (dy, dx) = self.kernel, self.dilations
        view = sliding_window_view(padded, ((ky - 1) * dy + 1, (kx - 1) * dx + 1), axis=(2, 3))[..., ::dy, ::dx]
        ys, xs = position[:, 0] * self.strides[0], position[:, 1] * self.strides[1]  # window corners
        per_group = self.channels // self.groups
        if self.groups == 1:
            return view[image, :, ys, xs]  # [M, C, k_y, k_x]
        channels = (rows // (self.neurons // self.groups))[:, None] * per_group + np.arange(per_group)
        return view[image[:, None], channels, ys[:, None], xs[:, None]]  # [M, C/g, k_y, k_x]

    def switch(self, acts: np.ndarray, rows, image, position) -> np.ndarray:
        """MaxPool: the one-hot of the first maximum of each instance's window (padding never wins)."""
        cut = self.cut(acts, rows, image, position, -np.inf)
        flat = cut.reshape(len(cut), cut.shape[1], -1)
        onehot = np.zeros_like(flat)
        np.put_along_axis(onehot, np.argmax(flat, axis=2)[..., None], 1.0, axis=2)
        return onehot.reshape(cut.shape)


def parse_weighting(weighting: str) -> str:
    if weighting not in WEIGHTINGS:
        raise FdsubError(f"--weighting must be one of {', '.join(WEIGHTINGS)}; got {weighting!r}")
    return weighting


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
