"""Validating a model at load: what a damaged or foreign file gets wrong is said here, in one line naming the tensor,
node or field, before any NumPy work trips over it (a reshape of a truncated weight, a division by group=0).

``checked(proto, path)`` runs, in order: names made printable (a proto2 string with bytes that are not UTF-8
comes out of protobuf as ``bytes``: every such name is rewritten with backslash escapes, consistently, so the
tensor stays usable as ``--layer``); the IR and opset versions this onnx package knows; every initializer's
data against its shape and type; onnx's checker with strict, type-checked shape inference (two nodes writing
one tensor, int weights in a float graph, zero kernels or strides); then what the checker lets through:
``group`` and channel counts of Conv, and bias and normalization parameter lengths.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import FdsubError

STANDARD_DOMAINS = ("", "ai.onnx")
PROTO_LIMIT = (1 << 31) - (1 << 20)  # protobuf cannot serialize more; the checker then reads the file itself
#: checker findings onnxruntime runs anyway (a graph input or output declared without a shape)
TOLERATED = ("Field 'shape' of 'type' is required but missing",)
WINDOW_OPS = ("Conv", "ConvTranspose", "AveragePool", "MaxPool", "LpPool")
POSITIVE_ATTRS = ("kernel_shape", "strides", "dilations")
#: per-channel parameters: op -> input indices whose length must be the channel count
CHANNEL_PARAMS = {"BatchNormalization": (1, 2, 3, 4), "InstanceNormalization": (1, 2)}
#: ops whose weights must be floating point like the image they are applied to
FLOAT_WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "InstanceNormalization", "PRelu")
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def checked(proto: onnx.ModelProto, path: str) -> onnx.ModelProto:
    """``proto`` with printable names, after every check of the module docstring; a FdsubError naming the fault."""
    _printable_names(proto)
    _versions(proto, path)
    for tensor in proto.graph.initializer:
        _tensor(tensor, path, f"initializer {tensor.name!r}")
    _float_weights(proto, path)
    shapes = _checker(proto, path)
    for node in proto.graph.node:
        if node.domain in STANDARD_DOMAINS:
            _node(node, shapes, path)
    return proto


def nonfinite_weights(model) -> list[tuple[str, list[int], int, int]]:
    """``(name, shape, NaN count, Inf count)`` of every float constant of ``model`` holding NaN or Inf."""
    bad = []
    for name, value in model.constants.items():
        value = np.asarray(value)
        if value.dtype.kind == "f":
            nan, inf = int(np.isnan(value).sum()), int(np.isinf(value).sum())
            if nan or inf:
                bad.append((name, list(value.shape), nan, inf))
    return bad


def _text(value) -> str:
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else value


def _printable_names(proto: onnx.ModelProto) -> None:
    """Rewrite every name that is not valid UTF-8 (protobuf hands it over as bytes) with backslash escapes."""
    graph = proto.graph
    for node in graph.node:
        if any(isinstance(v, bytes) for v in (node.name, node.op_type, node.domain, *node.input, *node.output)):
            node.name, node.op_type, node.domain = _text(node.name), _text(node.op_type), _text(node.domain)
            node.input[:] = [_text(v) for v in node.input]
            node.output[:] = [_text(v) for v in node.output]
    for item in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
        if isinstance(item.name, bytes):
            item.name = _text(item.name)


def _versions(proto: onnx.ModelProto, path: str) -> None:
    newest_ir = onnx.IR_VERSION
    if proto.ir_version > newest_ir:
        raise FdsubError(f"{path}: IR version {proto.ir_version} is newer than this onnx package reads (up to "
                         f"{newest_ir}); export the model for an older IR version, or upgrade onnx")
    opsets = [o.version for o in proto.opset_import if o.domain in STANDARD_DOMAINS]
    newest = onnx.defs.onnx_opset_version()
    if not opsets:
        raise FdsubError(f"{path} names no opset of the standard ONNX domain; export it again (opset 7 to {newest})")
    if not 1 <= opsets[0] <= newest:
        raise FdsubError(f"{path}: opset {opsets[0]} is not one this onnx package knows (1 to {newest}); "
                         f"export the model at opset {newest} or lower")


def _tensor(tensor, path: str, what: str) -> None:
    """The tensor's data must fill exactly its declared shape and type (a byte error shows as a mismatch)."""
    dims = list(tensor.dims)
    try:
        if any(d < 0 for d in dims):
            raise ValueError(f"negative dimension in {dims}")
        numpy_helper.to_array(tensor)
    except Exception as exc:  # onnx raises KeyError, ValueError, TypeError... for damaged tensors
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, KeyError):
            reason = f"data type code {tensor.data_type} is not an ONNX type"
        raise FdsubError(f"{path}: {what} {dims} is malformed ({reason}); the file is damaged, "
                         "export the model again") from None


