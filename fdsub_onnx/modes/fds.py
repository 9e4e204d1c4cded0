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

import dataclasses
from dataclasses import dataclass, field

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..compose.inspect import channels_of
from ..compose.ops import RULES
from ..data.topn import TopN, instance_weights, start_top
from ..defaults import DEFAULT_SELECT, DEFAULT_WEIGHTING, SELECTS, WEIGHTINGS
from ..errors import FdsubError
from ..graph.geometry import Window
from ..graph.model import Model, ancestors, as_map, attributes, to_maps, windows_per_image, wiring
from ..graph.patterns import ChannelGate, SelfGated, TokenScale, gated_nodes
from ..runtime.capture import merge_top, update_top
from ..runtime.cluster import Ordered, map_blocks, merge_ordered
from ..runtime.session import FETCHED_BYTES, Forward, fitting_batch, tensor_values


def _fds(model, node) -> str | None:
    """How fds substitutes ``node`` (``OpRule.substitutes``: "weight", "switch"), None where it keeps it
    (AveragePool keeps its fixed uniform weights; attention's product of two data tensors is held instead)."""
    op = RULES.get(node.op_type)
    return None if op is None else op.substitutes(node, model.constants)


def _per_position(model, node) -> bool:
    """A weight on the last axis of tokens, of rows of tokens ([T, C]: torchvision's attention projection) or of a
    channels-last map: read position by position (a 1x1 window)."""
    op = RULES.get(node.op_type)
    shape = model.shapes.get(node.input[0]) or ()
    rows = len(shape) == 2 and shape[0] != model.input_shape[0]
    return op is not None and ((op.reads_last_axis and len(shape) >= 3) or (rows and op.matrix_product))


@dataclass
class Substitution:
    """Per-node statistics (keyed by the node's output tensor) and the selection rule."""

    stats: dict[str, np.ndarray]
    select: str = DEFAULT_SELECT
    weighting: str = DEFAULT_WEIGHTING  # what ``stats`` hold: mean gates, or mean activations (the first variant)
    tops: dict[str, TopN] | None = None  # the instances each statistic came from
    gates: dict[str, np.ndarray] = field(default_factory=dict)  # Mul output -> mean gate per channel
    images: object = None  # the image set the statistics came from (attention and layer norms are held over it)

    def weight(self, node, weight: np.ndarray) -> np.ndarray:
        """The weight ``node`` composes with: substituted where statistics exist, else as given."""
        stat = self.stats.get(node.output[0])
        if stat is None:
            return weight
        if RULES[node.op_type].fds == "switch":
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
                      progress=None, device="cpu", client=None, weighting: str = DEFAULT_WEIGHTING) -> Substitution:
    """Capture the top-N of every substituted node up to ``targets`` (tensor names) and average the gates
    (``weighting="gate"``) or activations (``"activation"``) of their input windows.

    Two onnxruntime passes over the images in all: one for every node's top-N, one for their input windows.
    ``progress(done, total)`` counts images over both passes; ``device`` picks onnxruntime's provider. With a
    Dask ``client`` both passes run in blocks of images on the cluster, with the same statistics bit for bit.
    """
    parse_select(select)
    parse_weighting(weighting)
    targets = [targets] if isinstance(targets, str) else list(targets)
    nodes = [n for n in ancestors(model, targets) if _fds(model, n)]
    for node in nodes:
        shape = model.shapes.get(node.input[0])
        if shape is None or not (len(shape) in (2, 4) or _per_position(model, node)):
            raise FdsubError(f"the input {node.input[0]!r} of node {model.node_name(node)!r} has shape {shape}; "
                             "fds needs a map, a vector or tokens")
    gates = _gates(model, ancestors(model, targets))
    names = _top_names(nodes, targets)
    tops, means = _top_of_every_node(model, names, images, top, batch_size, progress, gates, device, client)
    stats = _window_means(model, nodes, tops, images, batch_size, progress, device, client, weighting, gates)
    return Substitution(stats, select, weighting, tops, means, images)


def _top_names(nodes, targets) -> list[str]:
    """The tensors the first pass ranks: every substituted node's output, and the targets (whose instances fds holds
    attention and layer norms at, and ``Decoded.instances`` lists)."""
    return list(dict.fromkeys([n.output[0] for n in nodes] + list(targets)))


def _gates(model, nodes) -> dict[str, str]:
    """Mul output -> gate tensor of each channel gate (squeeze-and-excitation, ``graph.patterns``) among ``nodes``.
    In fds mode each gate is held at its mean over the images."""
    outputs = {node.output[0] for node in nodes}
    return {mul: p.gate for mul, p in model.patterns.items() if isinstance(p, ChannelGate) and mul in outputs}


