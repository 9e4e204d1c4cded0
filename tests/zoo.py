"""The ONNX backend-test "light" model zoo, with weights re-randomized for decoding tests.

The light models (AlexNet, VGG19, ResNet50, DenseNet121, ...) ship without weights:
every parameter is a ``ConstantOfShape`` filled with 0.02. `randomized` replaces each
float parameter (ConstantOfShape output or float initializer) by seeded random values
whose distribution suits the input it feeds (conv weights of variance 1/fan_in, BN
variances positive, ...). `linearized` turns a model into a linear one (Relu, LRN,
Dropout -> Identity, MaxPool -> AveragePool, Softmax dropped) for the weights identity.
"""

from __future__ import annotations

import glob
import os
import zlib

import numpy as np
import onnx
from onnx import helper, numpy_helper

ZOO_DIR = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)


def zoo_paths() -> list[str]:
    """Paths of the light zoo models shipped with the onnx package."""
    return sorted(glob.glob(os.path.join(ZOO_DIR, "*.onnx")))


def zoo_name(path: str) -> str:
    """`light_resnet50.onnx` -> `resnet50`."""
    return os.path.basename(path)[: -len(".onnx")].removeprefix("light_")


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


def randomized(path: str, seed: int = 0) -> onnx.ModelProto:
    """The model at ``path`` with every float parameter replaced by seeded random values.

    ConstantOfShape nodes with a constant shape become initializers; existing float
    initializers are redrawn. Each new initializer is also listed as a graph input when
    the model's IR version (< 4) requires it.
    """
    model = onnx.load(path)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses = _consumers(graph)
    transposed = {
        n.input[1] for n in graph.node if n.op_type == "Gemm" and any(a.name == "transB" and a.i for a in n.attribute)
    }
    new_values: dict[str, np.ndarray] = {}
    kept = []
    for node in graph.node:
        if node.op_type == "ConstantOfShape" and node.input and node.input[0] in inits:
            value_attr = next((a.t for a in node.attribute if a.name == "value"), None)
            if value_attr is None or value_attr.data_type in FLOAT_TYPES:
                shape = tuple(int(v) for v in numpy_helper.to_array(inits[node.input[0]]))
                out = node.output[0]
                new_values[out] = _random(out, shape, _role(out, uses), seed, out in transposed)
                continue
        kept.append(node)
    for name, tensor in inits.items():
        if tensor.data_type in FLOAT_TYPES:
            shape = tuple(tensor.dims)
            new_values[name] = _random(name, shape, _role(name, uses), seed, name in transposed)
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


def linearized(model: onnx.ModelProto) -> onnx.ModelProto:
    """A linear copy: Relu, LRN, Dropout -> Identity; MaxPool -> AveragePool (same window); Softmax dropped.

    A dropped Softmax is replaced by an Identity so the graph outputs keep their names.
    Dropout's optional mask output must be unused.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    used = {name for node in out.graph.node for name in node.input} | {o.name for o in out.graph.output}
    nodes = []
    for node in out.graph.node:
        if node.op_type in ("Relu", "LRN", "Dropout", "Softmax"):
            extra = [o for o in node.output[1:] if o in used]
            if extra:
                raise ValueError(f"{node.op_type} {node.name!r}: output(s) {extra} are used; cannot linearize")
            nodes.append(helper.make_node("Identity", [node.input[0]], [node.output[0]], name=node.name))
        elif node.op_type == "MaxPool":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            dilations = attrs.pop("dilations", None)
            if dilations is not None and any(d != 1 for d in dilations):
                raise ValueError(f"MaxPool {node.name!r} is dilated; AveragePool has no dilations here")
            attrs.pop("storage_order", None)
            nodes.append(helper.make_node("AveragePool", [node.input[0]], [node.output[0]], name=node.name, **attrs))
        else:
            nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def truncated(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """A copy that computes only ``outputs`` (float tensors): unused nodes, initializers and inputs dropped."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    wanted, stack = set(), list(outputs)
    while stack:
        node = producer.get(stack.pop())
        if node is not None and id(node) not in wanted:
            wanted.add(id(node))
            stack.extend(node.input)
    nodes = [n for n in graph.node if id(n) in wanted]
    used = {name for n in nodes for name in n.input}
    initializers = [t for t in graph.initializer if t.name in used]
    inits = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name in used and (i.name not in inits or model.ir_version < 4)]
    outs = [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in outputs]
    new_graph = helper.make_graph(nodes, graph.name, inputs, outs, initializers)
    return helper.make_model(new_graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
