"""What the walker knows from geometry alone: the layer table of ``inspect``, a layer's geometry, memory needs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import FdsubError
from ..graph.geometry import Geometry
from ..graph.model import LAYER_OPS, Model, channel_axis, find_layer, module_of, module_path, patch_grid
from ..graph.patterns import Attention, Bilinear, ChannelGate, TokenScale
from .backend import get_backend
from .engine import Engine
from .linear_model import adjoint_problem, structure
from .ops import RULES
from .values import Blocked, Tensor, map_of
from .walker import walk

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
    module: str | None = None  # the module it came from: recorded by torch's dynamo exporter, or read from a
    # TorchScript export's node name (/layer3/layer3.1/conv2/Conv: layer3.1.conv2); what --layer takes too
    per_position: bool = False  # decodable one output position at a time only (after an upsampling; no geometry)
    patch_grid: list[int] | None = None  # tokens: [extra tokens before the grid, grid rows, grid columns]


@dataclass
class Summary:
    input_name: str
    input_shape: list[int]
    layers: list[Layer]
    geometries: dict[str, Geometry] = field(default_factory=dict, repr=False, compare=False)  # decodable layers'
    held: list[dict] = field(default_factory=list)  # data-dependent factors weights mode holds: tensor, node, kind
    dequantized: list[dict] = field(default_factory=list)  # quantized nodes read as float ops: node, op, as

    def to_json(self) -> dict:
        return {"input": {"name": self.input_name, "shape": self.input_shape},
                "layers": [asdict(layer) for layer in self.layers], "held": self.held,
                "dequantized": self.dequantized}


def inspect_model(model: Model) -> Summary:
    """Every Conv, pooling and fully connected layer with its geometry and decodability."""
    layers, geometries, linear = [], {}, None
    for node, value in walk(model, Engine(get_backend("numpy"))):
        if node.op_type in LAYER_OPS:
            layer = _layer(model, node, value)
            if layer.per_position:  # decodable by the adjoint alone: say so only where the adjoint runs
                linear = structure(model) if linear is None else linear
                problem = adjoint_problem(linear, layer.name)
                if problem is not None:
                    layer.decodable, layer.per_position, layer.reason = False, False, problem
            layers.append(layer)
            if (feature_map := map_of(value)) is not None:
                geometries[node.output[0]] = feature_map.geom
    return Summary(model.input_name, list(model.input_shape), layers, geometries, _held(model),
                   list(model.dequantized))


def _held(model: Model) -> list[dict]:
    """Channel gates, attention matrices and layer norms: ``weights`` mode holds them at their value on a reference
    input."""
    held = []
    for node in model.nodes:
        pattern = model.patterns.get(node.output[0])
        kind = "channel gate" if isinstance(pattern, ChannelGate) else "layer norm" if isinstance(
            pattern, TokenScale) else "attention" if isinstance(
            pattern, Attention) else "product of two tensors" if isinstance(pattern, Bilinear) else (
            "layer norm" if node.op_type in RULES and RULES[node.op_type].held_factor else None)
        if kind:
            held.append({"tensor": node.output[0], "node": model.node_name(node), "kind": kind})
    return held


def layer_geometry(model: Model, layer: str) -> Geometry:
    """Stride, receptive field and origin of ``layer``'s output, from the walker without composing banks."""
    return _geometry(model, layer, per_position=False)


def instance_geometry(model: Model, layer: str) -> Geometry:
    """The geometry of ``layer``'s instances: its own (``layer_geometry``), or for a layer decoded per position
    (tokens after global attention, a layer after an upsampling) the whole image at every position (stride 0): each
    instance's filter is then its input gradient over the image, which ``local`` and the Neuron Feature average."""
    return _geometry(model, layer, per_position=True)


def _geometry(model: Model, layer: str, per_position: bool) -> Geometry:
    """``layer``'s geometry from one walk; with ``per_position``, the whole image's for a per-position layer."""
    node = find_layer(model, layer)
    for current, value in walk(model, Engine(get_backend("numpy")), targets=[node.output[0]]):
        if current is node:
            if (feature_map := map_of(value)) is not None:
                return feature_map.geom
            if per_position and isinstance(value, Blocked) and value.per_position:
                return Geometry(stride=(0, 0), rf=tuple(int(n) for n in model.input_shape[2:4]), origin=(0, 0))
            reason = value.reason if isinstance(value, Blocked) else "it is not a feature map"
            raise FdsubError(f"layer {node.output[0]!r} has no receptive-field geometry: {reason}")
    raise FdsubError(f"layer {layer!r} is not reachable from the image input {model.input_name!r}")


def memory_problem(model, engine, targets, rows=None) -> str | None:
    """Why decoding ``targets`` bottom-up in one pass would not fit in the memory left (None when it fits): the
    size of the filter banks alive at once is known from geometry alone, so this costs no decoding. The advice
    says whether fewer neurons would help: it does not when the lower layers' banks alone are too large."""
    need, free = bank_peak(model, engine, targets, rows) * MEMORY_MARGIN, engine.backend.free_bytes()
    if need <= free:
        return None
    last = targets[-1]
    one = dict(rows or {}) | {last: [0]}
    fewer = bank_peak(model, engine, targets, one) * MEMORY_MARGIN <= free
    advice = ("decode fewer neurons of it" if fewer else
              "fewer neurons will not help (the lower layers' banks alone do not fit); decode it in weights mode, "
              "whose adjoint route needs no banks, or an earlier layer")
    if engine.dtype != "float32":
        advice = "use --dtype float32, or " + advice
    return (f"decoding {last!r} bottom-up needs about {need / 2**30:.1f} GiB of filter banks (receptive fields "
            f"of up to {_largest_rf(model, engine, targets)} px) but the memory budget is {free / 2**30:.1f} GiB; "
            f"{advice}, or raise --memory-budget on a machine with more memory")


def bank_peak(model, engine, targets, rows=None) -> int:
    """Bytes of the filter banks alive at once when ``targets`` are composed bottom-up in one pass."""
    usage = {}
    for _ in walk(model, engine, targets=targets, rows=rows, usage=usage):
        pass
    return usage["peak"]


def _largest_rf(model, engine, targets) -> int:
    return max((max(v.geom.rf) for _, v in walk(model, engine, targets=targets) if isinstance(v, Tensor)), default=1)


def _layer(model, node, value) -> Layer:
    channels = channels_of(model, node.output[0])
    if (feature_map := map_of(value)) is not None:
        g = feature_map.geom
        return Layer(node.output[0], model.node_name(node), node.op_type, channels, list(g.stride), list(g.rf),
                     list(g.origin), True, None, module_of(node) or module_path(node))
    reason = value.reason if isinstance(value, Blocked) else "not a feature map"
    if isinstance(value, Blocked) and value.per_position:
        patches = patch_grid(model, node.output[0])
        return Layer(node.output[0], model.node_name(node), node.op_type, channels, None, None, None, True, reason,
                     module_of(node) or module_path(node), per_position=True,
                     patch_grid=None if patches is None else list(patches))
    return Layer(node.output[0], model.node_name(node), node.op_type, channels, None, None, None, False, reason,
                 module_of(node) or module_path(node))


def channels_of(model, target):
    """How many neurons a layer has: the size of its channel axis (``graph.model.channel_axis``)."""
    shape = model.shapes.get(target)
    return int(shape[channel_axis(model, target)]) if shape is not None and len(shape) > 1 else None
