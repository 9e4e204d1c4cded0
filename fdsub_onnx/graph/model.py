"""Loading an ONNX file: validation, static shapes, and folding of constant subgraphs."""

from __future__ import annotations

import difflib
import os
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..data.files import require_regular_file
from ..errors import FdsubError
from .dequantize import dequantize
from .patterns import find_patterns
from .precision import as_float32
from .prepare import CLI_SHAPE, STANDARD_DOMAINS, ShapeSetting, nchw_input, prepare
from .validate import checked

#: ops whose outputs are listed as layers by ``inspect``
LAYER_OPS = ("Conv", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Gemm", "MatMul",
             "ConvTranspose", "QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger")
#: the convolution-like ones among them (what coverage figures count)
CONV_LIKE = ("Conv", "ConvTranspose", "QLinearConv", "ConvInteger")


@dataclass
class Model:
    """A loaded network: its graph in topological order, static shapes and folded constants."""

    path: str
    proto: onnx.ModelProto
    input_name: str
    input_shape: tuple[int, ...]
    opset: int
    nodes: list  # NodeProto, topologically sorted, folded nodes removed
    shapes: dict[str, tuple[int, ...]]
    constants: dict[str, np.ndarray]
    producer: dict = field(default_factory=dict)  # tensor name -> NodeProto
    consumers: dict = field(default_factory=dict)  # tensor name -> [NodeProto]
    patterns: dict = field(default_factory=dict)  # Mul output -> SelfGated | ChannelGate (graph.patterns)
    dequantized: list = field(default_factory=list)  # QOperator / dynamic nodes rewritten to float (graph.dequantize)
    #: values computed once per loaded model and reused (``modes.gates``: the held factors at the all-zeros input)
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    def node_name(self, node) -> str:
        """A readable name for a node (ONNX allows empty names)."""
        return node.name or f"{node.op_type}:{node.output[0]}"


def load_model(path: str | os.PathLike, input_shape: tuple[int, ...] | None = None,
               shape_setting: ShapeSetting = CLI_SHAPE) -> Model:
    """Load ``path``, fix the input shape, infer static shapes and fold constants.

    ``input_shape`` (e.g. ``(1, 3, 224, 224)``) is needed when the model's height, width
    or channels are dynamic; a dynamic batch dimension is fixed to 1. Messages name it as ``shape_setting`` says.
    """
    path = os.fspath(path)
    proto = _read(path)
    ordered = _topological(proto.graph.node, path)  # onnx's checker refuses a graph out of order, onnxruntime runs
    if [n.output for n in ordered] != [n.output for n in proto.graph.node]:  # it (float16 converters append Casts)
        proto.graph.ClearField("node")
        proto.graph.node.extend(ordered)
    proto = checked(proto, path)
    nchw_input(proto)  # a TF-style NHWC image input is read as NCHW (graph.prepare)
    opset = next((o.version for o in proto.opset_import if o.domain in STANDARD_DOMAINS), 0)
    name, shape = _input(proto, path, input_shape, shape_setting)
    proto = _fix_input_shape(proto, name, shape)
    dequantized = dequantize(proto)  # QOperator and dynamic quantization as float ops (graph.dequantize)
    dequantized += as_float32(proto)  # float16 / bfloat16 tensors as float32 (graph.precision)
    nodes, shapes, constants = prepare(proto, _topological(proto.graph.node, path), path, opset, shape_setting)
    producer, consumers = wiring(nodes)
    patterns = find_patterns(nodes, producer, constants, shapes, opset)
    return Model(path, proto, name, shape, opset, nodes, shapes, constants, producer, consumers, patterns,
                 dequantized)



def follow_through(model, name: str, follows) -> str:
    """``name`` followed forward through the nodes it alone feeds, each keeping its shape, while ``follows(node,
    tensor)`` says the node continues it (a BatchNorm, an activation, ...): the last tensor reached."""
    seen = {name}
    while True:
        users = model.consumers.get(name, [])
        if len(users) != 1 or not users[0].output or model.shapes.get(users[0].output[0]) != model.shapes.get(name):
            return name
        node = users[0]
        if node.input[0] != name or not follows(node, name) or node.output[0] in seen:
            return name
        name = node.output[0]
        seen.add(name)


