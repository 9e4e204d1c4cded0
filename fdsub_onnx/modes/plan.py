"""The route planner of ``weights`` mode: bottom-up, adjoint or meet in the middle, chosen from geometry alone.

The three routes compute the same filters at an interior position (docs/method.md, "Routes"); their costs
differ by orders of magnitude with depth and with how many neurons are asked:

- bottom-up composes every channel of every layer below: FLOPs from the walk (``Costs``), memory the banks
  alive at once; independent of the neurons asked (the lower banks dominate), exact at interior positions;
- adjoint runs one backward pass per batch of seeds over the linearized network: about the forward FLOPs of
  the network times the neurons asked, memory a batch of gradients; exact at every position;
- meet in the middle at a tensor T that every path crosses: bottom-up to T, the adjoint above it, then one
  substitution of T's bank (``adjoint._Meeting``); exact where the positions of T it reads are interior.

The plan takes the cheapest route in FLOPs among those that are exact at the position and fit in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..compose import spectral
from ..compose.backend import get_backend
from ..compose.engine import Engine, two_pass_factors
from ..compose.inspect import MEMORY_MARGIN
from ..compose.ops import RULES
from ..compose.values import Blocked, Tensor, map_of
from ..compose.walker import walk
from ..errors import FdsubError
from ..graph.geometry import Geometry
from ..graph.model import Model, ancestors, grid
from .adjoint import adjoint_problem, per_seed_bytes

ROUTES = ("auto", "bottom-up", "adjoint", "meet")
#: seeds per adjoint pass at most: more only grows the temporaries (each pass is already GEMM-shaped)
MOST_SEEDS = 256


@dataclass
class Plan:
    """How one layer is decoded: ``route`` ("bottom-up", "adjoint" or "meet"), the ``split`` tensor of a meet,
    the seeds per adjoint pass, and the estimates (FLOPs, peak bytes) of every route considered."""

    layer: str
    route: str
    position: tuple[int, int]
    neurons: int
    flops: float
    peak_bytes: float
    split: str | None = None
    batch: int | None = None
    estimates: dict = field(default_factory=dict)  # route -> (flops, peak bytes), or a reason it was not possible
    product_flops: float = 0.0  # the share of ``flops`` in matrix products (timed at BLAS's rate)
    bank_bytes: float = 0.0  # the banks a bottom-up route makes (``Costs.bank_bytes``)
    conv_flops: float = 0.0  # the share of ``flops`` in dense convolutions' gradients (``gradient_flops``)

    def describe(self) -> str:
        """One line: the route taken, its estimate, and the others'."""
        def shown(est):
            return est if isinstance(est, str) else f"{_flops(est[0])}, {_bytes(est[1])}"

        taken = self.route + (f" at {self.split!r}" if self.split else "")
        batch = f", {self.batch} seeds per pass" if self.batch else ""
        others = "; ".join(f"{route}: {shown(est)}" for route, est in self.estimates.items() if route != self.route)
        return (f"{self.layer}: {taken} ({_flops(self.flops)}, peak {_bytes(self.peak_bytes)}{batch}) for "
                f"{self.neurons} neuron{'s' if self.neurons != 1 else ''} at {tuple(self.position)}"
                + (f"; {others}" if others else ""))


