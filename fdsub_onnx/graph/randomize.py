"""Seeded random parameters for a model whose weights are placeholders (the onnx package's light models, the modern
zoo's skeletons): each parameter drawn for the input it feeds, so a decoding test sees filters of a plausible scale."""

from __future__ import annotations

import os
import zlib

import numpy as np
import onnx
from onnx import helper, numpy_helper

FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)
#: (op, input) of inputs that are not parameters: a float initializer feeding one keeps its values in ``randomized``
STRUCTURAL = (("Resize", 1), ("Resize", 2), ("Upsample", 1), ("Clip", 1), ("Clip", 2), ("Pad", 2))


def _consumers(graph) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    uses: dict[str, list] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            uses.setdefault(name, []).append((node, i))
    return uses


def _role(name: str, uses) -> tuple[str, int]:
    """(op_type, input index) of the first consumer, looking through Unsqueeze/Reshape of a constant."""
    seen = set()
    while name not in seen:
        seen.add(name)
        users = uses.get(name, [])
        if not users:
            return ("", -1)
        node, i = users[0]
        if node.op_type in ("Unsqueeze", "Reshape", "Identity", "Cast") and i == 0:
            name = node.output[0]
            continue
        return (node.op_type, i)
    return ("", -1)


def _random(name: str, shape: tuple[int, ...], role: tuple[str, int], seed: int, transposed: bool) -> np.ndarray:
    """Seeded values for parameter ``name`` feeding ``role`` (stable under graph edits)."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    op, i = role
    size = int(np.prod(shape)) if shape else 1
    if (op, i) in (("Conv", 1), ("Gemm", 1), ("MatMul", 1)):
        if op == "Conv":
            fan_in = size // max(1, shape[0])
        else:
            fan_in = shape[-1] if transposed else shape[0]
        # uniform with variance 1/fan_in (cheaper than normal for 100M-value fc weights)
        value = rng.random(shape, dtype=np.float32)
        value -= np.float32(0.5)
        value *= np.float32(np.sqrt(12.0 / max(1, fan_in)))
    elif (op, i) in (("BatchNormalization", 1), ("BatchNormalization", 4), ("Mul", 1), ("Mul", 0), ("Div", 1)):
        value = rng.uniform(0.5, 1.5, shape)  # scales and variances: positive, away from zero
    else:  # biases, BN shift and mean, Add constants
        value = 0.1 * rng.standard_normal(shape)
    return np.asarray(value, dtype=np.float32)


def _has_data(tensor: onnx.TensorProto) -> bool:
    return bool(tensor.raw_data or tensor.float_data or tensor.double_data or tensor.int32_data
                or tensor.data_location == onnx.TensorProto.EXTERNAL)


def randomized(model: str | os.PathLike | onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """The model (a path or a ModelProto, left unchanged) with every float parameter replaced by seeded random values.

    Each value is drawn for the input it feeds: conv and fully connected weights uniform with
    variance 1/fan_in, BatchNormalization scales and variances and Mul/Div constants in [0.5, 1.5],
    biases and shifts 0.1 * N(0, 1); a parameter's values depend only on ``seed`` and its name.
    ConstantOfShape nodes with a constant shape become initializers; existing float initializers are redrawn
    from their dims alone (their data may be missing, as in models/modern/'s skeletons), except those feeding a
    ``STRUCTURAL`` input (Resize scales, Clip bounds), kept; a Constant node's float tensor is redrawn where its
    data is missing (a skeleton of a graph that holds its weights in Constant nodes, as paddle2onnx writes them),
    else kept as written (an epsilon, Swin's attention masks). Each new initializer is also
    listed as a graph input when the model's IR version (< 4) requires it.
    """
    if isinstance(model, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
        model = proto
    else:
        model = onnx.load(os.fspath(model))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses = _consumers(graph)
    transposed = {
        n.input[1] for n in graph.node if n.op_type == "Gemm" and any(a.name == "transB" and a.i for a in n.attribute)
    }
    new_values: dict[str, np.ndarray] = {}
    kept = []
    for node in graph.node:
        value_attr = next((a for a in node.attribute if a.name == "value"), None)
        if node.op_type == "Constant" and value_attr is not None and value_attr.t.data_type in FLOAT_TYPES:
            shape, out = tuple(value_attr.t.dims), node.output[0]
            if shape and not _has_data(value_attr.t):  # a weight a skeleton stripped: redrawn where it stands
                value = _random(out, shape, _role(out, uses), seed, out in transposed)
                dtype = helper.tensor_dtype_to_np_dtype(value_attr.t.data_type)
                value_attr.t.CopyFrom(numpy_helper.from_array(value.astype(dtype), value_attr.t.name))
        if node.op_type == "ConstantOfShape" and node.input and node.input[0] in inits:
            value_attr = next((a.t for a in node.attribute if a.name == "value"), None)
            if value_attr is None or value_attr.data_type in FLOAT_TYPES:
                shape = tuple(int(v) for v in numpy_helper.to_array(inits[node.input[0]]))
                out = node.output[0]
                new_values[out] = _random(out, shape, _role(out, uses), seed, out in transposed)
                continue
        kept.append(node)
    for name, tensor in inits.items():
        role = _role(name, uses)
        if tensor.data_type in FLOAT_TYPES and role not in STRUCTURAL:
            shape = tuple(tensor.dims)
            new_values[name] = _random(name, shape, role, seed, name in transposed)
    del graph.node[:]
    graph.node.extend(kept)
    used = {name for node in graph.node for name in node.input}
    old = [t for t in graph.initializer if t.name not in new_values and t.name in used]
    dropped = {t.name for t in graph.initializer} - {t.name for t in old}
    fresh = [numpy_helper.from_array(v, n) for n, v in new_values.items() if n in used]
    inputs = [i for i in graph.input if i.name not in dropped]
    listed = {i.name for i in inputs}
    if model.ir_version < 4:  # initializers must be listed as graph inputs
        missing = [t for t in fresh if t.name not in listed]
        inputs += [helper.make_tensor_value_info(t.name, onnx.TensorProto.FLOAT, list(t.dims)) for t in missing]
    del graph.initializer[:]
    graph.initializer.extend(old + fresh)
    del graph.input[:]
    graph.input.extend(inputs)
    return model
