"""Public entry points: inspect a model's layers and decode neurons into image-space filters."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import numpy as np

from ._backend import get_backend, resolve_device
from ._engine import KERNELS, Engine
from ._errors import FdsubError
from ._model import Model
from ._neurons import parse_neurons
from ._values import Blocked, Tensor
from ._walker import _ancestors, walk
from .ops import LAYER_OPS

MODES = ("weights", "fds", "local", "deconvnet")
MEMORY_MARGIN = 1.25  # temporaries of the conv kernel and of aligned sums


@dataclass
class Layer:
    """One layer as listed by ``inspect`` (the JSON contract's fields)."""

    name: str
    node: str
    op: str
    channels: int | None
    stride: list[int] | None
    receptive_field: list[int] | None
    origin: list[int] | None
    decodable: bool
    reason: str | None


@dataclass
class Summary:
    input_name: str
    input_shape: list[int]
    layers: list[Layer]

    def to_json(self) -> dict:
        return {"input": {"name": self.input_name, "shape": self.input_shape}, "layers": [asdict(layer) for layer in self.layers]}


@dataclass
class Decoded:
    """Decoded filters of some neurons of one layer.

    For neuron ``neurons[k]`` at output position (qy, qx) whose receptive field lies in
    the image: response = sum(filters[k] * image[:, oy+qy*sy : oy+qy*sy+ry, ox+qx*sx : ox+qx*sx+rx]) + bias[k].
    """

    filters: np.ndarray  # [K, C_image, R_y, R_x]
    bias: np.ndarray  # [K]
    neurons: np.ndarray  # [K]
    stride: tuple[int, int]
    origin: tuple[int, int]
    layer: str
    mode: str
    bounds: tuple[tuple[int, int], tuple[int, int]] | None = None  # set after a crop; see _geometry
    instance_filters: np.ndarray | None = None  # local/deconvnet --per-instance: [K, N, C, R_y, R_x]
    instance_bias: np.ndarray | None = None  # [K, N]
    instances: object = None  # the TopN a data-driven decode used (saved as top.npz)

    @property
    def receptive_field(self) -> tuple[int, int]:
        return tuple(self.filters.shape[2:])

    def interior(self, image_size, out_size) -> np.ndarray:
        """Boolean [Q_y, Q_x] mask of output positions whose receptive field lies in the image (and bounds)."""
        masks = []
        for a in range(2):
            lo, hi = (0, image_size[a]) if self.bounds is None else (max(0, self.bounds[a][0]), min(image_size[a], self.bounds[a][1]))
            start = self.origin[a] + np.arange(out_size[a]) * self.stride[a]
            masks.append((start >= lo) & (start + self.filters.shape[2 + a] <= hi))
        return masks[0][:, None] & masks[1][None, :]


def inspect_model(model: Model) -> Summary:
    """Every Conv, pooling and fully connected layer with its geometry and decodability."""
    layers = []
    for node, value in walk(model, Engine(get_backend("numpy"))):
        if node.op_type in LAYER_OPS:
            layers.append(_layer(model, node, value))
    return Summary(model.input_name, list(model.input_shape), layers)


def find_layer(model: Model, name: str):
    """The node whose output tensor (or node name) is ``name``; a clear error with suggestions otherwise."""
    node = model.producer.get(name) or next((n for n in model.nodes if n.name == name), None)
    if node is not None:
        return node
    candidates = [n.output[0] for n in model.nodes if n.op_type in LAYER_OPS]
    close = difflib.get_close_matches(name, candidates + [n.name for n in model.nodes if n.name], n=3)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "; `fdsub inspect` lists the layers"
    raise FdsubError(f"no layer named {name!r} in {model.path}{hint}")


def decode(model: Model, layer: str, neurons=None, mode: str = "weights", dtype: str = "float32", device="cpu",
           kernel: str = "fast", images=None, top: int = 100, select: str = "positive", substitution=None,
           per_instance: bool = False) -> Decoded:
    """Decode the selected neurons (see ``parse_neurons``) of ``layer`` into image-space filters.

    ``mode="fds"`` substitutes with statistics of ``images`` (each neuron's ``top`` instances, the
    ``select`` rule), or with a ready ``substitution`` from ``gather_statistics``. ``"local"`` and
    ``"deconvnet"`` average each neuron's per-instance filters (kept with ``per_instance``).
    ``device`` is "cpu", "gpu" or "auto" (``resolve_device``): where the filters are composed and
    onnxruntime runs; the result is NumPy either way.
    """
    _check_mode(mode, dtype, kernel)
    device = resolve_device(device)
    node = find_layer(model, layer)
    target = node.output[0]
    if mode in ("local", "deconvnet"):
        if images is None:
            raise FdsubError(f"{mode} mode needs images to select each neuron's top instances; pass --images")
        from ._local import decode_instances  # imports capture, which imports this module

        return decode_instances(model, target, images, top=top, neurons=neurons, rule=mode, per_instance=per_instance,
                                device=device)
    substitution = _substitution_for(mode, model, [target], images, top, select, substitution, device)
    channels = _channels(model, target)
    picked = parse_neurons(neurons, channels, target) if channels is not None else None
    engine = Engine(get_backend(device.backend), dtype, kernel)
    rows = {target: picked} if picked is not None and len(model.consumers.get(target, ())) <= 1 else None
    _check_memory(model, engine, [target], rows)
    for current, value in walk(model, engine, targets=[target], compose=True, rows=rows, substitution=substitution):
        if current is node:
            result = _decoded(model, node, value, neurons, engine, mode)
            if substitution is not None and substitution.tops and target in substitution.tops:
                from ._capture import rows_of

                result.instances = rows_of(substitution.tops[target], result.neurons)
            return result
    raise FdsubError(f"layer {layer!r} is not reachable from the image input {model.input_name!r}")


def iter_decode(model: Model, layers: Iterable[str] | None = None, mode: str = "weights", dtype: str = "float32",
                device="cpu", kernel: str = "fast", images=None, top: int = 100, select: str = "positive",
                substitution=None, neurons: dict | None = None) -> Iterator[Decoded]:
    """Decode several layers (default: every decodable layer) in one bottom-up pass, in graph order.

    ``neurons`` maps a layer's output tensor to the neurons to return (a ``parse_neurons`` selector; default
    all). A layer that no other decoded layer reads is then composed for those neurons only: the deepest
    layers, whose banks are the largest, cost what the neurons asked cost.
    """
    _check_mode(mode, dtype, kernel)
    device = resolve_device(device)
    if layers is None:
        layers = [layer.name for layer in inspect_model(model).layers if layer.decodable]
    nodes = {id(find_layer(model, name)) for name in layers}
    targets = [n.output[0] for n in model.nodes if id(n) in nodes]
    if mode in ("local", "deconvnet"):  # per-instance passes: nothing to share between layers
        for target in targets:
            yield decode(model, target, mode=mode, images=images, top=top, device=device)
        return
    substitution = _substitution_for(mode, model, targets, images, top, select, substitution, device)
    engine = Engine(get_backend(device.backend), dtype, kernel)
    channels = {t: _channels(model, t) for t in targets}
    picked = {t: parse_neurons(neurons[t], channels[t], t) for t in targets
              if neurons and neurons.get(t) is not None and channels[t] is not None}
    rows = leaf_rows(model, targets, picked)
    _check_memory(model, engine, targets, rows)
    for node, value in walk(model, engine, targets=targets, compose=True, rows=rows, substitution=substitution):
        if id(node) in nodes:
            yield _decoded(model, node, value, picked.get(node.output[0]), engine, mode)


def leaf_rows(model, targets, picked: dict) -> dict | None:
    """``picked`` (target -> neuron indices) kept for the targets that no node below the other targets reads: the
    ones whose banks can be composed for those rows only (``walk``'s ``rows``)."""
    read = {name for node in _ancestors(model, targets) for name in node.input}
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
    return Decoded(to_numpy(bank.filters), to_numpy(bank.bias), picked, value.geom.stride, value.geom.origin, node.output[0], mode, value.geom.bounds)


def _check_memory(model, engine, targets, rows):
    """Refuse, before any work, a decode whose filter banks cannot fit in memory."""
    problem = memory_problem(model, engine, targets, rows)
    if problem:
        raise FdsubError(problem)


def memory_problem(model, engine, targets, rows=None) -> str | None:
    """Why decoding ``targets`` in one pass would not fit in the memory left (None when it fits): the size of
    the filter banks alive at once is known from geometry alone, so this costs no decoding."""
    usage = {}
    for _ in walk(model, engine, targets=targets, rows=rows, usage=usage):
        pass
    need, free = usage["peak"] * MEMORY_MARGIN, engine.backend.free_bytes()
    if need <= free:
        return None
    return (f"decoding {', '.join(map(repr, targets[-1:]))} needs about {need / 2**30:.1f} GiB of filter banks "
            f"(receptive fields of up to {_largest_rf(model, engine, targets)} px) but {free / 2**30:.1f} GiB is free; "
            + ("decode an earlier layer or fewer neurons, or use a machine with more memory"
               if engine.dtype == "float32" else "use --dtype float32, decode an earlier layer, or use a machine with more memory"))


def _largest_rf(model, engine, targets) -> int:
    return max((max(v.geom.rf) for _, v in walk(model, engine, targets=targets) if isinstance(v, Tensor)), default=1)


def _layer(model, node, value) -> Layer:
    shape = model.shapes.get(node.output[0])
    channels = int(shape[1]) if shape is not None and len(shape) > 1 else None
    if isinstance(value, Tensor):
        g = value.geom
        return Layer(node.output[0], model.node_name(node), node.op_type, channels, list(g.stride), list(g.rf), list(g.origin), True, None)
    reason = value.reason if isinstance(value, Blocked) else "not a feature map"
    return Layer(node.output[0], model.node_name(node), node.op_type, channels, None, None, None, False, reason)


def _channels(model, target):
    shape = model.shapes.get(target)
    return int(shape[1]) if shape is not None and len(shape) > 1 else None


def _substitution_for(mode, model, targets, images, top, select, substitution, device):
    """None in ``weights`` mode; in ``fds`` mode the given substitution or one gathered from ``images``."""
    if mode != "fds":
        return None
    if substitution is not None:
        return substitution
    if images is None:
        raise FdsubError("fds mode needs images to select each neuron's top instances; pass --images")
    from ._substitution import gather_statistics  # imports capture, which imports this module

    return gather_statistics(model, targets, images, top=top, select=select, device=device)


def _check_mode(mode, dtype, kernel):
    if mode not in MODES:
        raise FdsubError(f"mode {mode!r} is not available; choose one of {', '.join(MODES)}")
    if str(dtype) not in ("float32", "float64"):
        raise FdsubError(f"dtype must be float32 or float64, got {dtype!r}")
    if kernel not in KERNELS:
        raise FdsubError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