def wiring(nodes) -> tuple[dict, dict]:
    """(tensor -> the node writing it, tensor -> the nodes reading it, in order) of a node list."""
    producer, consumers = {}, defaultdict(list)
    for node in nodes:
        for out in node.output:
            producer[out] = node
        for inp in node.input:
            consumers[inp].append(node)
    return producer, dict(consumers)


def attributes(node) -> dict:
    """Node attributes as Python values (bytes decoded to str)."""
    out = {}
    for attr in node.attribute:
        value = onnx.helper.get_attribute_value(attr)
        out[attr.name] = value.decode() if isinstance(value, bytes) else value
    return out


def find_layer(model: Model, name: str):
    """The node whose output tensor, node name or module (``module_of``, or the module path in a TorchScript node
    name: ``module_path``) is ``name``; a clear error with suggestions ranked across all three otherwise."""
    node = model.producer.get(name) or next((n for n in model.nodes if n.name == name), None)
    if node is not None:
        return node
    layers = [n for n in model.nodes if n.op_type in LAYER_OPS]
    held = [n for n in layers if name in (module_of(n), module_path(n))]
    if len(held) == 1:
        return held[0]
    if held:
        raise FdsubError(f"module {name!r} holds {len(held)} layers ({', '.join(repr(n.output[0]) for n in held)}); "
                         "give one of their names")
    known = {}  # every name a layer answers to -> how to show it
    for n in layers:
        modules = {m for m in (module_of(n), module_path(n)) if m}
        module = f" (module {sorted(modules)[0]})" if modules else ""
        for alias in (n.output[0], n.name, *modules):
            if alias:
                known.setdefault(alias, repr(alias) + ("" if alias in modules else module))
    close = difflib.get_close_matches(name, list(known), n=3)
    hint = (f"; did you mean {', '.join(known[c] for c in close)}?" if close
            else "; `fdsub inspect` lists the layers")
    raise FdsubError(f"no layer named {name!r} in {model.path}{hint}")


def module_of(node) -> str | None:
    """The module a node came from, where the export records it: torch's dynamo exporter writes name scopes
    (``pkg.torch.onnx.name_scopes``: ['', 'features', 'features.0', 'features.0.1', 'conv2d']) and a
    ``namespace`` ('... /features.0: torchvision.ops.misc.Conv2dNormActivation/...'); its tensor names
    (``getitem_3``) say nothing."""
    props = {p.key: p.value for p in node.metadata_props}
    scopes = props.get("pkg.torch.onnx.name_scopes")
    if scopes:
        names = [s.strip().strip("'\"") for s in scopes.strip("[]").split(",")]
        names = [s for s in names[:-1] if s]  # the last entry names the op itself
        if names:
            return names[-1]
    namespace = props.get("namespace")
    if namespace:
        parts = [p.split(":")[0].strip() for p in namespace.split("/") if p.split(":")[0].strip()]
        return parts[-1] if parts else None
    return None


def module_path(node) -> str | None:
    """The module path in a TorchScript export's node name: ``/layer4/layer4.1/conv2/Conv`` -> ``layer4.1.conv2``
    (each level its full name, or its attribute under the level before); None for a name without levels."""
    parts = [p for p in (node.name or "").split("/") if p][:-1]  # the last part names the op
    full = ""
    for part in parts:
        full = part if not full or part.startswith(full + ".") else f"{full}.{part}"
    return full or None


def ancestors(model: Model, targets) -> list:
    """The nodes ``targets`` (tensor names) depend on, in graph order."""
    wanted, stack = set(), list(targets)
    while stack:
        node = model.producer.get(stack.pop())
        if node is not None and id(node) not in wanted:
            wanted.add(id(node))
            stack.extend(node.input)
    return [node for node in model.nodes if id(node) in wanted]