#: bytes per value of one image that the second pass holds beside what it fetches (FETCHED_BYTES): a float64 gate
#: map of every chain tensor with the temporaries of its derivative, and the float64 window inputs of the node being
#: cut (values, gates, their padded copy)
GATE_BYTES, CUT_BYTES = 16, 24
FIX = "use fewer neurons or an earlier layer, or raise --memory-budget on a machine with more memory"


def pass_bytes(model, targets, weighting: str = DEFAULT_WEIGHTING) -> tuple[int, int]:
    """Bytes per image of the first and the second pass of ``gather_statistics`` over ``targets``: a pass over
    images holds one batch of these at once, whatever the number of images."""
    nodes, gates, windowed, chain = _passes(model, targets, weighting)
    return _first_bytes(model, _first_reads(nodes, gates, targets)), _window_bytes(model, windowed, chain)


def fetched_tensors(model, targets, weighting: str = DEFAULT_WEIGHTING) -> tuple[list[str], list[str]]:
    """The tensors the first and the second pass of ``gather_statistics`` fetch from onnxruntime (every node's output
    and gate; the nodes' inputs and their gate chains)."""
    nodes, gates, windowed, chain = _passes(model, targets, weighting)
    return _first_reads(nodes, gates, targets), _window_reads(model, windowed, chain)


