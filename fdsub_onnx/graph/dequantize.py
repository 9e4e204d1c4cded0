"""QOperator and dynamically quantized graphs rewritten to float ops, so that every mode decodes them.

onnxruntime's QOperator format (``QLinearConv``, com.microsoft's ``QLinearAdd``, ``QGemm``, ...) computes each op
on integers from the quantization parameters of its inputs and output; dynamic quantization
(``DynamicQuantizeLinear -> ConvInteger/MatMulInteger -> Cast -> Mul`` by the scales) computes the input's scale
from each image. Neither is an op with filters, but each stands for a float op:

- a QOperator node becomes ``DequantizeLinear`` of its data inputs, the float op with dequantized constant
  weights and bias, and ``QuantizeLinear`` of its output: the QDQ format, which the rules read as affine maps
  whose pairs cancel (as for a model quantized in QDQ format);
- a dynamic chain becomes the float op on the float input with the dequantized weights (the per-image rounding
  of the input is dropped: with no fixed scale, there is no QDQ pair to keep), its bias ``Add`` folded in.

The model is rewritten in place before preparation, so that onnxruntime (fds, local, the check identity) runs
the same float copy the walker reads. A node whose parameters are not constant stays as it is (the walker then
says why it blocks).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

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
_DROPPED_ATTRIBUTES = ("channels_last",)


def dequantize(proto: onnx.ModelProto) -> list[dict]:
    """Rewrite every QOperator node and dynamic quantization chain of ``proto`` (in place) into float ops;
    returns one record per rewritten node: ``{"node", "op", "as"}`` (its name, its op type, the float op)."""
    if not any(n.op_type in QOPERATOR or n.op_type in INTEGER for n in proto.graph.node):
        return []
    graph = _Graph(proto)
    records = []
    for node in list(proto.graph.node):
        replaced = graph.qoperator(node) if node.op_type in QOPERATOR else (
            graph.integer(node) if node.op_type in INTEGER else None)
        if replaced is not None:
            records.append({"node": node.name or f"{node.op_type}:{node.output[0]}", "op": node.op_type,
                            "as": replaced})
    graph.write()
    return records


class _Graph:
    """The nodes being rewritten: constants known from initializers and Constant nodes, fresh names."""

    def __init__(self, proto: onnx.ModelProto):
        self.proto = proto
        self.values = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
        self.producer, self.consumers = {}, defaultdict(list)
        for node in proto.graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
            for out in node.output:
                self.producer[out] = node
            for name in node.input:
                self.consumers[name].append(node)
        self.names = set(self.values) | set(self.producer) | {i.name for i in proto.graph.input}
        self.replacement, self.removed, self.helpers = {}, set(), set()  # id(node) -> new nodes; ids dropped
        self.initializers, self.dequantized, self.pending = [], {}, []  # pending: DequantizeLinear nodes made

    # ---- QOperator -------------------------------------------------------------------------------------------
    def qoperator(self, node) -> str | None:
        op, data, (ys, yz), weight, bias = QOPERATOR[node.op_type]
        ins = list(node.input) + [""] * 10
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name not in _DROPPED_ATTRIBUTES}
        if any(a.name == "channels_last" and a.i for a in node.attribute) or (
                node.op_type == "QGemm" and (attrs.get("alpha", 1.0) != 1.0 or attrs.get("transA", 0))):
            return None
        if data is None:  # QLinearConcat: the inputs come in threes after the output's parameters
            data = [(i, i + 1, i + 2) for i in range(2, len(node.input), 3)]
        inputs = [self._dequantized_data(ins[v], ins[s], ins[z]) for v, s, z in data]
        if weight is not None:
            w, x_scale = self._weight(node, ins, weight), self.value(ins[1])
            if w is None:
                if op == "MatMul":  # two data inputs: both dequantized (the walker then says why it blocks)
                    w = self._dequantized_data(*(ins[i] for i in weight))
                else:
                    return None
            inputs.append(w)
            if bias is not None and ins[bias]:
                scale = self.value(ins[weight[1]])
                if self.value(ins[bias]) is None or scale is None or x_scale is None:
                    return None
                inputs.append(self._initializer(ins[bias], self.value(ins[bias]) * x_scale.reshape(-1)[0]
                                                * np.asarray(scale).reshape(-1)))
        new, self.pending = self.pending, []
        out = node.output[0]
        if not ins[ys]:  # QGemm without output scale: a float output
            new.append(helper.make_node(op, inputs, [out], name=node.name, **attrs))
        else:
            floating = self._fresh(out[: -len("_quantized")] if out.endswith("_quantized") else out + "_float")
            new.append(helper.make_node(op, inputs, [floating], name=node.name, **attrs))
            new.append(helper.make_node("QuantizeLinear", [floating, ins[ys], *([ins[yz]] if ins[yz] else [])],
                                        [out], name=f"{node.name or out}/quantize"))
        self.replacement[id(node)] = new
        return op

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

    def _dequantized_data(self, name: str, scale: str, zero: str) -> str:
        """A DequantizeLinear of a quantized data tensor (one per tensor and parameters, shared)."""
        key = (name, scale, zero)
        if key not in self.dequantized:
            out = self._fresh(f"{name}_dequantized")
            self.pending.append(helper.make_node("DequantizeLinear", [name, scale, *([zero] if zero else [])],
                                                 [out], name=f"{out}/dequantize"))
            self.dequantized[key] = out
        return self.dequantized[key]

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