class Costs(Engine):
    """An engine that composes nothing and counts what composing would cost (a multiply-add is 2 FLOPs): all of
    it (``flops``), the share in matrix products (``product_flops``: a convolution's GEMMs, or the spectral route's
    charge for them), and the bytes of the banks its convolutions make (``bank_bytes``), which a large network's
    composition spends more time writing than multiplying (``modes.cost.composition_seconds``)."""

    def __init__(self, dtype="float32"):
        super().__init__(get_backend("numpy"), dtype)
        self.flops = self.product_flops = self.bank_bytes = 0.0

    def conv(self, bank, weight, bias, groups, step, out_rf, rows=None):
        k, cig, ky, kx = np.shape(weight)
        n = k if rows is None else len(rows)
        r_in = [r - (t - 1) * s for r, t, s in zip(out_rf, (ky, kx), step)]
        self.bank_bytes += float(n) * self.image_channels * out_rf[0] * out_rf[1] * self.dtype.itemsize
        if cig == 1 and groups > 1:  # depthwise: scaled copies, never spectral; a pooling window's along each axis
            taps = ky * kx if two_pass_factors(np.asarray(weight)[:, 0]) is None else ky + kx
            self.flops += 2.0 * n * taps * self.image_channels * r_in[0] * r_in[1]
        else:
            per_group = max(1, n // groups)
            products = groups * spectral.charged_flops(per_group, cig, self.image_channels, r_in, (ky, kx), step)
            self.flops += products
            self.product_flops += products


def product_flops(model: Model, nodes) -> tuple[float, float]:
    """``(FLOPs of the matrix products, FLOPs of the rest)`` of one seed's pass over ``nodes`` (``forward_flops``):
    BLAS runs products (``OpRule.matrix_product``) several times faster per FLOP than the rest, so the cost model
    times them apart (``modes.cost.PRODUCT_RATE``)."""
    split = [0.0, 0.0]
    for node in nodes:
        op = RULES.get(node.op_type)
        split[op is None or not op.matrix_product] += forward_flops(model, node)
    return split[0], split[1]


def forward_work(model: Model, nodes) -> tuple[float, float, float]:
    """``(FLOPs of the dense products, FLOPs of the slow products, bytes read and written)`` of onnxruntime's
    forward pass over ``nodes``, per image: its dense convolutions and matrix products run near the GEMM rate,
    grouped and transposed convolutions' products well below it (``OpRule.forward_product``), and every op moves
    its tensors (the data inputs and outputs, float32), which is all the time of the others (activations, depthwise
    convolutions, normalizations, layout): ``modes.cost.forward_seconds``."""
    flops = {"dense": 0.0, "slow": 0.0}
    moved = 0.0
    for node in nodes:
        op = RULES.get(node.op_type)
        kind = None if op is None else op.forward_product(model, node)
        if kind is not None:
            flops[kind] += forward_flops(model, node)
        moved += sum(per_image(model, name) for name in (*node.input, *node.output))
    return flops["dense"], flops["slow"], 4.0 * moved


def gradient_flops(model: Model, nodes) -> tuple[float, float, float]:
    """``(matrix products, dense convolutions, the rest)``: ``product_flops`` for a backward pass, where a dense
    convolution's gradient (``kernels.transposed``: a GEMM over its taps, then their strided adds) runs at a rate
    of its own (``modes.cost.CONV_GRADIENT_RATE``); a depthwise one's scaled strided adds are among the rest."""
    products, rest = product_flops(model, nodes)
    convs = sum(forward_flops(model, node) for node in nodes
                if (op := RULES.get(node.op_type)) is not None and op.gradient_is_product(model, node))
    return products, convs, rest - convs


def forward_flops(model: Model, node) -> float:
    """About the FLOPs one seed's backward pass spends at ``node``: those of its forward op (a transposed
    product costs what the product does); elementwise and layout ops count their output's size."""
    size = per_image(model, node.output[0]) if node.output else 0.0
    op = RULES.get(node.op_type)
    return size if op is None else op.flops(model, node, size)


def per_image(model: Model, name: str) -> float:
    """Values of tensor ``name`` per image, whatever axis the batch is on (token-major attention, [L, N, E]: the
    second; the values after the first axis counted ViT-B/16's products 197x short); 0 for a constant or an
    unknown shape."""
    shape = model.shapes.get(name) if name and name not in model.constants else None
    return float(np.prod(shape)) / (model.input_shape[0] or 1) if shape is not None else 0.0


@dataclass
class _Layer:
    """What every candidate route of one layer needs to know, from one geometry walk."""

    target: str
    geom: Geometry | None  # None: a layer after an upsampling (per position only)
    values: dict  # tensor -> walker value (geometry only)
    node_flops: dict  # id(node) -> bottom-up FLOPs of that node, all channels
    blocked: str | None  # why bottom-up cannot reach the layer
    per_position: bool = False  # only because of an upsampling: the adjoint can


def plan_layer(model: Model, linear: Model | str, target: str, neurons: np.ndarray, position, dtype, backend,
               route: str = "auto") -> Plan:
    """The plan for ``neurons`` of ``target`` at ``position`` (see the module docstring); ``route`` forces one
    ("meet" picks the best split). ``linear`` is ``compose.linear_model.linear_model``'s network, or why there
    is none (no adjoint then). ``position="interior"`` asks for the filter of the interior positions: any route
    at the interior position nearest the centre, or bottom-up alone where no position is interior (a field
    larger than the image: the filter the neuron has on a larger image). A FdsubError when no route can decode
    it in the memory budget."""
    if route not in ROUTES:
        raise FdsubError(f"route must be one of {', '.join(ROUTES)}, got {route!r}")
    itemsize = np.dtype(dtype).itemsize
    info = _survey(model, target, dtype)
    free = backend.free_bytes() / MEMORY_MARGIN
    k = len(neurons)
    c = int(model.input_shape[1])
    out_size = grid(model, target)
    nowhere = None  # why only bottom-up can give what is asked
    if isinstance(position, str):
        if info.geom is None:
            raise FdsubError(f"layer {target!r} has no interior filter: {info.blocked}; decode it at a position")
        inside = np.argwhere(info.geom.interior(model.input_shape[2:], out_size))
        middle = np.asarray([(n - 1) // 2 for n in out_size])
        if len(inside):
            position = tuple(int(v) for v in inside[np.argmin(np.abs(inside - middle).max(axis=1))])
        else:
            position = tuple(int(v) for v in middle)
            nowhere = "no position is interior: only bottom-up composes the interior filter"
            if route not in ("auto", "bottom-up"):
                raise FdsubError(f"layer {target!r}: {nowhere}")
            route = "bottom-up"
    interior = info.geom is not None and bool(info.geom.interior(model.input_shape[2:], out_size)[tuple(position)])
    span = (info.geom.image_span(model.input_shape[2:], out_size) if info.geom is not None
            else ((0, model.input_shape[2]), (0, model.input_shape[3])))
    per_neuron = c * (span[0][1] - span[0][0]) * (span[1][1] - span[1][0]) * itemsize  # one filter
    result_bytes = k * per_neuron
    estimates, options, seed = {}, [], None
    shares = {}  # route -> (its FLOPs in matrix products, the bytes of its banks, its FLOPs in convolutions' gradients)

    if info.blocked is not None and not info.per_position:
        raise FdsubError(f"layer {target!r} is not decodable: {info.blocked}")
    if info.blocked is not None:
        estimates["bottom-up"] = info.blocked
    elif not interior and route != "bottom-up":
        estimates["bottom-up"] = "not exact at this position (its receptive field reads padding)"
    else:  # asked for by name at a border position, it gives the filters of the interior positions
        costs = Costs(dtype)
        usage = {}
        for _ in walk(model, costs, targets=[target], rows={target: neurons}, usage=usage):
            pass
        estimates["bottom-up"] = (costs.flops, usage["peak"] + result_bytes)
        options.append(("bottom-up", None, None, costs.flops, usage["peak"] + result_bytes))
        shares["bottom-up"] = (costs.product_flops, costs.bank_bytes, 0.0)

    refused = nowhere or (linear if isinstance(linear, str) else adjoint_problem(linear, target))
    if refused is not None:
        estimates["adjoint"] = refused
    else:
        products, convs, rest = gradient_flops(linear, ancestors(linear, [target]))
        flops = float(k) * (products + convs + rest)
        seed = per_seed_bytes(linear, target, itemsize)
        batch = _batch(k, seed, free - result_bytes)
        if batch:
            estimates["adjoint"] = (flops, batch * seed + result_bytes)
            options.append(("adjoint", None, batch, flops, batch * seed + result_bytes))
            shares["adjoint"] = (float(k) * products, 0.0, float(k) * convs)
        else:
            estimates["adjoint"] = f"one seed needs {_bytes(seed)}"
        meet = _best_meet(model, linear, info, neurons, position, itemsize, free, result_bytes)
        if isinstance(meet, tuple):
            estimates["meet"] = meet[2:4]
            options.append(("meet", *meet))
        elif meet:
            estimates["meet"] = meet

    if route != "auto":
        options = [o for o in options if o[0] == route]
        if not options:
            raise FdsubError(f"layer {target!r} cannot be decoded by the {route} route at {tuple(position)}: "
                             f"{estimates.get(route, 'not possible')}")
    if not options and seed is None:  # no route at all: not a matter of memory
        reasons = "; ".join(f"{route}: {why}" for route, why in estimates.items())
        raise FdsubError(f"layer {target!r} is not decodable at {tuple(int(v) for v in position)} ({reasons}); "
                         "`fdsub inspect` lists the layers that are")
    fitting = [o for o in options if o[4] <= free]
    if not fitting:
        raise FdsubError(_memory_advice(target, estimates, free, k, seed, per_neuron, itemsize))
    name, split, batch, flops, peak = min(fitting, key=lambda o: o[3])
    return Plan(target, name, tuple(int(v) for v in position), k, flops, peak, split, batch, estimates,
                *shares.get(name, (0.0, 0.0, 0.0)))


def _survey(model, target, dtype) -> _Layer:
    costs = Costs(dtype)
    values, node_flops, value = {}, {}, None
    done = 0.0
    for node, value in walk(model, costs, targets=[target]):  # the walk yields once a node's rule has run
        values[node.output[0]] = value
        node_flops[id(node)], done = costs.flops - done, costs.flops
    value = values.get(target)
    if (feature_map := map_of(value)) is not None:
        return _Layer(target, feature_map.geom, values, node_flops, None)
    reason = value.reason if isinstance(value, Blocked) else "not a feature map"
    return _Layer(target, None, values, node_flops, reason, isinstance(value, Blocked) and value.per_position)




def _best_meet(model, linear, info: _Layer, neurons, position, itemsize, free, result_bytes):
    """(split, batch, flops, peak) of the cheapest meet that is exact and fits, or why there is none."""
    if info.geom is None:
        return "the layer's filters depend on the position's phase: no bottom-up bank above the upsampling"
    k = len(neurons)
    nodes = ancestors(model, [info.target])
    window = tuple((int(c), int(r)) for c, r in zip(info.geom.corner(position), info.geom.rf))
    flops_of = {id(n): forward_flops(linear, n) for n in ancestors(linear, [info.target])}
    total_adjoint = sum(flops_of.values())
    candidates = []
    linear_order = {n.output[0]: n for n in ancestors(linear, [info.target])}
    for name in _cuts(model, nodes):
        value = info.values.get(name)
        if name == info.target or not isinstance(value, Tensor) or value.rows is not None:
            continue
        (y0, y1), (x0, x1) = value.geom.cone(window, value.spatial)
        if y1 <= y0 or x1 <= x0:
            continue
        inside = value.geom.interior(model.input_shape[2:], value.spatial)[y0:y1, x0:x1]
        if not inside.all():
            continue
        lower = ancestors(model, [name])
        bottom = sum(info.node_flops.get(id(n), 0.0) for n in lower)
        lower_linear = {id(linear_order[n.output[0]]) for n in lower if n.output[0] in linear_order}
        above = total_adjoint - sum(flops_of[i] for i in lower_linear if i in flops_of)
        cone = (y1 - y0) * (x1 - x0)
        meet = 2.0 * k * value.channels * cone * model.input_shape[1] * value.geom.rf[0] * value.geom.rf[1]
        candidates.append((bottom + k * above + meet, name, value))
    if not candidates:
        return "no tensor that every path crosses has the position's reads inside its interior"
    for flops, name, _value in sorted(candidates, key=lambda c: c[0])[:4]:
        usage = {}
        for _ in walk(model, Costs(), targets=[name], usage=usage):
            pass
        seed = per_seed_bytes(linear, info.target, itemsize, stop=name)
        batch = _batch(k, seed, free - result_bytes - usage["peak"])
        if batch:
            return name, batch, flops, usage["peak"] + batch * seed + result_bytes
    return "no split's bank and gradients fit in the memory left"


def _cuts(model, nodes) -> list[str]:
    """The data tensors that every path from the image to the last of ``nodes`` crosses (in graph order): after
    their producer, nothing else is alive."""
    last_use = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            if name and name not in model.constants:
                last_use[name] = i
    alive, cuts = {model.input_name}, []
    for i, node in enumerate(nodes):
        alive |= {o for o in node.output if o}
        alive = {name for name in alive if last_use.get(name, -1) > i}
        if len(alive) == 1 and len(node.output) == 1 and node.output[0] in alive:
            cuts.append(node.output[0])
    return cuts


def _batch(k: int, seed: int, room: float) -> int:
    return int(max(0, min(k, MOST_SEEDS, room // max(seed, 1))))


def _memory_advice(target, estimates, free, k, seed, per_neuron, itemsize) -> str:
    """Why nothing fits, and what would: the adjoint holds one seed's gradients and the filters asked, so
    fewer neurons help it; bottom-up banks do not shrink with the neurons; float32 halves a float64 decode."""
    parts = "; ".join(f"{route}: {est if isinstance(est, str) else 'needs about ' + _bytes(est[1])}"
                      for route, est in estimates.items())
    advice = ("use --dtype float32, or " if itemsize > 4 else "") + \
        "raise --memory-budget on a machine with more memory"
    if seed is not None:
        fit = int((free - seed) // max(per_neuron, 1))
        if 1 <= fit < k:
            advice = f"decode at most {fit} neurons at a time (each filter needs {_bytes(per_neuron)}), or " + advice
    return (f"decoding {target!r} does not fit in the memory budget of {_bytes(free * MEMORY_MARGIN)} ({parts}); "
            f"{advice}")



def _flops(value: float) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} FLOP"


def _bytes(value: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B"