def _first_reads(nodes, gates, targets) -> list[str]:
    """What the first pass asks onnxruntime for: the tensors it ranks (``_top_names``) and every held gate."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    return _top_names(nodes, targets) + list(gates.values())


def gate_values(model, targets, weighting: str = DEFAULT_WEIGHTING) -> int:
    """Values per image of the gate maps the second pass computes (its time beside onnxruntime's)."""
    chain = _passes(model, targets, weighting)[3]
    return tensor_values(model, [c.output[0] for c in chain])


def _passes(model, targets, weighting: str) -> tuple:
    """What the two passes over ``targets`` read: (the substituted nodes, the held channel gates, the nodes the
    second pass cuts windows of, the nodes whose gates it computes)."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    nodes = [n for n in ancestors(model, targets) if _fds(model, n)]
    gates = _gates(model, ancestors(model, targets))
    windowed = _windowed(model, nodes, gates)
    return nodes, gates, windowed, _chains(model, windowed, weighting, gates)


def _first_bytes(model, reads) -> int:
    """Bytes per image of the first pass: what onnxruntime fetches (every node's output and every gate)."""
    return FETCHED_BYTES * tensor_values(model, reads)


def _windowed(model, nodes, held) -> list:
    """The nodes that get a statistic: all but those reading the image (pixels are not neurons), MaxPool kept."""
    return [n for n in nodes if _fds(model, n) == "switch" or not _gate_chain(model, n.input[0], held)[1]]


def _window_bytes(model, nodes, chain) -> int:
    """Bytes per image of the second pass: what onnxruntime fetches, the gate maps, the widest cut."""
    widest = max((tensor_values(model, [n.input[0]]) for n in nodes), default=0)
    return (FETCHED_BYTES * tensor_values(model, _window_reads(model, nodes, chain)) + CUT_BYTES * widest
            + GATE_BYTES * tensor_values(model, [c.output[0] for c in chain]))


def _window_reads(model, nodes, chain) -> list[str]:
    """What the second pass asks onnxruntime for: the nodes' inputs and every tensor of their gate chains."""
    inside = [n for c in chain for n in (_pattern_nodes(model, c) if isinstance(
        model.patterns.get(c.output[0]), SelfGated) else [c])]  # a self-gated product's derivative reads them all
    return list(dict.fromkeys([n.input[0] for n in nodes] + [t for c in inside for t in [*c.input, *c.output]
                                                             if t and t not in model.constants]))


def _top_of_every_node(model, names, images, top, batch_size, progress, gates, device, client):
    """First pass: the top-N instances of each tensor of ``names`` (all neurons, one per image), and each gate's
    mean."""
    reads = names + list(gates.values())
    batch_size = fitting_batch(_first_bytes(model, reads), batch_size, "the first pass of the fds statistics", FIX)
    options = {"names": names, "gates": gates, "top": top, "batch_size": batch_size}
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
    states = {name: start_top(np.arange(channels_of(model, name)), name, None, 1, top) for name in names}
    sums = Ordered(_add_gates, {mul: 0.0 for mul in gates} if lo == 0 else None)
    for first, batch in images.batches(batch_size, lo):
        if first >= hi:
            break
        sums.add(_first_entry(model, forward(batch), states, gates, first))
        if progress is not None:
            progress(first + len(batch))
    for state in states.values():
        state.ranges = [[lo, min(hi, len(images))]]  # which images it holds, for merge_top's overlap check
    return states, sums


def _first_entry(model, values, states, gates, first) -> dict:
    """One batch of the first pass: ``states`` updated in place, the gate sums returned (its own function, so the
    batch's forward values do not outlive it). Tokens and windows are ranked as maps of their grid (``as_map``)."""
    for name, state in states.items():
        maps = as_map(model, name, np.asarray(values[name], np.float32))
        states[name] = update_top(state, maps.reshape(*maps.shape[:2], -1), first, maps.shape[3])
    return {mul: np.asarray(values[gate], np.float64).sum(axis=(0, 2, 3)) for mul, gate in gates.items()}


def _add_gates(total: dict, entry: dict) -> dict:
    return {mul: total[mul] + entry[mul] for mul in total}


def _merge_first_passes(parts):
    states = {name: merge_top([states[name] for states, _ in parts]) for name in parts[0][0]}
    return states, merge_ordered([sums for _, sums in parts])


def _window_means(model, nodes, tops, images, batch_size, progress, device, client, weighting, held
                  ) -> dict[str, np.ndarray]:
    """Second pass: per node and neuron, the activation-weighted mean gate (or activation) of the input window at
    its instances. Gates are averaged over the instances whose window holds a lower unit at that offset (padding
    has none; an offset no instance holds keeps gate 1); activations count the padding as the zeros it is. A node
    that reads the image has no statistic (pixels are not neurons), except a MaxPool's switch."""
    nodes = _windowed(model, nodes, held)
    weights = {}
    for node in nodes:
        w = instance_weights(tops[node.output[0]])
        weights[node.output[0]] = w / np.maximum(w.sum(axis=1, keepdims=True), 1e-30)
    names = [n.output[0] for n in nodes]
    places = {name: (tops[name].image_index, tops[name].position) for name in names}
    chain = _chains(model, nodes, weighting, held)
    reads = _window_reads(model, nodes, chain)
    batch_size = fitting_batch(_window_bytes(model, nodes, chain), batch_size, "the second pass of the fds statistics",
                               FIX)
    options = {"names": names, "places": places, "weights": weights, "batch_size": batch_size,
               "weighting": weighting, "held": held}
    done = _passed(progress, len(images), len(images))
    if client is None:
        sums = _window_pass(model, images, Forward(model, reads, device), 0, len(images), **options, progress=done)
    else:
        sums = map_blocks(client, _window_pass, model, images, reads, device, 0, len(images), batch_size,
                          merge_ordered, options, progress=done)
    if sums is None:  # no image
        return {}
    with np.errstate(invalid="ignore", divide="ignore"):
        return {name: np.where(den > 0, num / den, 1.0).astype(np.float32) for name, (num, den) in sums.total.items()}


def _window_pass(model, images, forward, lo, hi, names, places, weights, batch_size, weighting, held,
                 progress=None) -> Ordered:
    """Images ``lo..hi-1`` of the second pass: per batch holding instances, their weighted windows (and the weights
    of the offsets that hold a unit) summed per neuron (batches without an instance are not read)."""
    nodes = [model.producer[name] for name in names]
    chain = _chains(model, nodes, weighting, held)
    windows = {n.output[0]: _Window(model, n, model.shapes[n.input[0]]) for n in nodes}
    shapes = {name: windows[name].stat_shape(len(weights[name])) for name in names}
    sums = Ordered(_add_windows, {name: (np.zeros(shapes[name]), np.zeros(shapes[name])) for name in names}
                   if lo == 0 else None)
    for first in range(lo, hi, batch_size):
        stop = min(first + batch_size, len(images))
        found = {name: np.nonzero((index >= first) & (index < stop)) for name, (index, _) in places.items()}
        if not any(len(rows) for rows, _ in found.values()):
            continue
        _, batch = next(images.batches(batch_size, first))
        entry = _window_entry(model, nodes, forward(batch), found, places, windows, weights, first, weighting, chain,
                              held)
        sums.add(entry)
        if progress is not None:
            progress(stop)
    return sums


def _window_entry(model, nodes, values, found, places, windows, weights, first, weighting, chain, held) -> dict:
    """One batch's weighted window sums per node: (neuron rows, sum of weighted values, sum of weights). A function
    of its own so that nothing of one batch (its forward values, gate maps, cuts) outlives it into the next."""
    gates = _gate_maps(model, chain, values, held)
    entry = {}
    for node in nodes:
        name, (index, position) = node.output[0], places[node.output[0]]
        rows, slots = found[name]
        if len(rows) == 0:
            continue
        if windows[name].per_position:  # tokens or a channels-last map: as fetched, laid out as maps by the cut
            shape = np.shape(values[node.input[0]])
        else:
            shape = (len(values[model.input_name]), *model.shapes[node.input[0]][1:])
        acts = np.reshape(values[node.input[0]], shape)  # as fetched: only what is cut is made float64
        gate = None
        if weighting == "gate":
            gate = gates[node.input[0]].reshape(shape) if node.input[0] in gates else np.ones(shape)
        value = _instance_values(windows[name], acts, gate, rows, index[rows, slots] - first, position[rows, slots])
        weighted = weights[name][rows, slots].reshape(-1, *[1] * (value.ndim - 1))
        inside = np.isfinite(value)
        starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])  # rows come sorted from np.nonzero
        entry[name] = (rows[starts], np.add.reduceat(weighted * np.where(inside, value, 0), starts, axis=0),
                       np.add.reduceat(weighted * inside, starts, axis=0))
    return entry


