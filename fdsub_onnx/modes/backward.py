"""Per-instance backward passes: the `local` filters (exact input gradients) and the deconvnet projections.

For one instance (image, neuron k, output position q) a ReLU/MaxPool network is linear around
the image: response = <D_local, image> + beta_local. ``D_local`` is the input gradient, got here
by one backward pass per instance through the forward activations that onnxruntime captured,
and ``beta_local`` collects every bias the active paths carry (so the identity is a real check,
not a definition). The deconvnet (Zeiler & Fergus) runs the same pass with ReLU applied to the
backward signal instead of the forward on/off mask; MaxPool switches come from the forward pass.

This module is the pass machinery (seeds, accumulation, pass sizing); each op's rule is a reading of its class in
``compose/ops`` (``OpRule.backward``, the ``deconvnet`` override, the adjoint's ``adjoint``), batched over M
instances: arrays are [M, ...]. AveragePool windows that overlap the padding with count_include_pad=0 are treated
as interior ones (a border effect only).
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np

from ..compose.backend import array_module, get_backend, ordered_map, resolve_device, usable_cores
from ..compose.ops import RULES
from ..compose.ops._rule import batched, instances_of_pass
from ..errors import FdsubError, NotDecodable
from ..graph.fold import batch_first
from ..graph.model import ancestors, channel_axis, wiring
from ..runtime.session import Forward

#: the backward modes: the reading of each op's class a pass runs
BACKWARD_MODES = {"local": "backward", "deconvnet": "deconvnet"}


def instance_gradients(model, target: str, images: np.ndarray, neurons, positions, rule: str = "local",
                       forward: Forward | None = None, device="cpu", dtype="float64"):
    """Input gradients [M, C, H, W] and local biases [M] of neuron ``neurons[m]`` at ``positions[m]`` on ``images[m]``.

    ``forward`` (from ``forward_for``) reuses one onnxruntime session across calls. On ``device="gpu"``
    the pass runs in CuPy and returns CuPy arrays. ``dtype`` is that of the pass (float64 or float32).
    """
    if rule not in BACKWARD_MODES:
        raise FdsubError(f"backward rule must be one of {', '.join(BACKWARD_MODES)}, got {rule!r}")
    device = resolve_device(device)
    backend = get_backend(device.backend)
    forward = forward if forward is not None else forward_for(model, target, device)
    passing, nodes = pass_model(model, target)
    if len(images) > 1 and batch_moves(passing, nodes):  # one image's values per pass
        parts = [instance_gradients(model, target, images[i : i + 1], np.asarray(neurons)[i : i + 1],
                                    np.asarray(positions).reshape(-1, 2)[i : i + 1], rule, forward, device, dtype)
                 for i in range(len(images))]
        return backend.xp.concatenate([p[0] for p in parts]), backend.xp.concatenate([p[1] for p in parts])
    values = ShapedValues({name: backend.asarray(value, dtype) for name, value in forward(images).items()}, passing)
    seed = one_hot(backend, values[target].shape, neurons, positions, dtype, channel_axis(model, target))
    grads, bias = backward(passing, nodes, values, {target: seed}, BACKWARD_MODES[rule], rule)
    if model.input_name not in grads:
        raise FdsubError(f"layer {target!r} does not depend on the image input")
    return grads[model.input_name], bias


def image_gradients(model, target: str, values: dict, neurons, positions, rule: str = "local", nodes=None):
    """As ``instance_gradients`` for M instances of one image, whose forward ``values`` (tensor -> [1, ...], on
    the backend, in the pass's dtype) they share: the masks and switches are read once, broadcast over them."""
    first = values[target]
    backend = get_backend("cupy" if type(first).__module__.startswith("cupy") else "numpy")
    nodes = nodes if nodes is not None else ancestors(model, [target])
    if model.shapes[target][0] != model.input_shape[0]:  # windows or patches on the batch axis: one seed at a time
        positions = np.asarray(positions, np.int64).reshape(-1, 2)
        grads, bias = _joined([backward(model, nodes, values, {target: seed_at(backend, model, target, first.shape,
                                                                               neuron, position, first.dtype)},
                                        BACKWARD_MODES[rule], rule, instances=1)
                               for neuron, position in zip(neurons, positions)])
    else:
        seed = one_hot(backend, (len(neurons), *first.shape[1:]), neurons, positions, first.dtype,
                       channel_axis(model, target))
        grads, bias = backward(model, nodes, values, {target: seed}, BACKWARD_MODES[rule], rule)
    if model.input_name not in grads:
        raise FdsubError(f"layer {target!r} does not depend on the image input")
    return grads[model.input_name], bias


def one_hot(backend, shape, neurons, positions, dtype, axis: int = 1):
    """Seeds [M, C, H, W], tokens [M, T, C] (``axis`` 2, the channel axis: position (0, t) is token t) or [M, C]: a 1
    at channel ``neurons[m]`` and position ``positions[m]`` of row m."""
    seed = backend.zeros(shape, dtype)
    m = np.arange(shape[0])
    positions = np.asarray(positions, np.int64).reshape(-1, 2)
    if seed.ndim == 4 and axis == 3:  # a channels-last map
        seed[m, positions[:, 0], positions[:, 1], np.asarray(neurons)] = 1.0
    elif seed.ndim == 4:
        seed[m, np.asarray(neurons), positions[:, 0], positions[:, 1]] = 1.0
    elif seed.ndim == 3 and axis == 2:
        seed[m, positions[:, 1], np.asarray(neurons)] = 1.0
    elif seed.ndim == 3:
        seed[m, np.asarray(neurons), positions[:, 1]] = 1.0
    else:
        seed.reshape(shape[0], -1)[m, np.asarray(neurons)] = 1.0
    return seed


def seed_at(backend, model, target: str, shape, neuron: int, position, dtype):
    """One seed in the target's own shape, whose batch axis holds windows or patches (``graph.model.grid``: their
    rows one after the other): tokens [W, T, C] at (window, token); channels-last windows [W, y, x, C] and maps
    [W, C, y, x] at (window-major row, column); rows of tokens [T, C] at (token, 0)."""
    seed = backend.zeros(tuple(shape), dtype)
    (row, column), neuron = (int(v) for v in position), int(neuron)
    if len(shape) == 2:  # rows of tokens [T, C] at (token, 0)
        seed[row, neuron] = 1.0
    elif len(shape) == 3:
        seed[row, column, neuron] = 1.0
    elif channel_axis(model, target) == 3:
        seed[row // shape[1], row % shape[1], column, neuron] = 1.0
    else:
        seed[row // shape[2], neuron, row % shape[2], column] = 1.0
    return seed


def backward(model, nodes: list, values, grads: dict, reading: str, label: str, run=None, instances: int | None = None):
    """Run each op's ``reading`` (``"backward"``, ``"deconvnet"``, ``"adjoint"``: a method of its class) backwards
    over ``nodes`` (graph order), from the seeded ``grads`` (tensor -> [M, ...]).

    ``values`` maps a tensor to its forward value [M, ...] (read through ``values[name]``, so a mapping that
    makes them on demand works). ``run(op, node, ins, is_data, out, grad)``, when given, runs each step in the op's
    place (the cone pass cuts and places around it). ``instances=1``: the seeds are one instance in the target's own
    shape (its batch axis holding windows or patches). Returns the gradients left, those of the tensors the nodes
    read but do not produce (the image, or the tensor a pass stops at), and the bias [M] the nodes add.
    """
    first = next(iter(grads.values()))
    if instances == 1:  # one seed in its tensor's own shape (a target whose batch axis holds windows or patches)
        with instances_of_pass(1):
            return _backward(model, nodes, values, grads, reading, label, run, first[:1])
    if len(first) > 1 and batch_moves(model, nodes):  # one instance at a time, each in its tensors' own shapes,
        def one(i):  # as many at once as cores (ordered_map: BLAS one thread each)
            return backward(model, nodes, values, {name: g[i : i + 1] for name, g in grads.items()}, reading, label,
                            run)

        return _joined(list(ordered_map(one, range(len(first)), usable_cores())))
    with instances_of_pass(len(first)):
        return _backward(model, nodes, values, grads, reading, label, run, first)


def _joined(parts: list) -> tuple[dict, object]:
    """The results ``(gradients left, bias)`` of passes of one instance each, as one pass of them all."""
    xp = array_module(parts[0][1])
    return ({name: xp.concatenate([grads[name] for grads, _ in parts]) for name in parts[0][0]},
            xp.concatenate([bias for _, bias in parts]))


def pass_model(model, target: str):
    """``(model, nodes)`` a backward pass to ``target`` runs over: the model's own, or where a tensor holds the batch
    elsewhere than first (attention's head split) the same network with that split moved before its transpose
    (``graph.fold.batch_first``), so that instances ride side by side; its new tensors' forward values are read as
    shapes only (``ShapedValues``: the rules of a split, a reshape and a transpose need no more)."""
    nodes = ancestors(model, [target])
    if not batch_moves(model, nodes):
        return model, nodes
    constants, shapes = dict(model.constants), dict(model.shapes)
    moved = batch_first(nodes, constants, shapes)
    producer, consumers = wiring(moved)
    rewritten = dataclasses.replace(model, nodes=moved, constants=constants, shapes=shapes, producer=producer,
                                    consumers=consumers)
    return (model, nodes) if batch_moves(rewritten, moved) else (rewritten, moved)


class ShapedValues(dict):
    """Forward values, and for a tensor no rule reads values of (``read_values``; those a rewritten pass adds) zeros
    of one image's shape (a broadcast view, no memory)."""

    def __init__(self, values: dict, model):
        super().__init__(values)
        self.model = model

    def __missing__(self, name):
        first = next(iter(self.values()))
        value = array_module(first).broadcast_to(array_module(first).zeros((), first.dtype),
                                                 tuple(self.model.shapes[name]))  # windows on the batch axis kept
        self[name] = value
        return value


def batch_moves(model, nodes: list) -> bool:
    """Whether a tensor of ``nodes`` has its batch axis elsewhere than first (a size other than 1 there: attention's
    ``[3, 1, h, T, d]``), so that instances cannot ride side by side on axis 0."""
    batch = model.input_shape[0]
    for node in nodes:
        for name in (*node.input, *node.output):
            shape = model.shapes.get(name) if name and name not in model.constants else None
            if shape and shape[0] != batch:
                return True
    return False


def _backward(model, nodes, values, grads, reading, label, run, first):
    xp = array_module(first)
    bias = xp.zeros((len(first),), first.dtype)
    for node in reversed(nodes):
        outs = [grads.pop(name, None) if name else None for name in node.output]
        if all(g is None for g in outs):
            continue
        grad = outs[0]
        op = RULES.get(node.op_type)
        if op is not None and op.multi_output:  # one gradient per output (zeros for an output nothing reads)
            grad = [g if g is not None else xp.zeros(batched(values[name], first), first.dtype)
                    for name, g in zip(node.output, outs)]
        elif grad is None:
            raise FdsubError(f"{label} mode: {node.op_type} node {model.node_name(node)!r}: only its first output "
                             "can be followed")
        if op is None or not (op.implements(reading) or op.refuses_reading(reading)):
            raise FdsubError(f"{label} mode does not support op {node.op_type} (node {model.node_name(node)!r}) yet")
        is_data = [bool(name) and name not in model.constants for name in node.input]
        ins = [(values[name] if data else model.constants.get(name)) if name else None
               for name, data in zip(node.input, is_data)]
        try:
            if run is None:
                in_grads, added = getattr(op, reading)(node, ins, is_data, values[node.output[0]], grad)
            else:
                in_grads, added = run(op, node, ins, is_data, values[node.output[0]], grad)
        except NotDecodable as exc:
            raise FdsubError(f"{label} mode: {node.op_type} node {model.node_name(node)!r}: {exc}") from None
        bias += added
        for name, g in zip(node.input, in_grads):
            if g is not None and name and name not in model.constants:  # in the pass's dtype, whatever a rule made
                _accumulate(grads, name, g if g.dtype == first.dtype else g.astype(first.dtype))
    return grads, bias


def _accumulate(grads: dict, name: str, g) -> None:
    """``grads[name] += g``: in place when nothing else can see ``grads[name]``'s memory (no other reference to
    it or to a view of its buffer; a rule may hand one gradient to several inputs), else into a new array. In
    place, a sum over a wide map makes no new map (whose pages the system would fault in again)."""
    have = grads.get(name)
    if have is None:
        grads[name] = g
    elif (have.shape == g.shape and have.dtype == g.dtype and getattr(have.flags, "writeable", True)
          and sys.getrefcount(have) == 3 and (have.base is None or sys.getrefcount(have.base) == 2)):
        have += g  # the references: the dict, ``have``, getrefcount's argument; the base's: have's, the argument
    else:
        grads[name] = have + g


def deconvnet_is_local(model, target: str) -> bool:
    """Whether no op below ``target`` overrides its backward rule for deconvnet (no rectifier): deconvnet then
    projects what ``local`` does, with bias 0, and one backward pass serves both."""
    return not any(RULES[n.op_type].overrides("deconvnet") for n in ancestors(model, [target]) if n.op_type in RULES)


def read_values(model, nodes: list, cut: bool = False) -> set[str]:
    """The tensors whose values some rule of a backward pass over ``nodes`` reads (``OpRule.values_read``: windows,
    sums, reshapes and products by a constant read only shapes, MaxPool's switches the whole maps, a Relu its input,
    not its output); ``cut``: those a cone pass cuts to each instance's cone (``OpRule.cone_values``: not MaxPool's,
    whose switches are found on the whole maps)."""
    read = set()
    for node in nodes:
        op = RULES.get(node.op_type)
        kept = "all" if op is None else op.cone_values if cut else op.values_read(node, model.constants)
        if kept != "shapes":
            read.update(node.input if kept == "inputs" else [*node.input, *node.output])
    return read - set(model.constants) - {""}


def forward_for(model, target: str, device="cpu", threads: int | None = None, passing=None) -> Forward:
    """The onnxruntime session computing the tensors below ``target`` that a backward pass reads (``read_values``:
    fetching every tensor made onnxruntime 3x slower on ViT-S), and the target; ``passing``: the ``(model, nodes)``
    of ``pass_model`` where the caller has it."""
    passing, nodes = pass_model(model, target) if passing is None else passing
    produced = {o for n in model.nodes for o in n.output}
    return Forward(model, sorted((read_values(passing, nodes) | {target}) & produced), device, threads)


def per_image_bytes(model, target: str, itemsize: int, largest: int | None = None) -> tuple[int, int]:
    """(bytes of one image's forward values below ``target``: float32 from onnxruntime plus their copy in the pass's
    dtype, bytes of one instance's backward pass: about four of its largest gradients alive with temporaries).
    ``largest``: values of the largest gradient one instance holds (its cone's cut, which for a field wider than the
    image reaches into the padding: 4 x 4 x 14 M on EfficientNet-Lite2's blocks.16, 236 MB measured); default the
    largest map."""
    sizes = [int(np.prod(model.shapes[o][1:])) for n in ancestors(model, [target]) for o in n.output
             if o and o in model.shapes]
    return (4 + itemsize) * sum(sizes), 4 * itemsize * (largest or max(sizes, default=1))


def pass_sizes(model, target: str, most: int, backend, itemsize: int, workers: int = 1,
               largest: int | None = None) -> tuple[int, int]:
    """(instances per backward pass, images per onnxruntime run) of a decode whose passes each carry their own
    cut of the forward values: at most ``most`` instances and 8 images, fewer where a quarter of the memory left
    (``backend.free_bytes``), shared by the ``workers`` passes that run at once, cannot hold them. VGG19 at 224
    needs about 700 MB per instance in float64. ``largest``: as for ``per_image_bytes``."""
    image, instance = per_image_bytes(model, target, itemsize, largest)
    room = backend.free_bytes() // 4 // max(workers, 1)
    return (int(max(1, min(most, (room - image) // max(instance, 1)))),
            int(max(1, min(8, room // 2 // max(image, 1)))))