def _read(path: str) -> onnx.ModelProto:
    if not os.path.exists(path):
        raise FdsubError(f"model file not found: {path}; check the path")
    if os.path.isdir(path):
        raise FdsubError(f"{path} is a folder; give the .onnx file inside it")
    require_regular_file(path, ".onnx model file")
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf raises several types for garbage
        raise FdsubError(f"{path} is not a readable ONNX model ({type(exc).__name__}: a file cut short by a copy or "
                         "download, or not ONNX); copy it again or export it with torch.onnx.export, tf2onnx or "
                         "paddle2onnx") from None
    if not proto.graph.node:
        raise FdsubError(f"{path} holds no ONNX graph (empty or not a model); export the network to ONNX first")
    try:
        onnx.load_external_data_for_model(proto, os.path.dirname(os.path.abspath(path)))
    except Exception as exc:
        raise FdsubError(f"{path}: external weight data could not be read ({exc}); "
                         "keep the .data file(s) beside the model") from None
    return proto


def _input(proto, path, input_shape, setting: ShapeSetting):
    """The image input: the one graph input that is not an initializer, with a static shape."""
    initializers = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    images = [i for i in inputs if len(i.type.tensor_type.shape.dim) == 4]
    if not images:
        found = ", ".join(f"{i.name} (rank {len(i.type.tensor_type.shape.dim)})" for i in inputs) or "none"
        raise FdsubError(f"{path}: no image input of shape [N, C, H, W] (inputs: {found}); fdsub decodes 2-D CNNs")
    image = images[0]
    dims = [d.dim_value if d.dim_value > 0 else (d.dim_param or "?") for d in image.type.tensor_type.shape.dim]
    if input_shape is not None:
        shape = tuple(int(v) for v in input_shape)
        if len(shape) != 4 or min(shape) < 1:
            raise FdsubError(f"{setting.name} must be four positive integers N,C,H,W, got {','.join(map(str, shape))}")
        fixed = [(a, d) for a, d in enumerate(dims) if isinstance(d, int) and a > 0 and d != shape[a]]
        if fixed:
            raise FdsubError(f"{setting.name} {','.join(map(str, shape))} disagrees with the model's input "
                             f"{image.name!r} {dims}")
        return image.name, (1, *shape[1:])
    dynamic = [a for a, d in enumerate(dims) if not isinstance(d, int) and a > 0]
    if dynamic:
        shown = ", ".join(str(d) for d in dims)
        raise FdsubError(f"input {image.name!r} has dynamic dimensions [{shown}]; {setting.advice}, the size its "
                         "images are fed at")
    return image.name, (1, *dims[1:])


def _fix_input_shape(proto, name, shape):
    proto = onnx.ModelProto.FromString(proto.SerializeToString()) if proto.ByteSize() < (1 << 31) - 1 else proto
    for inp in proto.graph.input:
        if inp.name == name:
            for dim, value in zip(inp.type.tensor_type.shape.dim, shape):
                dim.Clear()
                dim.dim_value = value
    del proto.graph.value_info[:]
    return proto


def _topological(nodes, path):
    """Nodes ordered so that each comes after the producers of its inputs."""
    produced = {out: i for i, node in enumerate(nodes) for out in node.output}
    order, state = [], [0] * len(nodes)
    for start in range(len(nodes)):
        stack = [(start, False)]
        while stack:
            i, done = stack.pop()
            if done:
                state[i] = 2
                order.append(nodes[i])
                continue
            if state[i]:
                continue
            state[i] = 1
            stack.append((i, True))
            for name in nodes[i].input:
                j = produced.get(name)
                if j is not None and state[j] == 0:
                    stack.append((j, False))
                elif j is not None and state[j] == 1 and j != i:
                    raise FdsubError(f"{path}: the graph has a cycle through {name!r}; it is not a valid ONNX model")
    return order


def channel_axis(model, name: str) -> int:
    """The axis of tensor ``name`` that holds its neurons: 1 for a map [N, C, H, W], a vector [N, C] or a
    convolution's [N, C, L]; the last for tokens [N, T, C] (what a MatMul, a norm or a sum over tokens gives) and for
    a MatMul's channels-last map [N, H, W, C]."""
    shape = model.shapes.get(name)
    node = model.producer.get(name)
    if shape is not None and len(shape) == 4 and node is not None and node.op_type == "MatMul" and len(
            model.shapes.get(node.input[0]) or ()) == 4 and np.ndim(model.constants.get(node.input[1])) == 2:
        return 3  # a pointwise layer over a channels-last map [N, H, W, C] (ConvNeXt)
    if shape is None or len(shape) != 3:
        return 1
    return 1 if node is not None and node.op_type in CONV_LIKE + ("AveragePool", "MaxPool") else 2