def _add_windows(totals: dict, entry: dict) -> dict:
    for name, (rows, values, held_weights) in entry.items():
        totals[name][0][rows] += values
        totals[name][1][rows] += held_weights
    return totals


def _instance_values(window, acts, gate, rows, image, position):
    """Per instance, what its statistic averages: the gates of the input window (NaN where it reads padding), its
    activations (zero there) or, for MaxPool, the one-hot switch (times the gate at the switch)."""
    if window.switches:
        switch = window.switch(acts, rows, image, position).astype(np.float64)
        if gate is None:
            return switch
        return np.where(switch > 0, np.nan_to_num(window.cut(gate, rows, image, position, np.nan)), 0.0)
    if gate is None:
        return window.cut(acts, rows, image, position, 0.0).astype(np.float64)
    return window.cut(gate, rows, image, position, np.nan)


# ---- gates: the slope of the nonlinearities between a lower unit and the node that reads it ------------------
def _chains(model, nodes, weighting: str, held: dict) -> list:
    """The nodes (graph order) whose gates reach the inputs of ``nodes``; none for the activation weighting."""
    if weighting != "gate":
        return []
    inside = {id(c) for n in nodes for c in _gate_chain(model, n.input[0], held)[0]}
    return [c for c in model.nodes if id(c) in inside]


def _gate_chain(model, name: str, held: dict) -> tuple[list, bool]:
    """The nodes whose gates reach tensor ``name`` (back to the ops that start a gate), and whether a path from
    the image reaches it through them (then ``name`` holds pixels, not neurons)."""
    chain, pixels, stack = {}, False, [name]
    while stack:
        tensor = stack.pop()
        pixels = pixels or tensor == model.input_name
        node = model.producer.get(tensor)
        passed = None if node is None else _passed_inputs(model, node, held)
        if passed is not None and id(node) not in chain:
            chain[id(node)] = node
            stack.extend(passed)
    return [n for n in model.nodes if id(n) in chain], pixels


def _passed_inputs(model, node, held: dict) -> list[str] | None:
    """The data inputs whose gate ``node`` passes on (times its own slope); None where ``node`` starts a gate
    (a Conv, a pool, a sum of maps, any op not listed: the lower unit itself)."""
    data = [n for n in node.input if n and n not in model.constants]
    op, pattern = RULES.get(node.op_type), model.patterns.get(node.output[0])
    passed = None if op is None else op.gate_inputs(node, data)  # the op's own reading (``OpRule.gate_inputs``)
    if passed is not None:
        return passed
    if isinstance(pattern, SelfGated):  # x * f(x): one elementwise nonlinearity of x
        return [pattern.x]
    if isinstance(pattern, ChannelGate) and node.output[0] in held or isinstance(pattern, TokenScale):
        return [pattern.x]  # a held gate or normalization scale: the map's gate passes
    return None