def _float_weights(proto: onnx.ModelProto, path: str) -> None:
    """Integer weights in a float graph (a conversion gone wrong): named here rather than by type inference."""
    types = {t.name: t.data_type for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type in FLOAT_WEIGHT_OPS and node.domain in STANDARD_DOMAINS:
            for name in node.input[1:]:
                if name in types and types[name] not in FLOAT_TYPES:
                    kind = onnx.TensorProto.DataType.Name(types[name]).lower()
                    raise FdsubError(f"{path}: {node.op_type} node {node.name or node.output[0]!r} takes weight "
                                     f"{name!r} as {kind}, not floating point; export the model again in float")


def _checker(proto: onnx.ModelProto, path: str) -> dict[str, tuple]:
    """onnx's checker plus strict, type-checked shape inference; the static shapes it found (name -> dims)."""
    try:
        if proto.ByteSize() > PROTO_LIMIT:
            onnx.checker.check_model(path, full_check=True)
            return {}
        try:
            onnx.checker.check_model(proto)
        except onnx.checker.ValidationError as exc:
            if not any(text in str(exc) for text in TOLERATED):
                raise
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except Exception as exc:  # ValidationError, InferenceError, or ValueError for damaged fields
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        reason = lines[0].replace("[ShapeInferenceError] ", "").replace("Inference error(s): ", "")
        raise FdsubError(f"{path} is not a valid ONNX model: {reason[:300]}; export it again "
                         "(onnx.checker.check_model names the problem)") from None
    shapes = {}
    for info in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        dims = info.type.tensor_type.shape.dim
        shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
    for tensor in inferred.graph.initializer:
        shapes[tensor.name] = tuple(tensor.dims)
    return shapes


def _node(node, shapes: dict, path: str) -> None:
    """Attributes and parameter lengths the checker does not look at, where NumPy would fail on them later."""
    label = f"{node.op_type} node {node.name or node.output[0]!r}"
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type in WINDOW_OPS:
        for name in POSITIVE_ATTRS:
            values = attrs.get(name)
            if values is not None and any(int(v) < 1 for v in values):
                raise FdsubError(f"{path}: {label} has {name} {list(values)}; every entry must be at least 1")
        auto_pad = attrs.get("auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
        if auto_pad != "NOTSET" and "pads" in attrs:  # the ONNX spec: "pads ... cannot be used with auto_pad"
            raise FdsubError(f"{path}: {label} has both auto_pad {auto_pad} and pads {list(attrs['pads'])}; the ONNX "
                             "specification allows one of them, export the model again")
    if node.op_type not in ("Conv", "ConvTranspose", *CHANNEL_PARAMS):
        return
    x = shapes.get(node.input[0]) if node.input else None
    channels = x[1] if x is not None and len(x) > 1 else None
    if node.op_type in CHANNEL_PARAMS:
        for i in CHANNEL_PARAMS[node.op_type]:
            p = shapes.get(node.input[i]) if len(node.input) > i and node.input[i] else None
            if channels and p is not None and len(p) == 1 and p[0] not in (None, channels):
                raise FdsubError(f"{path}: {label} has {p[0]} values in {node.input[i]!r} for {channels} channels; "
                                 "the file is damaged, export the model again")
        return
    group = int(attrs.get("group", 1))
    w = shapes.get(node.input[1]) if len(node.input) > 1 else None
    if group < 1:
        raise FdsubError(f"{path}: {label} has group={group}; it must be at least 1")
    if w is None or len(w) < 2 or None in w[:2]:
        return
    out_channels, per_group = (w[0], w[1]) if node.op_type == "Conv" else (w[1] * group, w[0] // group)
    if out_channels % group or (channels and per_group * group != channels):
        raise FdsubError(f"{path}: {label} has group={group} but weight {node.input[1]!r} {list(w)} and "
                         f"{channels} input channels; the groups must divide them")
    b = shapes.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if b is not None and tuple(b) != (out_channels,):
        raise FdsubError(f"{path}: {label} has bias {node.input[2]!r} of shape {list(b)} for {out_channels} "
                         "output channels; the file is damaged, export the model again")
