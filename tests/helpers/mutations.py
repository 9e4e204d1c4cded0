"""A small CNN and the ways a model file goes wrong: byte errors in weights, bad attributes, bad versions, names
no terminal or JSON takes as they are. Shared by the validation tests and the fuzz generator (tools/fuzz.py).

``base_model()``: image [1, 3, 16, 16] -> Conv ``conv_a`` (w1 [4, 3, 3, 3], b1 [4], pad 1) -> ``feat_one``
-> Relu ``relu_a`` -> ``r1`` -> MaxPool ``pool_a`` (2x2, stride 2) -> ``p1`` -> Conv ``conv_b`` (w2 [6, 4, 3, 3],
b2 [6]) -> ``c2``. Each entry of ``REFUSED`` breaks it in one way that loading must refuse, naming the tensor,
node or field given; each of ``ACCEPTED`` must load and decode (names shown readably, NaN warned about).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

LAYERS = ("feat_one", "p1", "c2")  # the decodable layers: conv_a, pool_a, conv_b outputs


def base_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32) * 0.3, n)
             for n, s in (("w1", (4, 3, 3, 3)), ("b1", (4,)), ("w2", (6, 4, 3, 3)), ("b2", (6,)))]
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["feat_one"], name="conv_a", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1], strides=[1, 1], group=1),
        helper.make_node("Relu", ["feat_one"], ["r1"], name="relu_a"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool_a", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], name="conv_b", kernel_shape=[3, 3], group=1),
    ]
    graph = helper.make_graph(nodes, "mutant", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                              [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("c2", TensorProto.FLOAT, [1, 6, 6, 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)


def _copy(proto):
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    return out


def _init(proto, name):
    return next(t for t in proto.graph.initializer if t.name == name)


def _node(proto, name):
    return next(n for n in proto.graph.node if n.name == name)


def _set_attr(proto, node, name, value):
    n = _node(proto, node)
    kept = [a for a in n.attribute if a.name != name]
    del n.attribute[:]
    n.attribute.extend(kept + [helper.make_attribute(name, value)])


def _mutant(change):
    def make(proto=None):
        proto = _copy(proto or base_model())
        result = change(proto)
        return proto if result is None else result
    make.__doc__ = change.__doc__
    return make


def _raw(name, cut):
    def change(p):
        t = _init(p, name)
        t.raw_data = t.raw_data[:cut] if cut < 0 else t.raw_data + b"\0" * cut
    return change


def _float_data_short(p):
    t = _init(p, "w1")
    values = numpy_helper.to_array(t).ravel()[:-2]
    t.ClearField("raw_data")
    t.float_data.extend(values.tolist())


def _dims(name, index, value):
    def change(p):
        _init(p, name).dims[index] = value
    return change


def _replace(name, array):
    def change(p):
        _init(p, name).CopyFrom(numpy_helper.from_array(array, name))
    return change


def _attr(node, name, value):
    return lambda p: _set_attr(p, node, name, value)


def _two_writers(p):
    _node(p, "conv_b").output[0] = "p1"
    p.graph.output[0].name = "p1"


def _bytes(old: bytes, new: bytes):
    assert len(old) == len(new)  # protobuf strings carry their length: keep it
    return lambda p: onnx.ModelProto.FromString(p.SerializeToString().replace(old, new))


def renamed(proto, old: str, new: str) -> onnx.ModelProto:
    """``proto`` with tensor ``old`` called ``new`` wherever it appears."""
    proto = _copy(proto)
    for node in proto.graph.node:
        node.input[:] = [new if v == old else v for v in node.input]
        node.output[:] = [new if v == old else v for v in node.output]
    for item in (*proto.graph.input, *proto.graph.output, *proto.graph.value_info, *proto.graph.initializer):
        if item.name == old:
            item.name = new
    return proto


def _nan(p):
    w = numpy_helper.to_array(_init(p, "w1")).copy()
    w.flat[0] = np.nan
    _init(p, "w1").CopyFrom(numpy_helper.from_array(w, "w1"))


#: mutation -> (make(), fragment the one error line must hold)
REFUSED = {
    "raw_data_short": (_mutant(_raw("w1", -4)), "w1"),
    "raw_data_long": (_mutant(_raw("w1", 8)), "w1"),
    "float_data_short": (_mutant(_float_data_short), "w1"),
    "dtype_code": (_mutant(lambda p: setattr(_init(p, "w1"), "data_type", 99)), "w1"),
    "dim_flipped": (_mutant(_dims("w1", 0, 4 + 1024)), "w1"),
    "dim_huge": (_mutant(_dims("w1", 0, 1 << 40)), "w1"),
    "dim_negative": (_mutant(_dims("w1", 0, -4)), "w1"),
    "group_0": (_mutant(_attr("conv_a", "group", 0)), "conv_a"),
    "group_mismatch": (_mutant(_attr("conv_b", "group", 3)), "conv_b"),
    "kernel_shape_0": (_mutant(_attr("pool_a", "kernel_shape", [0, 0])), "pool_a"),
    "strides_0": (_mutant(_attr("conv_a", "strides", [0, 0])), "conv_a"),
    "opset_9999": (_mutant(lambda p: setattr(p.opset_import[0], "version", 9999)), "opset"),
    "ir_version_99": (_mutant(lambda p: setattr(p, "ir_version", 99)), "IR version"),
    "int64_weights": (_mutant(_replace("w1", np.ones((4, 3, 3, 3), np.int64))), "w1"),
    "bias_length": (_mutant(_replace("b1", np.zeros(3, np.float32))), "b1"),
    "two_writers": (_mutant(_two_writers), "p1"),
}

#: mutation -> make(); these load, and every command treats them cleanly
ACCEPTED = {
    "markup_name": _mutant(lambda p: setattr(_node(p, "conv_a"), "name", "[/]")),
    "markup_layer": _mutant(lambda p: renamed(p, "feat_one", "[bold]x[/] [/]")),
    "non_utf8_name": _mutant(_bytes(b"feat_one", b"feat\xffone")),
    "nan_weight": _mutant(_nan),
    "nodes_out_of_order": _mutant(lambda p: p.graph.node.extend([p.graph.node.pop(0)])),  # float16 converters' Casts
}