def _gate_maps(model, chain: list, values: dict, held: dict) -> dict[str, np.ndarray]:
    """Each chain tensor's gate map for the batch (float64; NaN where no lower unit is, e.g. a Pad's ring)."""
    gates = {}

    def gate(name):
        if name not in gates:
            gates[name] = np.ones(np.shape(values[name]))
        return gates[name]

    for node in chain:
        passed, out = _passed_inputs(model, node, held), node.output[0]
        pattern = model.patterns.get(out)
        if isinstance(pattern, SelfGated):  # its derivative over the slope the bank already carries
            slope = np.asarray(pattern.slope, np.float64)
            slope = slope.reshape(-1, 1, 1) if slope.ndim else slope
            gates[out] = gate(passed[0]) * _derivative(model, _pattern_nodes(model, node), pattern.x, values) / slope
        elif RULES[node.op_type].gate_slope:  # a nonlinearity: times its slope
            gates[out] = gate(passed[0]) * _derivative(model, [node], node.input[0], values)
        else:  # moved (Pad, Transpose, Concat) or passed unchanged: reshaped, or broadcast by a constant operand
            gates[out] = RULES[node.op_type].gate_map(node, [gate(n) for n in passed], np.shape(values[out]),
                                                      model.constants)
    return gates


def _pattern_nodes(model, node) -> list:
    """The nodes of a self-gated product ``a * b`` (both elementwise chains from its x, and the Mul), in graph
    order."""
    inside = {id(n) for n in gated_nodes(node, model.patterns[node.output[0]].x, model.producer, model.constants,
                                         model.shapes)}
    return [n for n in model.nodes if id(n) in inside]


def _derivative(model, nodes: list, x: str, values: dict) -> np.ndarray:
    """d out / d x through elementwise ``nodes`` (out: the last one's output): ``local``'s rules run backward
    from a unit signal; for elementwise ops that is exactly the slope of each value."""
    grads = {nodes[-1].output[0]: np.ones(np.shape(values[nodes[-1].output[0]]))}
    for node in reversed(nodes):
        grad = grads.pop(node.output[0], None)
        if grad is None:
            continue
        is_data = [bool(n) and n not in model.constants for n in node.input]
        ins = [(np.asarray(values[n], np.float64) if data else model.constants.get(n)) if n else None
               for n, data in zip(node.input, is_data)]
        out, op = np.asarray(values[node.output[0]], np.float64), RULES[node.op_type]
        if hasattr(op, "slope"):  # the slope alone: the rule's offset (its bias) is not needed here
            in_grads = [grad * op.slope(np, node, ins, out)]
        else:
            in_grads, _ = op.backward(node, ins, is_data, out, grad)
        for name, g in zip(node.input, in_grads):
            if g is not None and name and name not in model.constants:
                grads[name] = grads[name] + g if name in grads else g
    return grads.get(x, np.zeros(np.shape(values[x])))


def _passed(progress, offset: int, count: int):
    """``progress(done, total)`` over both passes as ``done(images reached in one pass, *ignored)``; None without."""
    if progress is None:
        return None
    return lambda at, *_: progress(offset + at, 2 * count)


class _Window:
    """Which input values a node's output position reads (``fill`` in the padding)."""

    def __init__(self, model, node, shape):
        self.switches, self.rank = _fds(model, node) == "switch", len(shape)
        self.channels, self.neurons = shape[1], model.shapes[node.output[0]][1]
        self.per_position = _per_position(model, node)
        if self.per_position:  # a 1x1 window over the last axis at the instance's own position
            self.channels, self.windows = shape[-1], windows_per_image(model, node.input[0])
            return
        if self.rank == 2:
            return
        attrs = attributes(node)
        if self.switches:
            kernel, self.groups = None, shape[1]
        else:
            kernel, self.groups = model.constants[node.input[1]].shape[2:], int(attrs.get("group", 1))
        window = Window.of(attrs, shape[2:], kernel)
        self.kernel, self.strides, self.dilations = window.kernel, window.strides, window.dilations
        self.begin, self.end = window.begin, window.end

    def stat_shape(self, k: int) -> tuple[int, ...]:
        if self.rank == 2 or self.per_position:
            return (k, self.channels)
        return (k, self.channels // self.groups, *self.kernel)

    def cut(self, values: np.ndarray, rows, image, position, fill: float) -> np.ndarray:
        """[M, C/g, k_y, k_x] windows (or [M, F] vectors) of instance m = (neuron rows[m], image, position)."""
        if self.per_position:
            maps = to_maps(values, values.ndim - 1, self.windows)
            return maps[image, :, position[:, 0], position[:, 1]]
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
        op = RULES.get(node.op_type)
        replaced = None if op is None else op.substituted_node(node, stat, linear, substitution, constants)
        if replaced is None:
            return f"the fds statistics of {node.op_type} node {linear.node_name(node)!r} have no data-free form here"
        nodes.append(replaced)
    producer, consumers = wiring(nodes)
    return dataclasses.replace(linear, nodes=nodes, constants=constants, producer=producer, consumers=consumers)