def windows_per_image(model, name: str) -> int:
    """How many windows or patches of one image the batch axis of tensor ``name`` holds (Swin's windows, MobileViT's
    patches); 1 where its first axis is the batch."""
    shape = model.shapes.get(name)
    return max(1, int(shape[0]) // model.input_shape[0]) if shape else 1


def grid(model, name: str) -> tuple[int, int]:
    """The positions of tensor ``name`` a neuron is addressed at, as (rows, columns): a map's (H, W), tokens' (1, T)
    (position (0, t) is token t), (1, 1) for a vector; windows or patches on the batch axis add their rows one after
    the other (tokens: (window, token); rows of tokens [T, C], torchvision's attention projection: (token, 0))."""
    shape = model.shapes.get(name)
    if shape is None:
        return (1, 1)
    windows, axis = windows_per_image(model, name), channel_axis(model, name)
    if len(shape) == 4:
        rows, columns = (shape[1], shape[2]) if axis == 3 else (shape[2], shape[3])
        return (int(rows) * windows, int(columns))
    if len(shape) == 3 and axis == 2:
        return (windows, int(shape[1]))
    return (windows, 1) if len(shape) == 2 else (1, 1)


def to_maps(values, axis: int = 1, windows: int = 1):
    """A batch of values laid out as maps [N, C, rows, columns] (``grid``'s positions): the neurons, on ``axis``,
    first; ``windows`` windows or patches per image on the batch axis as rows one after the other. Tokens
    [N, T, C] become [N, C, 1, T], a vector [N, C, 1, 1]; a map [N, C, H, W] stays as it is."""
    values = np.asarray(values)
    if values.ndim == 2:  # vectors; rows of tokens [N * T, C] as [N, C, T, 1]
        return np.moveaxis(values.reshape(-1, windows, values.shape[1]), 2, 1)[..., None]
    if values.ndim == 4 and axis == 1 and windows == 1:
        return values
    moved = np.moveaxis(values.reshape(-1, windows, *values.shape[1:]), axis + 1, 1)  # [N, C, W, ...]
    return moved.reshape(*moved.shape[:2], -1, moved.shape[-1])


def as_map(model, name: str, values):
    """Values of tensor ``name`` (batch first) as maps [N, C, rows, columns] of its ``grid`` (``to_maps``)."""
    return to_maps(values, channel_axis(model, name), windows_per_image(model, name))


def patch_grid(model, name: str) -> tuple[int, int, int] | None:
    """(extra tokens in front, rows, columns) of the patch grid tokens ``name`` [1, T, C] come from: the map
    [1, C, rows, columns] (or channels-last) of the model with ``rows * columns = T - extra`` for the fewest extra
    tokens (a class token, a distillation token, registers: at most 8), the last such map before them; None for
    tokens of no grid (and for other tensors)."""
    shape = model.shapes.get(name)
    batch = model.input_shape[0]
    if shape is None or len(shape) != 3 or shape[0] != batch or channel_axis(model, name) != 2:
        return None
    maps = {}
    for node in model.nodes:
        if node.output and node.output[0] == name:
            break
        out = node.output[0] if node.output else None
        mshape = model.shapes.get(out) if out else None
        if mshape is not None and len(mshape) == 4 and mshape[0] == batch:
            rows, columns = grid(model, out)
            maps[int(shape[1]) - rows * columns] = (rows, columns)
    extra = min((k for k in maps if 0 <= k <= 8), default=None)
    return None if extra is None else (extra, *maps[extra])


def describe_position(model, name: str, position) -> str:
    """A position of tensor ``name`` in words: ``patch (gy, gx)`` of a patch grid's token (``class token`` or
    ``extra token i`` before it), else its ``row,column`` on the grid."""
    qy, qx = (int(v) for v in position)
    patches = patch_grid(model, name)
    if patches is None or qy != 0:
        return f"output position {qy},{qx}"
    extra, rows, columns = patches
    if qx < extra:
        return "the class token (token 0)" if qx == 0 else f"extra token {qx} (before the patch grid)"
    gy, gx = divmod(qx - extra, columns)
    return f"token {qx}: patch ({gy}, {gx}) of the {rows}x{columns} patch grid"
