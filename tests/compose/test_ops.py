"""Neuron selectors, channel shuffles, multiplicative gates, unsupported ops and input shapes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from checks import assert_identity, load_proto, random_images
from netgen import NetBuilder, run_ort
from onnx import TensorProto, helper

import fdsub_onnx as fd
from fdsub_onnx.modes import plan as plan_module


# ---- parse_neurons ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "selector, expected",
    [
        ("0,5,10-20", [0, 5, *range(10, 21)]),
        (" 3 , 1-2 ", [3, 1, 2]),
        ("7", [7]),
        ("4,4,2-4", [4, 2, 3]),  # order kept, duplicates dropped
        ("0-0", [0]),
        (5, [5]),
        (np.int64(6), [6]),
        ([9, 0, 9, 3], [9, 0, 3]),
        ((1, 2), [1, 2]),
        (np.array([2, 8]), [2, 8]),
        (range(3), [0, 1, 2]),
        (slice(2, 8, 2), [2, 4, 6]),
        (slice(None), list(range(24))),
        (slice(-2, None), [22, 23]),
        (None, list(range(24))),
        ("all", list(range(24))),  # --neurons all
        (" all ", list(range(24))),
        (["all"], list(range(24))),
    ],
)
def test_parse_neurons(selector, expected):
    got = fd.parse_neurons(selector, 24, "conv3")
    assert got.dtype == np.int64
    assert got.tolist() == expected


@pytest.mark.parametrize("selector, bad", [(24, "24"), ("0,30", "30"), ([3, -1], "-1"), ("-1", "-1"), ("20-25", "24")])
def test_parse_neurons_out_of_range(selector, bad):
    with pytest.raises(fd.FdsubError) as info:
        fd.parse_neurons(selector, 24, "conv3")
    message = str(info.value)
    assert f"neuron {bad} is out of range" in message
    assert "0-23" in message and "24 neurons" in message and "conv3" in message


@pytest.mark.parametrize(
    "selector, part", [("a", "a"), ("1,x", "x"), ("1-2-3", "1-2-3"), ("3-", "3-"), ("0.5", "0.5")]
)
def test_parse_neurons_bad_text(selector, part):
    with pytest.raises(fd.FdsubError) as info:
        fd.parse_neurons(selector, 24, "conv3")
    assert repr(part) in str(info.value) and "0,5,10-20" in str(info.value)


def test_a_backwards_range_is_said_to_run_backwards():
    with pytest.raises(fd.FdsubError, match=r"^neuron range '5-2' runs backwards; write it low to high: 2-5$"):
        fd.parse_neurons("1,5-2", 24, "conv3")


@pytest.mark.parametrize("selector", [[1.7], [0, 2.0], [True], ["3"]])
def test_parse_neurons_rejects_non_integer_indices(selector):
    with pytest.raises(fd.FdsubError, match="must be integers"):
        fd.parse_neurons(selector, 24, "conv3")


@pytest.mark.parametrize("selector", ["", ",", [], slice(30, 40)])
def test_parse_neurons_empty_selection(selector):
    with pytest.raises(fd.FdsubError, match=r"no neurons selected.*0-23"):
        fd.parse_neurons(selector, 24, "conv3")


def test_decode_rejects_out_of_range_neurons(load):
    b = NetBuilder()
    a = b.conv("input", 6, 3)
    model = load(b.build([a]))
    with pytest.raises(fd.FdsubError, match=r"neuron 6 is out of range.*0-5"):
        fd.decode(model, a, neurons="0,6")


# ---- channel shuffle ---------------------------------------------------------------------
def test_channel_shuffle_is_a_permutation(load):
    b = NetBuilder(height=12, width=12)
    x = b.conv(b.conv("input", 8, 3), 8, 3, groups=2)
    shuffled = b.channel_shuffle(x, 2)
    b.conv(shuffled, 4, 3, groups=2)
    proto = b.build([x, shuffled, b.last])
    model = load(proto)
    before = fd.decode(model, x, dtype="float64")
    after = fd.decode(model, shuffled, dtype="float64")
    c, g = 8, 2
    perm = [(j % g) * (c // g) + j // g for j in range(c)]
    assert perm != list(range(c))
    assert after.filters.shape == before.filters.shape
    assert (after.stride, after.origin) == (before.stride, before.origin)
    np.testing.assert_array_equal(after.filters, before.filters[perm])
    np.testing.assert_array_equal(after.bias, before.bias[perm])
    images = random_images(model, 2, seed=4)
    acts = run_ort(proto, images, [shuffled, b.last])
    assert_identity(after, acts[shuffled], images, rtol=1e-5)
    assert_identity(fd.decode(model, b.last, dtype="float64"), acts[b.last], images, rtol=1e-5)


# ---- multiplicative gates ------------------------------------------------------------------
def _mul(b: NetBuilder, x: str, gate: str) -> str:
    return b._node("Mul", [x, gate], b.shapes[x])


def test_silu_is_decodable_as_identity(load):
    def build(silu: bool):
        b = NetBuilder(seed=5)
        x = b.conv("input", 6, 3, 1, (1, 1, 1, 1))
        if silu:
            x = _mul(b, x, b.sigmoid(x))
        return b.build([b.conv(x, 4, 3, 2)]), b.last

    (with_silu, last), (plain, last_plain) = build(True), build(False)
    model = load(with_silu)
    summary = fd.inspect_model(model)
    assert [layer.decodable for layer in summary.layers] == [True, True], summary.layers
    got = fd.decode(model, last, dtype="float64")
    want = fd.decode(load(plain), last_plain, dtype="float64")
    assert np.abs(want.filters).max() > 0
    np.testing.assert_array_equal(got.filters, want.filters)
    np.testing.assert_array_equal(got.bias, want.bias)


def test_silu_with_gate_first(load):
    b = NetBuilder()
    x = b.conv("input", 6, 3)
    y = b._node("Mul", [b.sigmoid(x), x], b.shapes[x])
    out = b.conv(y, 4, 3)
    layers = fd.inspect_model(load(b.build([out]))).layers
    assert [layer.decodable for layer in layers] == [True, True], [layer.reason for layer in layers]


# ---- unsupported op --------------------------------------------------------------------------
def test_unsupported_op_blocks_only_later_layers(load, monkeypatch):
    b = NetBuilder(height=10, width=10)
    first = b.conv("input", 4, 3, 1, (1, 1, 1, 1))
    second = b.avgpool(first, 2, 2)
    c, h, w = b.shapes[second]
    roi = b._const("resize_roi", np.zeros(0, np.float32))
    scales = b._const("resize_scales", np.array([1, 1, 2, 2], np.float32))
    up = b._node("Resize", [second, roi, scales], (c, 2 * h, 2 * w), mode="nearest")
    third = b.conv(up, 4, 3)
    fourth = b.conv(b.relu(third), 2, 1)
    model = load(b.build([fourth]))
    layers = {layer.name: layer for layer in fd.inspect_model(model).layers}
    assert list(layers) == [first, second, third, fourth]
    assert layers[first].decodable and layers[second].decodable
    assert not layers[first].per_position and not layers[second].per_position
    for name in (third, fourth):  # after the upsampling: one position at a time (the adjoint), no geometry
        assert layers[name].decodable and layers[name].per_position, name
        assert layers[name].receptive_field is None
        assert "Resize" in layers[name].reason and up in layers[name].reason, layers[name].reason
    with pytest.raises(fd.FdsubError, match="cannot be decoded by the bottom-up route"):
        fd.decode(model, fourth, route="bottom-up")
    decoded = fd.decode(model, fourth)
    assert decoded.plan.route == "adjoint" and decoded.exact_at == "position" and tuple(decoded.stride) == (0, 0)
    with monkeypatch.context() as patched:  # no route at all is not a matter of memory (it said it did not fit)
        patched.setattr(plan_module, "adjoint_problem", lambda linear, target: "no rule for X")
        with pytest.raises(fd.FdsubError, match=r"is not decodable at \(\d+, \d+\) \(bottom-up: .*Resize.*; "
                                                r"adjoint: no rule for X\); `fdsub inspect` lists") as refused:
            fd.decode(model, fourth)
        assert "memory" not in str(refused.value)
    assert fd.decode(model, second).filters.shape[0] == 4
    blocked = NetBuilder(height=10, width=10)
    soft = blocked._node("Softmax", [blocked.conv("input", 4, 3)], (4, 8, 8), axis=1)
    last = blocked.conv(soft, 2, 3)
    model = load(blocked.build([last]))
    with pytest.raises(fd.FdsubError, match="not decodable.*Softmax"):
        fd.decode(model, last)


# ---- input shapes ----------------------------------------------------------------------------
def _small_net(dynamic: bool):
    b = NetBuilder(dynamic=dynamic, seed=3, height=20, width=20)
    x = b.conv("input", 4, 3, 2, (1, 1, 1, 1))
    b.conv(b.avgpool(x, 2, 2), 4, 3)
    return b.build([x, b.last]), b.last


def test_dynamic_height_width_needs_input_shape(load):
    proto, _ = _small_net(dynamic=True)
    with pytest.raises(fd.FdsubError, match="--input-shape"):
        load(proto)


def test_dynamic_height_width_with_input_shape(load):
    proto, last = _small_net(dynamic=True)
    model = load(proto, input_shape=(1, 3, 20, 20))
    assert model.input_shape == (1, 3, 20, 20)
    layers = fd.inspect_model(model).layers
    assert len(layers) == 3 and all(layer.decodable for layer in layers)
    images = random_images(model, 2, seed=6)
    decoded = fd.decode(model, last, dtype="float64")
    assert_identity(decoded, run_ort(proto, images, [last])[last], images, rtol=1e-5)


def test_input_shape_batch_is_fixed_to_one(load):
    proto, _ = _small_net(dynamic=True)
    assert load(proto, input_shape=(8, 3, 24, 24)).input_shape == (1, 3, 24, 24)


def test_input_shape_disagreeing_with_the_model(load):
    proto, _ = _small_net(dynamic=True)
    with pytest.raises(fd.FdsubError, match="disagrees"):
        load(proto, input_shape=(1, 4, 20, 20))  # the model has 3 channels
    with pytest.raises(fd.FdsubError, match="four positive integers"):
        load(proto, input_shape=(1, 3, 20))


def test_dynamic_batch_alone_is_fine(load):
    proto, last = _small_net(dynamic=False)
    static = fd.inspect_model(load(proto))
    image = proto.graph.input[0]
    image.type.tensor_type.shape.dim[0].Clear()
    image.type.tensor_type.shape.dim[0].dim_param = "batch"
    for out in proto.graph.output:
        out.type.tensor_type.shape.dim[0].Clear()
        out.type.tensor_type.shape.dim[0].dim_param = "batch"
    onnx.checker.check_model(proto)
    model = load(proto)
    assert model.input_shape == (1, 3, 20, 20)
    summary = fd.inspect_model(model)
    def rows(layers):
        return [(layer.name, layer.stride, layer.receptive_field, layer.origin, layer.decodable) for layer in layers]

    assert rows(summary.layers) == rows(static.layers) and len(static.layers) == 3
    assert fd.decode(model, last).filters.shape[0] == 4


def test_model_without_image_input(load):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])
    proto = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]))
    with pytest.raises(fd.FdsubError, match=r"no image input of shape \[N, C, H, W\]"):
        load(proto)


# ---- more linear ops: the weights identity through each ---------------------------------------
def _crop(b, x, pads):
    c, h, w = b.shapes[x]
    top, left, bottom, right = pads
    const = b._const(b._fresh("crop"), np.array([0, 0, top, left, 0, 0, bottom, right], np.int64))
    return b._node("Pad", [x, const], (c, h + top + bottom, w + left + right), mode="constant")


def _op_negative_pad_then_valid(b):
    b.conv(_crop(b, b.conv("input", 4, 3, 1, (1, 1, 1, 1)), (0, 0, -1, -2)), 3, 3, 2)


def _op_avgpool_dilations(b):  # opset 19
    x = b.conv("input", 4, 3)
    c, h, w = b.shapes[x]
    b._node("AveragePool", [x], (c, h - 4, w - 4), True, kernel_shape=[3, 3], dilations=[2, 2])
    b.conv(b.last, 3, 3)


def _op_add_self(b):
    x = b.conv("input", 4, 3)
    b.conv(b.add(x, x), 3, 3)


def _op_concat_self(b):
    x = b.conv("input", 4, 3)
    b.conv(b.concat([x, x]), 3, 3)


def _op_channel_constants(b):
    x = b.conv("input", 4, 3)
    k = b._const("k_c11", np.array([1.5, -2, 0.5, 3], np.float32).reshape(4, 1, 1))
    y = b._node("Mul", [k, x], b.shapes[x])  # constant first, rank 3
    y = b._node("Div", [y, b._const("k_scalar", np.array(0.7, np.float32))], b.shapes[x])
    b.conv(y, 3, 3)


def _op_nhwc_round_trip(b):
    x = b.conv("input", 4, 3)
    c, h, w = b.shapes[x]
    y = b._node("Transpose", [x], (h, w, c), perm=[0, 2, 3, 1])
    y = b._node("Identity", [y], (h, w, c))
    b.conv(b._node("Transpose", [y], (c, h, w), perm=[0, 3, 1, 2]), 3, 3)


def _op_squeeze_unsqueeze(b):
    x = b.conv("input", 4, 3)
    y = b._node("Squeeze", [x, b._const("axis_a", np.array([0], np.int64))], b.shapes[x])
    b.conv(b._node("Unsqueeze", [y, b._const("axis_b", np.array([0], np.int64))], b.shapes[x]), 3, 3)


def _op_pad_axes_reflect(b):  # opset 18
    x = b.conv("input", 4, 3)
    c, h, w = b.shapes[x]
    inputs = [x, b._const("p", np.array([2, 1, 0, 3], np.int64)), b._const("v", np.array(0, np.float32)),
              b._const("ax", np.array([2, 3], np.int64))]
    b.conv(b._node("Pad", inputs, (c, h + 2, w + 4), mode="reflect"), 3, 3, 2)


def _op_sum4(b):
    x = b.conv("input", 4, 3, 1, (1, 1, 1, 1))
    b.conv(b.sum_([x, b.conv(x, 4, 1), b.conv(x, 4, 3, 1, (1, 1, 1, 1)), b.conv(x, 4, 5, 1, (2, 2, 2, 2))]), 3, 3)


def _op_sub_two_maps(b):
    x = b.conv("input", 4, 3, 1, (1, 1, 1, 1))
    b.conv(b._node("Sub", [x, b.conv(x, 4, 3, 1, (1, 1, 1, 1))], b.shapes[x]), 3, 3)


def _op_no_bias_same_lower_even_kernel(b):
    b.conv(b.conv("input", 4, 3, 2, auto_pad="SAME_LOWER", bias=False), 3, 4, 1, auto_pad="SAME_UPPER")


def _op_global_average_pool(b):
    b.global_avgpool(b.conv("input", 4, 3, 2))


MORE_OPS = {
    "negative_pad_then_valid": (_op_negative_pad_then_valid, 13),
    "avgpool_dilations": (_op_avgpool_dilations, 19),
    "add_self": (_op_add_self, 13),
    "concat_self": (_op_concat_self, 13),
    "channel_constants": (_op_channel_constants, 13),
    "nhwc_round_trip": (_op_nhwc_round_trip, 13),
    "squeeze_unsqueeze": (_op_squeeze_unsqueeze, 13),
    "pad_axes_reflect": (_op_pad_axes_reflect, 18),
    "sum4": (_op_sum4, 13),
    "sub_two_maps": (_op_sub_two_maps, 13),
    "no_bias_same_lower_even_kernel": (_op_no_bias_same_lower_even_kernel, 13),
    "global_average_pool": (_op_global_average_pool, 13),
}


@pytest.mark.parametrize("name", list(MORE_OPS))
def test_more_linear_ops_identity(name, load):
    build, opset = MORE_OPS[name]
    b = NetBuilder(height=14, width=15, seed=3, opset=opset)
    build(b)
    proto = b.build([b.last])
    model = load(proto)
    images = random_images(model, 2, seed=9)
    decoded = fd.decode(model, b.last, dtype="float64")
    assert_identity(decoded, run_ort(proto, images, [b.last])[b.last], images, rtol=1e-5)


@pytest.mark.parametrize("crop", [(-2, -2, 0, 0), (0, 0, -2, -1)])
def test_crop_then_padded_conv_identity(crop, load):
    """A negative Pad (crop) then a zero-padded conv: the zeros stand where image pixels were cropped.

    Output neurons next to the cropped side have their receptive field inside the image, yet
    onnxruntime computes them from padding zeros, not from the cropped pixels.
    """
    b = NetBuilder(height=12, width=12, seed=3)
    x = _crop(b, b.conv("input", 4, 3), crop)
    b.conv(x, 3, 3, 1, (1, 1, 1, 1))
    proto = b.build([b.last])
    model = load(proto)
    images = random_images(model, 2, seed=5)
    decoded = fd.decode(model, b.last, dtype="float64")
    assert_identity(decoded, run_ort(proto, images, [b.last])[b.last], images, rtol=1e-5)


def test_add_of_maps_with_different_strides_is_not_decodable(load):
    b = NetBuilder(height=24, width=24)
    fine = b.conv("input", 4, 13)  # 12 x 12, stride 1
    coarse = b.conv("input", 4, 1, 2)  # 12 x 12, stride 2
    out = b.conv(b.add(fine, coarse), 3, 3)
    layers = {layer.name: layer for layer in fd.inspect_model(load(b.build([out]))).layers}
    assert layers[fine].decodable and layers[coarse].decodable
    assert not layers[out].decodable and "different strides" in layers[out].reason, layers[out].reason


# ---- decode arguments --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    b = NetBuilder()
    b.conv(b.conv("input", 4, 3), 3, 3)
    return load_proto(b.build([b.last]), tmp_path_factory.mktemp("small")), b.last


def test_decode_unknown_layer_suggests_names(small_model):
    model, last = small_model
    with pytest.raises(fd.FdsubError, match=f"no layer named 'conv_9'.*did you mean.*{last}"):
        fd.decode(model, "conv_9")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dtype": "float16"}, "dtype must be float32 or float64"),
        ({"mode": "deconv"}, "mode 'deconv' is not available"),
        ({"device": "tpu"}, "unknown device 'tpu'"),
        ({"kernel": "fastest"}, "fastest"),
    ],
)
def test_decode_rejects_bad_arguments(small_model, kwargs, message):
    model, last = small_model
    with pytest.raises(fd.FdsubError, match=message):
        fd.decode(model, last, **kwargs)


def test_decode_refuses_banks_larger_than_free_memory(small_model, monkeypatch):
    from fdsub_onnx.compose import backend as _backend

    model, last = small_model
    monkeypatch.setattr(_backend.NumpyBackend, "free_bytes", lambda self: 1024)
    with pytest.raises(fd.FdsubError, match=r"does not fit in the memory budget of 1\.0 KiB "
                                            r"\(bottom-up: needs about .*; adjoint: one seed needs"):
        fd.decode(model, last)
    with pytest.raises(fd.FdsubError, match="does not fit"):
        next(fd.iter_decode(model))


def test_memory_advice_says_whether_fewer_neurons_help(load, monkeypatch):
    """Bottom-up: a wide last layer over a narrow lower one is helped by fewer neurons; a narrow last layer over a
    wide lower one is not (the lower banks dominate, as EfficientNet's blocks.15 showed). The adjoint: its filters
    scale with the neurons asked, and the advice says how many fit."""
    from fdsub_onnx.compose import backend as _backend
    from fdsub_onnx.compose.engine import Engine
    from fdsub_onnx.compose.inspect import MEMORY_MARGIN, bank_peak, memory_problem

    engine = Engine(_backend.NumpyBackend(), "float32")

    def need(model, target, rows):
        return bank_peak(model, engine, [target], rows) * MEMORY_MARGIN

    wide_top = NetBuilder(height=12, width=12)
    last = wide_top.conv(wide_top.conv("input", 2, 3), 64, 3)
    model = load(wide_top.build([last]))
    all_rows, one_row = need(model, last, None), need(model, last, {last: [0]})
    monkeypatch.setattr(_backend.NumpyBackend, "free_bytes", lambda self: int((all_rows + one_row) / 2))
    assert "decode fewer neurons" in memory_problem(model, engine, [last])
    wide_bottom = NetBuilder(height=12, width=12)
    last = wide_bottom.conv(wide_bottom.conv("input", 64, 3), 2, 3)
    model = load(wide_bottom.build([last]))
    one_row = need(model, last, {last: [0]})
    monkeypatch.setattr(_backend.NumpyBackend, "free_bytes", lambda self: int(one_row / 2))
    assert "fewer neurons will not help" in memory_problem(model, engine, [last])
    b = NetBuilder(height=24, width=24)
    last = b.conv(b.conv("input", 2, 3, 1, (1, 1, 1, 1)), 64, 3, 1, (1, 1, 1, 1))
    model = load(b.build([last]))
    monkeypatch.undo()
    one = fd.decode(model, last, neurons=0, position=(0, 0))  # a border position: the adjoint only
    assert one.plan.route == "adjoint" and isinstance(one.plan.estimates["bottom-up"], str)
    filter_bytes = one.filters[0].nbytes
    monkeypatch.setattr(_backend.NumpyBackend, "free_bytes",
                        lambda self: int(MEMORY_MARGIN * (one.plan.peak_bytes + 3.5 * filter_bytes)))
    with pytest.raises(fd.FdsubError, match=r"decode at most 4 neurons at a time"):
        fd.decode(model, last, position=(0, 0))
    assert fd.decode(model, last, neurons="0-3", position=(0, 0)).filters.shape[0] == 4
