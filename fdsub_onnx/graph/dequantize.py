"""QOperator and dynamically quantized graphs rewritten to float ops, so that every mode decodes them.

onnxruntime's QOperator format (``QLinearConv``, com.microsoft's ``QLinearAdd``, ``QGemm``, ...) computes each op
on integers from the quantization parameters of its inputs and output; dynamic quantization
(``DynamicQuantizeLinear -> ConvInteger/MatMulInteger -> Cast -> Mul`` by the scales) computes the input's scale
from each image. Neither is an op with filters, but each stands for a float op:

- a QOperator node becomes the float op with dequantized constant weights and bias on float inputs, its output
  clipped to the range its quantization holds (that is where a fused ReLU or ReLU6 went); the QuantizeLinear of
  the image becomes that Clip, the DequantizeLinear of a result an Identity. Only the rounding is dropped.
  (Rewriting to the QDQ format instead, DequantizeLinear -> float op -> QuantizeLinear, reads the same in
  ``weights`` mode, but onnxruntime fuses such sandwiches back into integer kernels, so the values it reports
  for the float tensors are not the float op's, and local mode's per-instance identity breaks by 1-3%.)
  Every QOperator node is rewritten or none is (a float tensor must not reach an integer op);
- a dynamic chain becomes the float op on the float input with the dequantized weights (the per-image rounding
  of the input is dropped), its bias ``Add`` folded in.

The model is rewritten in place before preparation, so that onnxruntime (fds, local, the check identity) runs
the same float copy the walker reads. A node whose parameters are not constant stays as it is (the walker then
says why it blocks).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .prepare import stored_constants

#: QOperator op -> (float op, its quantized data inputs as (value, scale, zero point) indices, the output's
#: (scale, zero point) indices, (weight, scale, zero point) indices of a constant weight, bias index)
QOPERATOR = {
    "QLinearConv": ("Conv", [(0, 1, 2)], (6, 7), (3, 4, 5), 8),
    "QLinearMatMul": ("MatMul", [(0, 1, 2)], (6, 7), (3, 4, 5), None),
    "QGemm": ("Gemm", [(0, 1, 2)], (7, 8), (3, 4, 5), 6),
    "QLinearAdd": ("Add", [(0, 1, 2), (3, 4, 5)], (6, 7), None, None),
    "QLinearMul": ("Mul", [(0, 1, 2), (3, 4, 5)], (6, 7), None, None),
    "QLinearGlobalAveragePool": ("GlobalAveragePool", [(0, 1, 2)], (3, 4), None, None),
    "QLinearAveragePool": ("AveragePool", [(0, 1, 2)], (3, 4), None, None),
    "QLinearSigmoid": ("Sigmoid", [(0, 1, 2)], (3, 4), None, None),
    "QLinearLeakyRelu": ("LeakyRelu", [(0, 1, 2)], (3, 4), None, None),
    "QLinearConcat": ("Concat", None, (0, 1), None, None),  # (y scale, y zero point, then x, scale, zero point...)
}
INTEGER = {"ConvInteger": "Conv", "MatMulInteger": "MatMul"}
#: ops that move quantized values without reading them as numbers (they work on float values alike)
_LAYOUT = ("Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "MaxPool", "Identity", "Slice", "Split",
           "Gather", "DepthToSpace", "SpaceToDepth")
_DROPPED_ATTRIBUTES = ("channels_last",)


def dequantize(proto: onnx.ModelProto) -> list[dict]:
    """Rewrite every QOperator node and dynamic quantization chain of ``proto`` (in place) into float ops;
    returns one record per rewritten node: ``{"node", "op", "as"}`` (its name, its op type, the float op)."""
    if not any(n.op_type in QOPERATOR or n.op_type in INTEGER for n in proto.graph.node):
        return []
    graph = _Graph(proto)
    records = []
    for node in list(proto.graph.node):
        try:
            replaced = graph.qoperator(node) if node.op_type in QOPERATOR else (
                graph.integer(node) if node.op_type in INTEGER else None)
        except (ValueError, IndexError, TypeError):  # parameters that do not fit their tensors: left as they are
            replaced = None
        if replaced is None and node.op_type in QOPERATOR:
            return []  # a QOperator node left as it is: its neighbours must stay quantized too
        if replaced is not None:
            records.append({"node": node.name or f"{node.op_type}:{node.output[0]}", "op": node.op_type,
                            "as": replaced})
    if any(r["op"] in QOPERATOR for r in records) and not graph.float_boundaries():
        return []
    graph.write()
    return records


def dequantized_note(records: list[dict]) -> str:
    """What ``inspect``, ``decode`` and ``check`` say about a rewritten model (one line): its quantized nodes read
    as float ops, its half-precision tensors as float32 (``graph.precision``)."""
    half = [r for r in records if r["op"] in ("float16", "bfloat16")]
    quantized = [r for r in records if r not in half]
    parts = []
    if quantized:
        ops = ", ".join(sorted({r["op"] for r in quantized}))
        parts.append(f"the model is quantized: {len(quantized)} nodes ({ops}) are read as float ops with dequantized "
                     "weights")
    if half:
        kinds = " and ".join(sorted({r["op"] for r in half}))
        parts.append(f"the model is in {kinds}: its {len(half)} {kinds} tensors are read as float32")
    return "; ".join(parts) + "; every mode and the check identity run on that float copy (activation rounding aside)"


class _Graph:
    """The nodes being rewritten: constants known from initializers and Constant nodes, fresh names."""

    def __init__(self, proto: onnx.ModelProto):
        self.proto = proto
        self.values = stored_constants(proto.graph)
        self.producer, self.consumers = {}, defaultdict(list)
        for node in proto.graph.node:
            for out in node.output:
                self.producer[out] = node
            for name in node.input:
                self.consumers[name].append(node)
        self.names = set(self.values) | set(self.producer) | {i.name for i in proto.graph.input}
        self.replacement, self.removed, self.helpers = {}, set(), set()  # id(node) -> new nodes; ids dropped
        self.initializers = []

    # ---- QOperator -------------------------------------------------------------------------------------------
    def qoperator(self, node) -> str | None:
        """The float op on the (now float) inputs, its output clipped to the range the output's quantization can
        hold (a ReLU or ReLU6 fused into the quantized op lives there); None where a parameter is not constant."""
        op, data, (ys, yz), weight, bias = QOPERATOR[node.op_type]
        ins = list(node.input) + [""] * 10
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name not in _DROPPED_ATTRIBUTES}
        if any(a.name == "channels_last" and a.i for a in node.attribute) or (
                node.op_type == "QGemm" and (attrs.get("alpha", 1.0) != 1.0 or attrs.get("transA", 0))):
            return None
        if data is None:  # QLinearConcat: the inputs come in threes after the output's parameters
            data = [(i, i + 1, i + 2) for i in range(2, len(node.input), 3)]
        inputs = [ins[v] for v, _, _ in data]
        if weight is not None:
            w, x_scale = self._weight(node, ins, weight), self.value(ins[1])
            if w is None and op != "MatMul":
                return None
            inputs.append(ins[weight[0]] if w is None else w)  # MatMul of two data inputs: both float now
            if bias is not None and ins[bias]:
                scale = self.value(ins[weight[1]])
                if self.value(ins[bias]) is None or scale is None or x_scale is None:
                    return None
                inputs.append(self._initializer(ins[bias], self.value(ins[bias]) * x_scale.reshape(-1)[0]
                                                * np.asarray(scale).reshape(-1)))
        out = node.output[0]
        if not ins[ys]:  # QGemm without output scale: a float output
            self.replacement[id(node)] = [helper.make_node(op, inputs, [out], name=node.name, **attrs)]
            return op
        clip = self._clip(ins[ys], ins[yz], out, name=f"{node.name or out}/saturate")
        if clip is None:
            return None
        floating = self._fresh(out[: -len("_quantized")] if out.endswith("_quantized") else out + "_float")
        clip.input[0] = floating
        self.replacement[id(node)] = [helper.make_node(op, inputs, [floating], name=node.name, **attrs), clip]
        return op

    def _clip(self, scale: str, zero: str, out: str, name: str):
        """``Clip(?, lo, hi) -> out``: the float range a quantization (scale, zero point) holds."""
        scale, zero = self.value(scale), self.value(zero) if zero else np.zeros(1, np.uint8)
        if scale is None or zero is None or np.size(scale) != 1:
            return None
        info = np.iinfo(np.asarray(zero).dtype)
        s, z = float(np.asarray(scale).reshape(-1)[0]), float(np.asarray(zero).reshape(-1)[0])
        lo, hi = (self._initializer(f"{out}_{end}", (q - z) * s) for end, q in (("min", info.min), ("max", info.max)))
        return helper.make_node("Clip", ["", lo, hi], [out], name=name)

    def float_boundaries(self) -> bool:
        """QuantizeLinear of data as the Clip to its range, DequantizeLinear of data as Identity (every quantized
        tensor now holds float values); False where a tensor holding quantized values reaches an op that is
        neither rewritten nor indifferent to the number type (then nothing is rewritten)."""
        quantized = {n.output[0] for n in self.proto.graph.node
                     if (n.op_type in QOPERATOR and not (n.op_type == "QGemm" and len(n.input) < 8))
                     or (n.op_type == "QuantizeLinear" and self.value(n.input[0]) is None)}
        for node in self.proto.graph.node:  # graph order: a layout op passes quantized values on
            if node.op_type in _LAYOUT and node.input and node.input[0] in quantized:
                quantized.update(node.output)
        for node in self.proto.graph.node:
            reads = [n for n in node.input if n in quantized]
            if not reads or node.op_type in QOPERATOR or node.op_type in _LAYOUT:
                continue
            if node.op_type == "DequantizeLinear" and node.input[0] in quantized:
                self.replacement[id(node)] = [helper.make_node("Identity", [node.input[0]], list(node.output[:1]),
                                                               name=node.name)]
            else:
                return False
        for node in self.proto.graph.node:
            if node.op_type == "QuantizeLinear" and node.output[0] in quantized:
                clip = self._clip(node.input[1], node.input[2] if len(node.input) > 2 else "", node.output[0],
                                  node.name or f"{node.output[0]}/saturate")
                if clip is None:
                    return False
                clip.input[0] = node.input[0]
                self.replacement[id(node)] = [clip]
        for output in self.proto.graph.output:
            if output.name in quantized:
                output.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
        return True

    def _weight(self, node, ins, weight) -> str | None:
        """A constant integer weight as a float initializer (per-channel scales along the output axis)."""
        w, scale, zero = (self.value(ins[i]) if ins[i] else None for i in weight)
        if w is None or scale is None:
            return None
        if node.op_type == "QGemm":
            axis = 0 if any(a.name == "transB" and a.i for a in node.attribute) else 1
        else:
            axis = 0 if node.op_type == "QLinearConv" else w.ndim - 1
        return self._initializer(ins[weight[0]], _dequantized(w, scale, zero, axis))

    # ---- dynamic quantization --------------------------------------------------------------------------------
    def integer(self, node) -> str | None:
        """``DynamicQuantizeLinear(x) -> ConvInteger/MatMulInteger(x_q, w_q) -> Cast -> Mul(x_scale * w_scale)``
        [``-> Add(bias)``] as the float op on x with the dequantized weights."""
        ins = list(node.input) + ["", ""]
        quantize = self.producer.get(ins[0])
        cast = self._only_consumer(node.output[0], "Cast")
        mul = self._only_consumer(cast.output[0], "Mul") if cast is not None else None
        if quantize is None or quantize.op_type != "DynamicQuantizeLinear" or mul is None:
            return None
        scales = self.producer.get(next((n for n in mul.input if n != cast.output[0]), ""))
        w, zero = self.value(ins[1]), self.value(ins[3]) if ins[3] else None
        if scales is None or scales.op_type != "Mul" or quantize.output[1] not in scales.input or w is None:
            return None
        scale = self.value(next((n for n in scales.input if n != quantize.output[1]), ""))
        if scale is None:
            return None
        op = INTEGER[node.op_type]
        weight = self._initializer(ins[1], _dequantized(w, scale, zero, 0 if op == "Conv" else w.ndim - 1))
        inputs, out, drop = [quantize.input[0], weight], mul.output[0], [node, cast, mul]
        add = self._only_consumer(out, "Add")
        bias = self.value(next((n for n in add.input if n != out), "")) if add is not None else None
        if op == "Conv" and bias is not None and np.size(bias) == w.shape[0] == max(np.shape(bias), default=1):
            inputs.append(self._initializer(add.output[0] + "_bias", np.asarray(bias).reshape(-1)))
            out = add.output[0]
            drop.append(add)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        self.replacement[id(drop[-1])] = [helper.make_node(op, inputs, [out], name=node.name, **attrs)]
        self.removed.update(id(n) for n in drop[:-1])
        self.helpers.update((id(scales), id(quantize)))  # dropped by write() once nothing reads them
        return op

    def _only_consumer(self, name: str, op: str):
        users = self.consumers.get(name, [])
        outputs = {o.name for o in self.proto.graph.output}
        return users[0] if len(users) == 1 and users[0].op_type == op and name not in outputs else None

    # ---- names, constants, writing ---------------------------------------------------------------------------
    def value(self, name: str):
        """The array of a constant (initializer, Constant node, or a Reshape of those), else None."""
        if name in self.values:
            return self.values[name]
        node = self.producer.get(name)
        if node is not None and node.op_type == "Reshape" and all(n in self.values for n in node.input[:2]):
            data, shape = self.values[node.input[0]], self.values[node.input[1]]
            return np.reshape(data, [d if d != 0 else data.shape[i] for i, d in enumerate(shape.tolist())])
        return None

    def _fresh(self, name: str) -> str:
        base, k = name, 1
        while name in self.names:
            name, k = f"{base}_{k}", k + 1
        self.names.add(name)
        return name

    def _initializer(self, source: str, array) -> str:
        name = self._fresh(f"{source}_dequantized")
        self.initializers.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    def write(self):
        """The graph's nodes with the replacements; the dynamic quantizers and scale products dropped once
        nothing reads them."""
        nodes = []
        for node in self.proto.graph.node:
            nodes.extend(self.replacement.get(id(node), [] if id(node) in self.removed else [node]))
        while True:
            read = {name for n in nodes for name in n.input} | {o.name for o in self.proto.graph.output}
            unused = {id(n) for n in nodes if id(n) in self.helpers and not any(o in read for o in n.output)}
            if not unused:
                break
            nodes = [n for n in nodes if id(n) not in unused]
        copies = [onnx.NodeProto() for _ in nodes]
        for copy, node in zip(copies, nodes):
            copy.CopyFrom(node)
        del self.proto.graph.node[:]
        self.proto.graph.node.extend(copies)
        self.proto.graph.initializer.extend(self.initializers)


def _dequantized(q, scale, zero, axis: int) -> np.ndarray:
    """``(q - zero) * scale``, per tensor or along ``axis``."""
    q = np.asarray(q, np.float64)
    shape = [1] * q.ndim
    scale = np.asarray(scale, np.float64).reshape(-1)
    zero = np.zeros(1) if zero is None else np.asarray(zero, np.float64).reshape(-1)
    if max(scale.size, zero.size) > 1:
        shape[axis] = -1
    return (q - zero.reshape(shape)) * scale.reshape(shape)
