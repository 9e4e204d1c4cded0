"""QOperator and dynamically quantized models read as float ops (graph/dequantize.py): a small net quantized with
onnxruntime.quantization decodes like its float original within the weights' quantization error, local mode is
exact per instance on the rewritten copy, and inspect/decode say that the model was dequantized."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from checks import assert_instance_identity, random_images, save_proto
from clirun import invoke
from netgen import NetBuilder
from onnx import numpy_helper
from quantize import quantize

import fdsub_onnx as fd
from fdsub_onnx.modes.backward import forward_for

#: format -> the node ops the rewrite records
REWRITTEN = {"qop": {"QLinearConv", "QLinearAdd", "QLinearGlobalAveragePool"}, "qdyn": {"ConvInteger"}}


def _residual_net():
    """conv -> relu -> two convs added (a residual) -> conv s2 -> GAP -> 1x1 conv."""
    b = NetBuilder(height=12, width=12, seed=3)
    x = b.relu(b.conv("input", 6, 3))
    y = b.add(b.conv(x, 6, 3, 1, (1, 1, 1, 1)), b.conv(x, 6, 1))
    last = b.conv(b.global_avgpool(b.conv(y, 8, 3, 2)), 4, 1)
    return b, last


@pytest.fixture(scope="module", params=sorted(REWRITTEN))
def quantized(request, tmp_path_factory):
    """(format, float model, quantized model, the quantized file) of the residual net."""
    folder = tmp_path_factory.mktemp(request.param)
    b, last = _residual_net()
    source = save_proto(folder, "float.onnx", b.build([*b.layers, last]))
    quantize(source, folder / "quantized.onnx", request.param)
    return request.param, fd.load_model(source), fd.load_model(folder / "quantized.onnx"), folder / "quantized.onnx"


def test_quantized_net_decodes_like_its_float_original(quantized):
    fmt, float_model, model, _ = quantized
    assert {r["op"] for r in model.dequantized} == REWRITTEN[fmt]
    assert not any(n.op_type in REWRITTEN[fmt] for n in model.nodes)
    # in graph order (a conv fused with its Relu takes the Relu's name)
    convs, float_convs = ([layer for layer in fd.inspect_model(m).layers if layer.op == "Conv"]
                          for m in (model, float_model))
    assert len(convs) == len(float_convs) == 5 and all(layer.decodable for layer in convs)
    for layer, float_layer in zip(convs, float_convs):
        want, got = fd.decode(float_model, float_layer.name, dtype="float64"), fd.decode(model, layer.name,
                                                                                           dtype="float64")
        assert np.array_equal(want.stride, got.stride) and np.array_equal(want.origin, got.origin)
        diff, scale = np.abs(got.filters - want.filters).max(), np.abs(want.filters).max()
        assert 0 < diff <= 0.05 * scale, (layer.name, diff / scale)  # 8-bit weights: close, not equal


def test_local_mode_is_exact_per_instance_on_the_rewritten_copy(quantized):
    _, _, model, _ = quantized
    target = [layer.name for layer in fd.inspect_model(model).layers if layer.op == "Conv"][-2]
    images = random_images(model, 4, seed=1)
    decoded = fd.decode(model, target, mode="local", images=fd.ArrayImages(images), top=2, per_instance=True,
                        dtype="float64")
    acts = forward_for(model, target)(images)[target]  # onnxruntime on the rewritten copy, as local mode ran it
    assert_instance_identity(decoded, acts, images, rtol=1e-6)


def test_inspect_and_decode_say_the_model_was_dequantized(quantized, tmp_path):
    fmt, _, model, path = quantized
    table = invoke("inspect", path)
    assert table.exit_code == 0 and "note: the model is quantized" in table.output, table.output
    listed = json.loads(invoke("inspect", path, "--json").stdout)["dequantized"]
    assert {r["op"] for r in listed} == REWRITTEN[fmt] and all(r["node"] and r["as"] for r in listed)
    target = fd.inspect_model(model).layers[0].name
    decoded = invoke("decode", path, "--layer", target, "--out", tmp_path / "out")
    assert decoded.exit_code == 0 and "note: the model is quantized" in decoded.output, decoded.output


def test_a_float_model_is_not_rewritten(tmp_path):
    b, last = _residual_net()
    proto = b.build([last])
    model = fd.load_model(save_proto(tmp_path, "float.onnx", proto))
    assert model.dequantized == [] and fd.inspect_model(model).to_json()["dequantized"] == []
    assert [n.op_type for n in model.proto.graph.node] == [n.op_type for n in proto.graph.node]


def test_parameters_that_do_not_fit_leave_the_model_as_it_is(quantized, tmp_path):
    """A weight scale or zero point of the wrong size: a QOperator graph is not rewritten at all (a float tensor
    must not reach an integer op), a dynamic chain stays as it is; the model loads and inspect says what blocks."""
    fmt, _, _, path = quantized
    proto = onnx.load(str(path))
    conv = next(n for n in proto.graph.node if n.op_type in ("QLinearConv", "ConvInteger"))
    if fmt == "qop":  # two weight scales for six output channels
        scale = next(i for i in proto.graph.initializer if i.name == conv.input[4])
        scale.CopyFrom(numpy_helper.from_array(np.full(2, 0.01, np.float32), scale.name))
    else:  # two weight zero points for six output channels
        zero = next(i for i in proto.graph.initializer if i.name == conv.input[3])
        zero.CopyFrom(numpy_helper.from_array(np.zeros(2, numpy_helper.to_array(zero).dtype), zero.name))
    model = fd.load_model(save_proto(tmp_path, "broken.onnx", proto))
    assert all(r["node"] != conv.name for r in model.dequantized)
    blocked = [layer for layer in fd.inspect_model(model).layers if not layer.decodable]
    assert blocked and all(layer.reason for layer in blocked)
