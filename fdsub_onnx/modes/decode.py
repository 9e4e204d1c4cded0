"""One dispatcher for every mode: ``decode`` (one layer) and ``iter_decode`` (several layers in one pass)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from ..compose.backend import get_backend, resolve_device
from ..compose.engine import KERNELS, Engine
from ..compose.inspect import channels_of, inspect_model, memory_problem
from ..compose.linear_model import linear_model
from ..compose.values import Blocked, map_of
from ..compose.walker import Held, walk
from ..data.topn import rows_of
from ..defaults import DEFAULT_SELECT, DEFAULT_WEIGHTING
from ..errors import FdsubError
from ..graph.model import Model, ancestors, find_layer, grid, patch_grid
from ..neurons import parse_neurons
from .adjoint import decode_at
from .fds import gather_statistics, substituted
from .gates import HeldFactors, held_names, neuron_means, reference_gates
from .local import decode_instances
from .plan import ROUTES, plan_layer
from .result import Decoded

MODES = ("weights", "fds", "local", "deconvnet")
INSTANCE_MODES = ("local", "deconvnet")  # per-instance backward passes, no bottom-up composition
#: a bottom-up result cropped to the image (``Geometry.image_span``) that keeps at least this share of its bank is
#: a view of the bank: copying it made as much memory again, fresh, beside the bank (MobileNetV2's all-neuron decode
#: 33 -> 26 s, peak 8.4 -> 4.8 GiB). A smaller part is copied, so that the rest is freed with the bank; either
#: way a result holds at most twice its own size.
CROP_VIEW_SHARE = 0.5


def decode(model: Model, layer: str, neurons=None, mode: str = "weights", dtype: str = "float32", device="cpu",
           kernel: str = "fast", images=None, top: int = 100, select: str = DEFAULT_SELECT, substitution=None,
           per_instance: bool = False, gate_reference=None, client=None, weighting: str = DEFAULT_WEIGHTING,
           position=None, route: str = "auto", progress=None) -> Decoded:
    """Decode the selected neurons (see ``parse_neurons``) of ``layer`` into image-space filters.

    ``mode="fds"`` substitutes with statistics of ``images`` (each neuron's ``top`` instances, the
    ``select`` rule, the ``weighting``), or with a ready ``substitution`` from ``gather_statistics``. ``"local"`` and
    ``"deconvnet"`` average each neuron's per-instance filters (kept with ``per_instance``).
    ``device`` is "cpu", "gpu" or "auto" (``resolve_device``): where the filters are composed and
    onnxruntime runs; the result is NumPy either way. In ``weights`` mode channel gates (squeeze-and-excitation)
    are held at their value on ``gate_reference`` (an image set: their mean over it; default the all-zeros input,
    see ``modes.gates``); the values used are in ``Decoded.gates``. With a Dask ``client`` the passes over
    ``images`` run on the cluster (``runtime.cluster``), with the same result.

    ``weights`` mode decodes at ``position`` (qy, qx) of the layer's output map (default its centre, ``centre``;
    ``"interior"``: the filter of the interior positions, translation-invariant, as bottom-up composes it), by
    the route ``plan_layer`` finds cheapest (``route="auto"``) or the one named ("bottom-up", "adjoint",
    "meet"); ``Decoded.plan`` says which. ``progress(done, total)`` follows a long decode.
    """
    target = find_layer(model, layer).output[0]
    for result in _decode_layers(model, [target], {target: neurons}, mode, dtype, device, kernel, images, top, select,
                                 substitution, per_instance, gate_reference, one_layer=True, client=client,
                                 weighting=weighting, positions={target: position}, route=route, progress=progress):
        return result
    raise FdsubError(f"layer {layer!r} is not reachable from the image input {model.input_name!r}")


def iter_decode(model: Model, layers: Iterable[str] | None = None, mode: str = "weights", dtype: str = "float32",
                device="cpu", kernel: str = "fast", images=None, top: int = 100, select: str = DEFAULT_SELECT,
                substitution=None, neurons: dict | None = None, gate_reference=None, client=None,
                weighting: str = DEFAULT_WEIGHTING, positions: dict | str | None = None, route: str = "auto",
                progress=None) -> Iterator[Decoded]:
    """Decode several layers (default: every decodable layer) in one bottom-up pass, in graph order.

    ``neurons`` maps a layer's output tensor to the neurons to return (a ``parse_neurons`` selector; default
    all). A layer that no other decoded layer reads is then composed for those neurons only: the deepest
    layers, whose banks are the largest, cost what the neurons asked cost. In ``local`` and ``deconvnet`` mode
    each layer runs its own per-instance passes (nothing is shared between layers). In ``weights`` mode each
    layer is planned as in ``decode`` (``positions``: layer -> (qy, qx), default the centres); the layers
    planned bottom-up share the one pass; ``positions="interior"`` asks every layer for its interior filter.
    """
    _check_mode(mode, dtype, kernel)
    if layers is None:
        layers = [layer.name for layer in inspect_model(model).layers if layer.decodable]
    nodes = {id(find_layer(model, name)) for name in layers}
    targets = [n.output[0] for n in model.nodes if id(n) in nodes]
    positions = {t: positions for t in targets} if isinstance(positions, str) else dict(positions or {})
    yield from _decode_layers(model, targets, dict(neurons or {}), mode, dtype, device, kernel, images, top, select,
                              substitution, False, gate_reference, one_layer=False, client=client,
                              weighting=weighting, positions=positions, route=route, progress=progress)


def _decode_layers(model, targets, neurons: dict, mode, dtype, device, kernel, images, top, select, substitution,
                   per_instance, gate_reference, one_layer: bool, client=None, weighting: str = DEFAULT_WEIGHTING,
                   positions: dict | None = None, route: str = "auto", progress=None) -> Iterator[Decoded]:
    """The setup ``decode`` and ``iter_decode`` share: check, resolve, substitute, plan, bound memory, walk once.

    ``one_layer``: ``decode``'s rule for the rows composed (all of them when the layer feeds several nodes).
    """
    _check_mode(mode, dtype, kernel)
    if route not in ROUTES:
        raise FdsubError(f"route must be one of {', '.join(ROUTES)}, got {route!r}")
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
    if substitution is not None and images is None:
        images = substitution.images
    if substitution is None:
        gates = reference_gates(model, targets, gate_reference, device)
    else:  # fds: channel gates at their mean over the images; attention and layer norms too, for bottom-up layers
        gates = _fds_gates(model, targets, images, substitution, device)
    backend = get_backend(device.backend)
    engine = Engine(backend, dtype, kernel)
    channels = {t: channels_of(model, t) for t in targets}
    linear = _linear(model, gates, substitution)
    plans = _plans(model, linear, engine, targets, neurons, dict(positions or {}), mode, route)
    bottom = [t for t in targets if t not in plans or plans[t].route == "bottom-up"]
    picked = {t: parse_neurons(neurons.get(t), channels[t], t) for t in bottom
              if channels[t] is not None and (one_layer or neurons.get(t) is not None)}
    if one_layer:
        rows = {t: p for t, p in picked.items() if len(model.consumers.get(t, ())) <= 1} or None
        groups = [(bottom, rows)] if bottom else []
        if bottom:
            _check_memory(model, engine, bottom, rows)
    else:
        groups = _walk_groups(model, engine, bottom, picked)
    steps = _Progress(progress, sum(plans[t].neurons if plans.get(t) and t not in bottom else 1 for t in targets))
    group_of = {t: i for i, (group, _) in enumerate(groups) for t in group}
    walked, current = None, None
    for target in targets:
        plan = plans.get(target)
        if target in bottom:
            if group_of[target] != current:  # the next bottom-up pass (the last one's banks are freed first)
                if walked is not None:
                    walked.close()
                current = group_of[target]
                group, group_rows = groups[current]
                given = Held()
                walked = _quiet(walk(model, engine, targets=group, compose=True, rows=group_rows,
                                     substitution=substitution, gates=gates, held=given))
            node, value = next((n, v) for n, v in walked if n.output[0] == target)
            result = _decoded(model, node, value, picked.get(target, neurons.get(target)), engine, mode)
            given.handed(value, result.filters)
            steps.add(1)
        else:
            per_neuron = None if substitution is None else _per_neuron(model, target, images, substitution, gates,
                                                                       device)
            result = _adjoint_decoded(model, per_neuron or linear, target, neurons.get(target), plan, gates, dtype,
                                      device, steps, mode)
        if plan is not None:
            result.position, result.plan = plan.position, plan
        held = held_names(model, [target])
        result.gates = {name: np.asarray(gates[name]) for name in held if name in gates}
        if substitution is not None and substitution.tops and target in substitution.tops:
            result.instances = rows_of(substitution.tops[target], result.neurons)
        yield result
        result = value = None  # a caller that drops its result leaves its bank to the walk (``Held.ids``)


def _quiet(steps: Iterator) -> Iterator:
    """The walk's steps with NumPy's overflow warnings off: a filter that overflows ends up not finite, which
    ``Decoded.degenerate`` names per neuron (the CLI warns with the cause), instead of raw RuntimeWarnings."""
    while True:
        with np.errstate(over="ignore", invalid="ignore"):
            step = next(steps, None)
        if step is None:
            return
        yield step


def centre(model, target) -> tuple[int, int]:
    """The centre ((Q_y - 1) // 2, (Q_x - 1) // 2) of a layer's output map; for tokens of a patch grid (rows,
    columns) the token at its centre (rows // 2, columns // 2), after the class tokens (else token (T - 1) // 2);
    (0, 0) for a vector."""
    patches = patch_grid(model, target)
    if patches is not None:
        extra, rows, columns = patches
        return (0, extra + (rows // 2) * columns + columns // 2)
    rows, columns = grid(model, target)
    return ((rows - 1) // 2, (columns - 1) // 2)


def _position(model, target, position) -> tuple[int, int] | str:
    if isinstance(position, str) and position == "interior":
        return position
    if isinstance(position, str) and (position == "cls" or position.startswith("patch:")):
        return _token_position(model, target, position)
    size = grid(model, target)
    try:
        qy, qx = (int(v) for v in position)
    except (TypeError, ValueError):
        raise FdsubError(f"position must be two integers (row, column) or 'interior', got {position!r}") from None
    if not (0 <= qy < size[0] and 0 <= qx < size[1]):
        raise FdsubError(f"position ({qy}, {qx}) is outside the {size[0]}x{size[1]} output map of {target!r}; "
                         f"choose rows 0-{size[0] - 1} and columns 0-{size[1] - 1}")
    return qy, qx


def _token_position(model, target, position: str) -> tuple[int, int]:
    """``"cls"``: the first token before the patch grid (a class token); ``"patch:GY,GX"``: the token of patch
    (GY, GX) of the grid (``graph.model.patch_grid``)."""
    patches = patch_grid(model, target)
    if patches is None:
        raise FdsubError(f"position {position!r} addresses tokens of a patch grid, and {target!r} has none; give "
                         "ROW,COLUMN of its grid")
    extra, rows, columns = patches
    if position == "cls":
        if extra == 0:
            raise FdsubError(f"{target!r} has no token before its {rows}x{columns} patch grid (no class token); give "
                             "patch:GY,GX")
        return (0, 0)
    try:
        gy, gx = (int(v) for v in position[len("patch:"):].split(","))
    except ValueError:
        raise FdsubError(f"position must be patch:GY,GX with two integers, got {position!r}") from None
    if not (0 <= gy < rows and 0 <= gx < columns):
        raise FdsubError(f"patch ({gy}, {gx}) is outside the {rows}x{columns} patch grid of {target!r}")
    return (0, extra + gy * columns + gx)


def plan_decode(model: Model, layers, neurons=None, positions: dict | None = None, dtype: str = "float32",
                device="cpu", route: str = "auto", gate_reference=None) -> dict:
    """Layer -> ``Plan``: how ``weights`` mode would decode ``neurons`` (one selector for every layer, or a dict per
    layer) of ``layers`` at ``positions`` (default their centres), with its estimates; nothing is decoded. A
    FdsubError for a layer that no route decodes in the memory left."""
    _check_mode("weights", dtype, "fast")
    device = resolve_device(device)
    targets = [find_layer(model, name).output[0] for name in layers]
    neurons = neurons if isinstance(neurons, dict) else {t: neurons for t in targets}
    gates = reference_gates(model, targets, gate_reference, device)
    engine = Engine(get_backend(device.backend), dtype)
    return _plans(model, _linear(model, gates, None), engine, targets, neurons, dict(positions or {}), "weights",
                  route)


def _plans(model, linear, engine, targets, neurons: dict, positions: dict, mode, route) -> dict:
    """The plan of each target (weights: every one; fds: those whose bottom-up banks do not fit, or a route named)."""
    plans = {}
    if mode not in ("weights", "fds"):
        return plans
    for t in targets:
        channels = channels_of(model, t)
        if channels is None:
            continue
        wanted = parse_neurons(neurons.get(t), channels, t)
        if mode == "fds" and route == "auto" and _has_bank(model, t) and not memory_problem(
                model, engine, [t], {t: wanted}):
            continue  # fds is bottom-up by definition; the adjoint only where its banks do not fit (or none is)
        position = centre(model, t) if positions.get(t) is None else _position(model, t, positions[t])
        plans[t] = plan_layer(model, linear, t, wanted, position, engine.dtype, engine.backend, route)
    return plans


def _has_bank(model, target) -> bool:
    """Whether ``target`` has a bottom-up bank (a feature map; not tokens or a layer after an upsampling)."""
    value = next((v for n, v in walk(model, Engine(get_backend("numpy")), targets=[target]) if n.output[0] == target),
                 None)
    return map_of(value) is not None


def _fds_gates(model, targets, images, substitution, device) -> dict:
    """The values fds holds data-dependent factors at where one network serves every neuron (bottom-up banks, the
    plan): channel gates at their mean over the images (the first pass's), attention and layer norms too."""
    if not HeldFactors(model, targets, kinds="tokens").names:
        return substitution.gates
    if images is None:
        raise FdsubError("fds holds attention and layer norms at each neuron's top instances; pass --images")
    return reference_gates(model, targets, images, device) | substitution.gates


def _per_neuron(model, target, images, substitution, gates, device):
    """fds's network for the i-th decoded neuron of ``target`` (a function of i), with attention, bilinear products
    and layer norms held at their mean over that neuron's top instances (docs/method.md); None where none is below
    ``target`` (one network serves every neuron)."""
    if not HeldFactors(model, [target], kinds="tokens").names or target not in (substitution.tops or {}):
        return None
    tops = substitution.tops[target]

    def linear_of(neurons):
        means = neuron_means(model, target, rows_of(tops, neurons), images, device)
        return (substituted(linear_model(model, gates | held), substitution) for held in means)

    return linear_of


def _linear(model, gates, substitution):
    """The network the adjoint differentiates: the linearized model (``weights``), with the substituted weights
    (``fds``); or why there is none (bottom-up only then)."""
    try:
        linear = linear_model(model, gates)
    except FdsubError as exc:  # e.g. a MaxPool whose indices are used
        return str(exc)
    return linear if substitution is None else substituted(linear, substitution)


def _adjoint_decoded(model, linear, target, neurons, plan, gates, dtype, device, steps, mode) -> Decoded:
    """A layer decoded by the adjoint route (or meeting bottom-up banks at ``plan.split``)."""
    value = next((v for n, v in walk(model, Engine(get_backend("numpy")), targets=[target]) if n.output[0] == target),
                 None)
    geom = feature_map.geom if (feature_map := map_of(value)) is not None else None
    picked = parse_neurons(neurons, channels_of(model, target), target)
    filters, bias, corner, crop = decode_at(model, linear, target, picked, plan.position, geom, dtype, device,
                                            split=plan.split, batch=plan.batch, gates=gates,
                                            progress=steps.part(len(picked)))
    if geom is None:  # after an upsampling: the filter holds at its position, its corner given as the origin
        return Decoded(filters, bias, picked, (0, 0), corner, target, mode, None, position=plan.position,
                       exact_at="position")
    interior = bool(geom.interior(model.input_shape[2:], grid(model, target))[plan.position])
    origin = (corner[0] - plan.position[0] * geom.stride[0], corner[1] - plan.position[1] * geom.stride[1])
    return Decoded(filters, bias, picked, geom.stride, origin, target, mode, geom.bounds,
                   position=plan.position, exact_at="interior" if interior else "position", crop=crop,
                   field=geom.rf)


class _Progress:
    """``progress(done, total)`` over a decode's steps: a bottom-up layer is one, an adjoint layer one per seed."""

    def __init__(self, progress, total: int):
        self.progress, self.total, self.done = progress, max(total, 1), 0

    def add(self, count: int) -> None:  # quick steps: counted, not shown on their own
        self.done += count

    def part(self, count: int):
        start = self.done

        def update(done, total):
            self.done = start + done
            if self.progress is not None:
                self.progress(self.done, self.total)

        return update



def _walk_groups(model, engine, bottom: list, picked: dict) -> list[tuple[list, dict | None]]:
    """The bottom-up layers in runs (graph order) that one pass each holds in memory, with the rows of each run:
    one pass for all when it fits, else as many layers per pass as fit (the lower banks are composed again)."""
    if not bottom:
        return []
    if not memory_problem(model, engine, bottom, leaf_rows(model, bottom, picked)):
        return [(bottom, leaf_rows(model, bottom, picked))]
    groups, current = [], []
    for t in bottom:
        if current and not memory_problem(model, engine, current + [t], leaf_rows(model, current + [t], picked)):
            current.append(t)
            continue
        if current:
            groups.append((current, leaf_rows(model, current, picked)))
        _check_memory(model, engine, [t], leaf_rows(model, [t], picked))
        current = [t]
    groups.append((current, leaf_rows(model, current, picked)))
    return groups


def leaf_rows(model, targets, picked: dict) -> dict | None:
    """``picked`` (target -> neuron indices) kept for the targets that no node below the other targets reads: the
    ones whose banks can be composed for those rows only (``walk``'s ``rows``)."""
    read = {name for node in ancestors(model, targets) for name in node.input}
    return {t: rows for t, rows in picked.items() if t in targets and t not in read} or None


def _decoded(model, node, value, neurons, engine, mode) -> Decoded:
    if isinstance(value, Blocked):
        raise FdsubError(f"layer {node.output[0]!r} is not decodable: {value.reason}")
    value = map_of(value)
    if value is None:
        raise FdsubError(f"layer {node.output[0]!r} is not a feature map")
    picked = parse_neurons(neurons, value.channels, node.output[0])
    whole = value.rows is not None or np.array_equal(picked, np.arange(value.channels))
    bank = value.bank if whole else engine.take(value.bank, picked)
    to_numpy = engine.backend.to_numpy
    geom = value.geom
    (y0, y1), (x0, x1) = geom.image_span(model.input_shape[2:], grid(model, node.output[0]))
    filters = bank.filters
    if (y0, x0, y1, x1) != (0, 0, *geom.rf):  # only what can meet a pixel is kept
        part = filters[:, :, y0:y1, x0:x1]
        filters = part if part.size >= CROP_VIEW_SHARE * filters.size else engine.backend.copy(part)
    origin = (geom.origin[0] + y0, geom.origin[1] + x0)
    return Decoded(to_numpy(filters), to_numpy(bank.bias), picked, geom.stride, origin, node.output[0], mode,
                   geom.bounds, crop=(y0, x0), field=geom.rf)


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
