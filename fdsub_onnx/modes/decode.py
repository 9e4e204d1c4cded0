"""One dispatcher for every mode: ``decode`` (one layer) and ``iter_decode`` (several layers in one pass)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from ..compose.backend import get_backend, resolve_device
from ..compose.engine import KERNELS, Engine
from ..compose.inspect import channels_of, inspect_model, memory_problem
from ..compose.values import Blocked, Tensor
from ..compose.walker import walk
from ..data.topn import rows_of
from ..defaults import DEFAULT_SELECT, DEFAULT_WEIGHTING
from ..errors import FdsubError
from ..graph.model import Model, ancestors, find_layer
from ..neurons import parse_neurons
from .fds import gather_statistics
from .gates import channel_gates, layer_norms, reference_gates
from .local import decode_instances
from .result import Decoded

MODES = ("weights", "fds", "local", "deconvnet")
INSTANCE_MODES = ("local", "deconvnet")  # per-instance backward passes, no bottom-up composition


def decode(model: Model, layer: str, neurons=None, mode: str = "weights", dtype: str = "float32", device="cpu",
           kernel: str = "fast", images=None, top: int = 100, select: str = DEFAULT_SELECT, substitution=None,
           per_instance: bool = False, gate_reference=None, client=None, weighting: str = DEFAULT_WEIGHTING
           ) -> Decoded:
    """Decode the selected neurons (see ``parse_neurons``) of ``layer`` into image-space filters.

    ``mode="fds"`` substitutes with statistics of ``images`` (each neuron's ``top`` instances, the
    ``select`` rule, the ``weighting``), or with a ready ``substitution`` from ``gather_statistics``. ``"local"`` and
    ``"deconvnet"`` average each neuron's per-instance filters (kept with ``per_instance``).
    ``device`` is "cpu", "gpu" or "auto" (``resolve_device``): where the filters are composed and
    onnxruntime runs; the result is NumPy either way. In ``weights`` mode channel gates (squeeze-and-excitation)
    are held at their value on ``gate_reference`` (an image set: their mean over it; default the all-zeros input,
    see ``modes.gates``); the values used are in ``Decoded.gates``. With a Dask ``client`` the passes over
    ``images`` run on the cluster (``runtime.cluster``), with the same result.
    """
    target = find_layer(model, layer).output[0]
    for result in _decode_layers(model, [target], {target: neurons}, mode, dtype, device, kernel, images, top, select,
                                 substitution, per_instance, gate_reference, one_layer=True, client=client,
                                 weighting=weighting):
        return result
    raise FdsubError(f"layer {layer!r} is not reachable from the image input {model.input_name!r}")


def iter_decode(model: Model, layers: Iterable[str] | None = None, mode: str = "weights", dtype: str = "float32",
                device="cpu", kernel: str = "fast", images=None, top: int = 100, select: str = DEFAULT_SELECT,
                substitution=None, neurons: dict | None = None, gate_reference=None, client=None,
                weighting: str = DEFAULT_WEIGHTING) -> Iterator[Decoded]:
    """Decode several layers (default: every decodable layer) in one bottom-up pass, in graph order.

    ``neurons`` maps a layer's output tensor to the neurons to return (a ``parse_neurons`` selector; default
    all). A layer that no other decoded layer reads is then composed for those neurons only: the deepest
    layers, whose banks are the largest, cost what the neurons asked cost. In ``local`` and ``deconvnet`` mode
    each layer runs its own per-instance passes (nothing is shared between layers).
    """
    _check_mode(mode, dtype, kernel)
    if layers is None:
        layers = [layer.name for layer in inspect_model(model).layers if layer.decodable]
    nodes = {id(find_layer(model, name)) for name in layers}
    targets = [n.output[0] for n in model.nodes if id(n) in nodes]
    yield from _decode_layers(model, targets, dict(neurons or {}), mode, dtype, device, kernel, images, top, select,
                              substitution, False, gate_reference, one_layer=False, client=client,
                              weighting=weighting)


def _decode_layers(model, targets, neurons: dict, mode, dtype, device, kernel, images, top, select, substitution,
                   per_instance, gate_reference, one_layer: bool, client=None,
                   weighting: str = DEFAULT_WEIGHTING) -> Iterator[Decoded]:
    """The setup ``decode`` and ``iter_decode`` share: check, resolve, substitute, bound memory, walk once.

    ``one_layer``: ``decode``'s rule for the rows composed (all of them when the layer feeds several nodes).
    """
    _check_mode(mode, dtype, kernel)
    device = resolve_device(device)
    if mode in INSTANCE_MODES:
        if images is None:
            raise FdsubError(f"{mode} mode needs images to select each neuron's top instances; pass --images")
        for target in targets:
            yield decode_instances(model, target, images, top=top, neurons=neurons.get(target), rule=mode,
                                   per_instance=per_instance, device=device, dtype=dtype, client=client)
        return
    substitution = _substitution_for(mode, model, targets, images, top, select, substitution, device, client,
                                     weighting)
    gates = substitution.gates if substitution is not None else reference_gates(model, targets, gate_reference, device)
    engine = Engine(get_backend(device.backend), dtype, kernel)
    channels = {t: channels_of(model, t) for t in targets}
    picked = {t: parse_neurons(neurons.get(t), channels[t], t) for t in targets
              if channels[t] is not None and (one_layer or neurons.get(t) is not None)}
    if one_layer:
        rows = {t: p for t, p in picked.items() if len(model.consumers.get(t, ())) <= 1} or None
    else:
        rows = leaf_rows(model, targets, picked)
    _check_memory(model, engine, targets, rows)
    wanted = set(targets)
    for node, value in _quiet(walk(model, engine, targets=targets, compose=True, rows=rows, substitution=substitution,
                                   gates=gates)):
        target = node.output[0]
        if target not in wanted:
            continue
        result = _decoded(model, node, value, picked.get(target, neurons.get(target)), engine, mode)
        held = [*channel_gates(model, [target]), *layer_norms(model, [target])]
        result.gates = {name: np.asarray(gates[name]) for name in held if name in gates}
        if substitution is not None and substitution.tops and target in substitution.tops:
            result.instances = rows_of(substitution.tops[target], result.neurons)
        yield result


def _quiet(steps: Iterator) -> Iterator:
    """The walk's steps with NumPy's overflow warnings off: a filter that overflows ends up not finite, which
    ``Decoded.degenerate`` names per neuron (the CLI warns with the cause), instead of raw RuntimeWarnings."""
    while True:
        with np.errstate(over="ignore", invalid="ignore"):
            step = next(steps, None)
        if step is None:
            return
        yield step


def leaf_rows(model, targets, picked: dict) -> dict | None:
    """``picked`` (target -> neuron indices) kept for the targets that no node below the other targets reads: the
    ones whose banks can be composed for those rows only (``walk``'s ``rows``)."""
    read = {name for node in ancestors(model, targets) for name in node.input}
    return {t: rows for t, rows in picked.items() if t in targets and t not in read} or None


def _decoded(model, node, value, neurons, engine, mode) -> Decoded:
    if isinstance(value, Blocked):
        raise FdsubError(f"layer {node.output[0]!r} is not decodable: {value.reason}")
    if not isinstance(value, Tensor):
        raise FdsubError(f"layer {node.output[0]!r} is not a feature map")
    picked = parse_neurons(neurons, value.channels, node.output[0])
    whole = value.rows is not None or np.array_equal(picked, np.arange(value.channels))
    bank = value.bank if whole else engine.take(value.bank, picked)
    to_numpy = engine.backend.to_numpy
    return Decoded(to_numpy(bank.filters), to_numpy(bank.bias), picked, value.geom.stride, value.geom.origin,
                   node.output[0], mode, value.geom.bounds)


def _check_memory(model, engine, targets, rows):
    """Refuse, before any work, a decode whose filter banks cannot fit in memory."""
    problem = memory_problem(model, engine, targets, rows)
    if problem:
        raise FdsubError(problem)


def _substitution_for(mode, model, targets, images, top, select, substitution, device, client, weighting):
    """None in ``weights`` mode; in ``fds`` mode the given substitution or one gathered from ``images``."""
    if mode != "fds":
        return None
    if substitution is not None:
        return substitution
    if images is None:
        raise FdsubError("fds mode needs images to select each neuron's top instances; pass --images")
    return gather_statistics(model, targets, images, top=top, select=select, device=device, client=client,
                             weighting=weighting)


def _check_mode(mode, dtype, kernel):
    if mode not in MODES:
        raise FdsubError(f"mode {mode!r} is not available; choose one of {', '.join(MODES)}")
    if str(dtype) not in ("float32", "float64"):
        raise FdsubError(f"dtype must be float32 or float64, got {dtype!r}")
    if kernel not in KERNELS:
        raise FdsubError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
