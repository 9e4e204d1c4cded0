"""Half-precision models read as the float32 models they were converted from.

A float16 (or bfloat16) export (``onnxconverter_common.float16``, an exporter's ``half()``) holds its weights in
16 bits and ``Cast`` nodes where float32 inputs or outputs meet them. Its filters are those of the float32
network with the weights it stores: ``as_float32`` rewrites the graph in place so every tensor is float32 (the
weights widened exactly, each ``Cast`` to a half type made a ``Cast`` to float32, the graph's inputs, outputs
and value infos float32), and every mode runs on that copy; onnxruntime's own float16 rounding of the
activations is left out, as a quantized model's is (``graph.dequantize``).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

HALF = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
HALF_NAMES = {onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16"}


def as_float32(proto: onnx.ModelProto) -> list[dict]:
    """Rewrite ``proto`` in place as float32 where it holds half-precision tensors; one record per tensor widened
    (``{"node": name, "op": "float16", "as": "float32"}``, as ``graph.dequantize`` records its rewrites)."""
    graph = proto.graph
    records = []

    def widened(tensor: onnx.TensorProto) -> None:
        kind = HALF_NAMES[tensor.data_type]
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name))
        records.append({"node": tensor.name, "op": kind, "as": "float32"})

    for tensor in graph.initializer:
        if tensor.data_type in HALF:
            widened(tensor)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in HALF:
                widened(attr.t)
            elif node.op_type == "Cast" and attr.name == "to" and attr.i in HALF:
                attr.i = onnx.TensorProto.FLOAT
    if not records:
        return []
    for info in [*graph.input, *graph.output, *graph.value_info]:
        if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type in HALF:
            info.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    return records
