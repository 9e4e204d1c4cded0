"""Graph preparation: what an exported graph computes from constants, made constant, and every shape made static.

Exporters leave shape arithmetic in the graph (``Shape -> Gather -> ... -> Concat`` computing the pads of a
dynamic "SAME" padding, a ``Reshape`` target, ``Slice`` bounds, ``Resize`` sizes). With a static input shape
these are constants. Preparation alternates ONNX shape inference (with data propagation) and folding of every
node whose inputs are all constant (onnx's reference evaluator), until no new constant or shape appears: a
fold can give a later node its shape, and a shape can let a ``Shape`` node fold. The graph keeps its node and
tensor names, so every name a user sees in the exported file still works.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import FdsubError

STANDARD_DOMAINS = ("", "ai.onnx")
FOLD_LIMIT = 4 << 30  # largest constant (bytes) produced by folding
SHAPE_ONLY = 4096  # constants with more elements reach shape inference by shape alone (weights); smaller by value
ROUNDS = 32  # fold/infer rounds at most (most exports settle in two or three, Swin's window arithmetic in ten)
#: ops whose folding may use a newer opset of the reference evaluator than the model's (same semantics)
NEWER_OPSET_OK = ("DequantizeLinear", "QuantizeLinear")
#: ops whose output has their first input's shape but that ONNX shape inference leaves untyped (a function op:
#: GroupNormalization in onnx 1.23), so nothing after them would get a shape
SAME_SHAPE = ("GroupNormalization",)
_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                     "Bernoulli"}


@dataclass(frozen=True)
class ShapeSetting:
    """How messages name the setting that gives a model's input shape: the command line's option (``CLI_SHAPE``)
    or a zoo file's key (``evaluate.zoo``)."""

    name: str  # what a message calls it: "--input-shape"
    advice: str  # how to set it: "pass --input-shape 1,C,H,W (e.g. 1,3,224,224)"


CLI_SHAPE = ShapeSetting("--input-shape", "pass --input-shape 1,C,H,W (e.g. 1,3,224,224)")


def prepare(proto: onnx.ModelProto, nodes: list, path: str, opset: int, setting: ShapeSetting = CLI_SHAPE):
    """``(nodes, shapes, constants)``: the nodes left once constants are folded (in order), the static shape of
    every tensor that has one, and every constant (initializers and folded values)."""
    constants = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    shapes = _infer_shapes(proto, path, advice=setting.advice)
    for _ in range(ROUNDS):
        count = (len(nodes), len(shapes))
        shapes |= {n.output[0]: shapes[n.input[0]] for n in nodes
                   if n.op_type in SAME_SHAPE and n.input[0] in shapes and n.output[0] not in shapes}
        nodes = _folded(nodes, constants, shapes, opset)
        if all(o in shapes for n in nodes for o in n.output if o):
            while True:  # every shape known: fold what the last folds made constant (Shape -> Gather -> ...)
                before, nodes = len(nodes), _folded(nodes, constants, shapes, opset)
                if len(nodes) == before:
                    break
            break
        shapes.update(_infer_shapes(_with_constants(proto, nodes, constants, shapes), path, strict=False))
        if (len(nodes), len(shapes)) == count:
            break
    return nodes, shapes, constants


def _with_constants(proto: onnx.ModelProto, nodes: list, constants: dict, shapes: dict) -> onnx.ModelProto:
    """The graph of ``nodes`` with every constant they read given to shape inference: small ones by value
    (initializers), large ones (weights) by shape alone (inputs), so a round costs no copy of the weights; and the
    float outputs of ``SAME_SHAPE`` ops with the shapes ``shapes`` gives them."""
    used = {name for node in nodes for name in node.input if name in constants}
    small = [onnx.numpy_helper.from_array(np.asarray(constants[n]), n) for n in sorted(used)
             if np.size(constants[n]) <= SHAPE_ONLY]
    large = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(np.asarray(constants[n]).dtype),
                                           list(np.shape(constants[n])))
             for n in sorted(used) if np.size(constants[n]) > SHAPE_ONLY]
    initializers = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers] + large
    typed = [helper.make_tensor_value_info(n.output[0], onnx.TensorProto.FLOAT, list(shapes[n.output[0]]))
             for n in nodes if n.op_type in SAME_SHAPE and n.output[0] in shapes]
    graph = helper.make_graph(nodes, proto.graph.name or "prepared", inputs, list(proto.graph.output), small,
                              value_info=typed)
    model = helper.make_model(graph, opset_imports=list(proto.opset_import), ir_version=proto.ir_version)
    model.functions.extend(proto.functions)
    return model


def inferred_shapes(proto: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Every static shape ONNX shape inference finds in ``proto`` (none where it fails)."""
    return _infer_shapes(proto, "", strict=False)


def _infer_shapes(proto, path, strict: bool = True, advice: str = CLI_SHAPE.advice) -> dict[str, tuple[int, ...]]:
    """Every static shape ONNX shape inference (with data propagation) finds; a failure is an error only on
    the exported graph itself (``strict``), not on a prepared round."""
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception as exc:
        if not strict:
            return {}
        raise FdsubError(f"{path}: ONNX shape inference failed ({str(exc).splitlines()[0]}); "
                         f"check the model with onnx.checker or {advice}") from None
    shapes = {}
    graph = inferred.graph
    for info in [*graph.input, *graph.value_info, *graph.output]:
        dims = info.type.tensor_type.shape.dim
        if (info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape")
                and all(d.dim_value > 0 for d in dims)):
            shapes[info.name] = tuple(d.dim_value for d in dims)
    for init in graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes


def stored_constants(graph: onnx.GraphProto) -> dict:
    """Name -> array of the values a graph stores: its initializers and its Constant nodes' tensors (torch's legacy
    exporter writes a norm's scale and shift, and shapes, as Constant nodes)."""
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _folded(nodes, constants, shapes, opset):
    """Evaluate nodes whose inputs are all constant (weights from Constant, ConstantOfShape, DequantizeLinear...)."""
    kept = []
    for node in nodes:
        value = None
        if node.domain in STANDARD_DOMAINS and not any(
                a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            inputs = [n for n in node.input if n]
            if node.op_type == "Shape" and inputs[0] in shapes and not node.attribute:
                value = [np.array(shapes[inputs[0]], dtype=np.int64)]
            elif all(n in constants for n in inputs) and node.op_type not in _NONDETERMINISTIC:
                value = _evaluate(node, {n: constants[n] for n in inputs}, opset)
        if value is not None and sum(np.asarray(v).nbytes for v in value) <= FOLD_LIMIT:
            for name, array in zip(node.output, value):
                constants[name] = np.asarray(array)
                shapes.setdefault(name, np.asarray(array).shape)
        else:
            kept.append(node)
    return kept


def _evaluate(node, feeds: dict, opset: int):
    """The outputs of one node on constant ``feeds`` (None when the reference evaluator cannot run it); ops of
    ``NEWER_OPSET_OK`` are retried at the newest opset (onnx's reference lacks some versions of them)."""
    from onnx.reference import ReferenceEvaluator

    versions = [opset] + ([onnx.defs.onnx_opset_version()] if node.op_type in NEWER_OPSET_OK else [])
    for version in versions:
        try:
            return ReferenceEvaluator(_single_node_model(node, feeds, version)).run(None, feeds)
        except Exception:
            continue
    return None


def _single_node_model(node, feeds, opset):
    """A one-node model, so the reference evaluator picks the op version of the model's opset."""
    inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), None)
              for n, v in feeds.items()]
    outputs = [helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None) for n in node.output]
    graph = helper.make_graph([node], "fold", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


NHWC_TO_NCHW = [0, 3, 1, 2]


def nchw_input(proto: onnx.ModelProto) -> str | None:
    """Read an NHWC image input (TF exports: its only consumers are ``Transpose(perm=[0, 3, 1, 2])``) as NCHW:
    the input takes the NCHW shape and each of those Transposes becomes an Identity, keeping its names. Images
    are then fed as everywhere else. Returns the input's name when it was rewritten (in place)."""
    initializers = {i.name for i in proto.graph.initializer}
    for inp in proto.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if inp.name in initializers or len(dims) != 4:
            continue
        users = [n for n in proto.graph.node if inp.name in n.input]
        perms = [next((list(a.ints) for a in n.attribute if a.name == "perm"), None) for n in users]
        if not users or any(n.op_type != "Transpose" or p != NHWC_TO_NCHW for n, p in zip(users, perms)):
            continue
        copies = [onnx.TensorShapeProto.Dimension() for _ in range(4)]
        for new, old in zip(copies, [dims[i] for i in NHWC_TO_NCHW]):
            new.CopyFrom(old)
        for dim, new in zip(dims, copies):
            dim.CopyFrom(new)
        for node in users:
            node.op_type = "Identity"
            del node.attribute[:]
        return inp.name
    return None
