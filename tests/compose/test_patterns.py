"""Export patterns (graph.patterns) and the rules that read them: channel gates held at a reference, x * f(x)
products read as x, Split/Slice/Focus, each against onnxruntime (and failing on the old behaviour)."""

from __future__ import annotations

import numpy as np
import pytest
from checks import assert_identity, assert_instance_identity, load_proto, random_images
from netgen import NetBuilder, run_ort
from onnx import helper

import fdsub_onnx as fd
from fdsub_onnx.evaluate.self_test import linearized
from fdsub_onnx.graph.patterns import ChannelGate, SelfGated
from fdsub_onnx.modes.gates import reference_gates


def _mul(b: NetBuilder, x: str, y: str) -> str:
    """x * y, broadcast: the output has the larger shape (a gate [C, 1, 1] times a map is a map)."""
    return b._node("Mul", [x, y], max(b.shapes[x], b.shapes[y], key=lambda s: s[1] * s[2]))


def _unary(b: NetBuilder, op: str, x: str, **attrs) -> str:
    return b._node(op, [x], b.shapes[x], **attrs)


def _with_const(b: NetBuilder, op: str, x: str, value: float) -> str:
    return b._node(op, [x, b._const(b._fresh("k"), np.array(value, np.float32))], b.shapes[x])


def _se_net(seed: int = 6, gate_op: str = "Sigmoid"):
    """conv -> relu -> SE (GAP, 1x1 convs, sigmoid) gate over the map -> conv."""
    b = NetBuilder(height=10, width=10, seed=seed)
    x = b.relu(b.conv("input", 4, 3))
    gate = _unary(b, gate_op, b.conv(b.relu(b.conv(b.global_avgpool(x), 2, 1)), 4, 1))
    y = _mul(b, gate, x)
    last = b.conv(y, 3, 3)
    return b, x, gate, y, last


def test_channel_gate_is_held_at_its_reference_value_in_weights_mode(tmp_path):
    """An SE gate: decodable in weights mode, held at onnxruntime's gate on the all-zeros input, recorded in
    decoded.npz; the result equals the network with the gate replaced by that constant."""
    b, x, gate, y, last = _se_net()
    proto = b.build([last])
    model = load_proto(proto, tmp_path)
    assert model.patterns[y] == ChannelGate(x=x, gate=gate)
    assert all(layer.decodable for layer in fd.inspect_model(model).layers)
    decoded = fd.decode(model, last, dtype="float64")
    want = run_ort(proto, np.zeros((1, 3, 10, 10), np.float32), [gate])[gate].reshape(-1)
    np.testing.assert_allclose(decoded.gates[y], want, rtol=1e-6)
    held = proto.__class__()
    held.CopyFrom(proto)
    for node in held.graph.node:
        if node.output[0] == y:  # the same network with the gate as a constant
            const = helper.make_tensor("held", 1, [1, 4, 1, 1], want.astype(np.float32).tolist())
            held.graph.initializer.append(const)
            node.input[0] = "held"
    images = random_images(model, 4)
    assert_identity(decoded, run_ort(linearized(held), images, [last])[last], images, rtol=1e-5)
    fd.save_decoded(decoded, tmp_path / "out")
    saved = np.load(tmp_path / "out" / "decoded.npz")
    assert "gates" in saved.files and y in str(saved["gates"])


def test_gate_reference_images_hold_the_mean_gate(tmp_path):
    b, x, gate, y, last = _se_net(seed=7)
    proto = b.build([last])
    model = load_proto(proto, tmp_path)
    images = random_images(model, 5, seed=3)
    held = reference_gates(model, [last], fd.ArrayImages(images))
    np.testing.assert_allclose(held[y], run_ort(proto, images, [gate])[gate].mean(axis=(0, 2, 3)), rtol=1e-5)
    decoded = fd.decode(model, last, dtype="float64", gate_reference=fd.ArrayImages(images))
    np.testing.assert_allclose(decoded.gates[y], held[y])


@pytest.mark.parametrize("mode", ["local", "deconvnet", "fds"])
def test_every_data_mode_passes_through_a_channel_gate(mode, tmp_path):
    b, x, gate, y, last = _se_net(seed=8, gate_op="HardSigmoid")
    model = load_proto(b.build([last]), tmp_path)
    images = fd.ArrayImages(random_images(model, 6, seed=1))
    decoded = fd.decode(model, last, mode=mode, images=images, top=3, neurons="0,1")
    assert decoded.filters.shape[:2] == (2, 3) and np.isfinite(decoded.filters).all()
    assert fd.layer_geometry(model, last).rf == decoded.receptive_field


def _gelu(b, x):
    half = _with_const(b, "Mul", x, 0.5)
    erf = _unary(b, "Erf", _with_const(b, "Div", x, float(np.sqrt(2))))
    return _mul(b, half, _with_const(b, "Add", erf, 1.0))


def _gelu_tanh_cubed(b, x):
    """GELU's tanh form as timm's GELUTanh exports it: x * 0.5 * (1 + tanh(k (x + 0.044715 x x x)))."""
    cube = _mul(b, _mul(b, x, x), x)
    inner = _with_const(b, "Mul", b._node("Add", [x, _with_const(b, "Mul", cube, 0.044715)], b.shapes[x]),
                        float(np.sqrt(2 / np.pi)))
    return _mul(b, _with_const(b, "Mul", x, 0.5), _with_const(b, "Add", b.tanh(inner), 1.0))


SELF_GATED = {
    "silu": lambda b, x: _mul(b, x, b.sigmoid(x)),
    "hardswish_hardsigmoid": lambda b, x: _mul(b, _unary(b, "HardSigmoid", x, alpha=1 / 6, beta=0.5), x),
    "hardswish_clip": lambda b, x: _with_const(b, "Div", _mul(b, x, b.clip(_with_const(b, "Add", x, 3.0), 0, 6)), 6.0),
    "mish": lambda b, x: _mul(b, x, b.tanh(_unary(b, "Softplus", x))),
    "gelu_erf": _gelu,
    "gelu_tanh_cubed": _gelu_tanh_cubed,
}


def _gated_net(kind: str | None, seed: int = 5):
    b = NetBuilder(seed=seed)
    x = b.conv("input", 6, 3, 1, (1, 1, 1, 1))
    y = SELF_GATED[kind](b, x) if kind else x
    return b, x, b.conv(y, 4, 3, 2)


@pytest.mark.parametrize("kind", sorted(SELF_GATED))
def test_self_gated_product_decodes_like_its_activation_free_copy(kind, tmp_path):
    """weights mode reads x * f(x) as x: the same filters as the network without the activation (exactly)."""
    b, x, last = _gated_net(kind)
    (tmp_path / "gated").mkdir()
    (tmp_path / "plain").mkdir()
    model = load_proto(b.build([last]), tmp_path / "gated")
    assert any(isinstance(p, SelfGated) and p.x == x for p in model.patterns.values())
    plain_b, _, plain_last = _gated_net(None)
    got = fd.decode(model, last, dtype="float64")
    want = fd.decode(load_proto(plain_b.build([plain_last]), tmp_path / "plain"), plain_last, dtype="float64")
    np.testing.assert_array_equal(got.filters, want.filters)
    np.testing.assert_array_equal(got.bias, want.bias)


@pytest.mark.parametrize("kind", sorted(SELF_GATED))
def test_self_gated_product_in_local_mode_is_exact_per_instance(kind, tmp_path):
    """local mode follows the product and chain rules: activation = <instance filter, patch> + instance bias."""
    b, x, last = _gated_net(kind, seed=9)
    proto = b.build([last])
    model = load_proto(proto, tmp_path)
    images = random_images(model, 4, seed=2)
    decoded = fd.decode(model, last, mode="local", images=fd.ArrayImages(images), top=3, per_instance=True,
                        dtype="float64")
    assert_instance_identity(decoded, run_ort(proto, images, [last])[last], images, rtol=1e-4)


def test_linearized_copy_reads_self_gated_products_and_held_gates_as_decoded(tmp_path):
    """The check identity runs on a linearized copy with the same readings (GELU as x, the gate held)."""
    b = NetBuilder(height=10, width=10, seed=4)
    x = b.conv("input", 4, 3)
    g = _gelu(b, x)
    gate = b.sigmoid(b.conv(b.global_avgpool(g), 4, 1))
    y = _mul(b, g, gate)
    last = b.conv(y, 3, 3)
    model = load_proto(b.build([last]), tmp_path)
    gates = reference_gates(model, [last])
    linear = linearized(model.proto, model.patterns, gates)
    decoded = fd.decode(model, last, dtype="float64")
    images = random_images(model, 3)
    assert_identity(decoded, run_ort(linear, images, [last])[last], images, rtol=1e-6)


# ---- Split, Slice, Focus ----------------------------------------------------------------------------------
def _focus(b: NetBuilder, x: str) -> str:
    """YOLO's Focus: the four x[..., a::2, b::2] pieces stacked on channels."""
    c, h, w = b.shapes[x]
    pieces = []
    for a0 in (0, 1):
        for b0 in (0, 1):
            starts = b._const(b._fresh("st"), np.array([a0, b0], np.int64))
            ends = b._const(b._fresh("en"), np.array([np.iinfo(np.int64).max] * 2, np.int64))
            axes = b._const(b._fresh("ax"), np.array([2, 3], np.int64))
            steps = b._const(b._fresh("sp"), np.array([2, 2], np.int64))
            pieces.append(b._node("Slice", [x, starts, ends, axes, steps], (c, (h - a0 + 1) // 2, (w - b0 + 1) // 2)))
    return b.concat(pieces)


def _split(b: NetBuilder, x: str, sizes) -> list[str]:
    c, h, w = b.shapes[x]
    split = b._const(b._fresh("split"), np.array(sizes, np.int64))
    names = [b._fresh("part") for _ in sizes]
    b.nodes.append(helper.make_node("Split", [x, split], names, name=b._fresh("Split"), axis=1))
    for name, n in zip(names, sizes):
        b.shapes[name] = (n, h, w)
    return names


def _slicing_net(seed: int = 3):
    """Focus on the image, conv, a channel Split in three (every part used), a channel Slice, concat, conv."""
    b = NetBuilder(height=14, width=14, seed=seed)
    x = b.conv(_focus(b, "input"), 8, 3, 1, (1, 1, 1, 1))
    p0, p1, p2 = _split(b, x, [3, 2, 3])
    c, h, w = b.shapes[x]
    sl = b._node("Slice", [x, b._const("s0", np.array([1], np.int64)), b._const("s1", np.array([7], np.int64)),
                           b._const("s2", np.array([1], np.int64)), b._const("s3", np.array([2], np.int64))],
                 (3, h, w))
    y = b.concat([b.conv(p0, 2, 1), p1, b.conv(p2, 3, 3, 1, (1, 1, 1, 1)), sl])
    return b, b.conv(y, 4, 3, 2)


def test_focus_split_and_slice_obey_the_weights_identity(tmp_path):
    b, last = _slicing_net()
    proto = b.build([last])
    model = load_proto(proto, tmp_path)
    assert all(layer.decodable for layer in fd.inspect_model(model).layers)
    decoded = fd.decode(model, last, dtype="float64")
    assert decoded.stride == (4, 4)  # Focus halves the grid, the last conv halves it again
    images = random_images(model, 3)
    assert_identity(decoded, run_ort(proto, images, [last])[last], images, rtol=1e-6)


def test_focus_geometry_matches_the_impulse_probe(tmp_path):
    """Which pixels reach the Focus conv's neuron (0, 0) at position (1, 1): an impulse at every pixel, through
    onnxruntime, against the geometry's window."""
    b = NetBuilder(height=12, width=12, seed=1)
    last = b.conv(_focus(b, "input"), 1, 3)
    proto = b.build([last])
    geom = fd.layer_geometry(load_proto(proto, tmp_path), last)
    assert (geom.stride, geom.rf, geom.origin) == ((2, 2), (6, 6), (0, 0))
    probes = np.zeros((3 * 144, 3, 12, 12), np.float32)
    probes.reshape(3 * 144, -1)[np.arange(3 * 144), np.arange(3 * 144)] = 1.0
    base = run_ort(proto, np.zeros((1, 3, 12, 12), np.float32), [last])[last][0, 0, 1, 1]
    hit = (run_ort(proto, probes, [last])[last][:, 0, 1, 1] != base).reshape(3, 12, 12).any(axis=0)
    ys, xs = np.nonzero(hit)
    y0, x0 = geom.corner((1, 1))
    assert ys.min() >= y0 and ys.max() < y0 + geom.rf[0] and xs.min() >= x0 and xs.max() < x0 + geom.rf[1]
    assert ys.max() - ys.min() + 1 == geom.rf[0] and xs.max() - xs.min() + 1 == geom.rf[1]


def test_split_and_slice_in_local_mode_are_exact_per_instance(tmp_path):
    b, last = _slicing_net(seed=5)
    proto = b.build([last])
    model = load_proto(proto, tmp_path)
    images = random_images(model, 4, seed=4)
    decoded = fd.decode(model, last, mode="local", images=fd.ArrayImages(images), top=2, per_instance=True)
    assert_instance_identity(decoded, run_ort(proto, images, [last])[last], images, rtol=1e-4)


# ---- Gather with constant indices ------------------------------------------------------------------------------
def _gather(b: NetBuilder, x: str, indices, axis: int, shape) -> str:
    return b._node("Gather", [x, b._const(b._fresh("idx"), np.asarray(indices, np.int64))], shape, axis=axis)


def _gathering_net(batch_axis: bool, seed: int = 4):
    """A channel Gather (reordered, one channel twice, one left out) between convs, then the dynamo exporter's
    pooled classifier: GAP -> Reshape to [C] -> Gather on axis 0 with [1, C, 1, 1] indices (a permutation here;
    dynamo's ``as_strided`` writes 0..C-1) -> 1x1 conv; with ``batch_axis`` Reshape to [1, C], Gather on axis 1
    and Reshape back."""
    b = NetBuilder(height=12, width=12, seed=seed)
    x = b.relu(b.conv("input", 6, 3))
    _, h, w = b.shapes[x]
    y = b.conv(_gather(b, x, [4, 0, 0, 5, 2], 1, (5, h, w)), 7, 3, 2)
    order = np.array([3, 0, 6, 1, 5, 2, 4])
    flat = b._node("Reshape", [b.global_avgpool(y), b._const("to_c", np.array([1, 7] if batch_axis else [7]))],
                   (1, 7) if batch_axis else (7,))
    if not batch_axis:
        return b, y, b.conv(_gather(b, flat, order.reshape(1, 7, 1, 1), 0, (7, 1, 1)), 4, 1)
    back = b._node("Reshape", [_gather(b, flat, order, 1, (1, 7)), b._const("to_map", np.array([1, 7, 1, 1]))],
                   (7, 1, 1))
    return b, y, b.conv(back, 4, 1)


@pytest.mark.parametrize("batch_axis", [False, True])
def test_gather_of_channels_obeys_the_weights_and_local_identities(batch_axis, tmp_path):
    """Weights identity on the linearized net; local identity per instance (a Reshape to a tensor without batch
    axis has no backward rule for several images yet, so only through the batched variant)."""
    b, mid, last = _gathering_net(batch_axis)
    proto = b.build([mid, last])
    model = load_proto(proto, tmp_path)
    assert all(layer.decodable for layer in fd.inspect_model(model).layers)
    images = random_images(model, 4, seed=2)
    acts, linear = run_ort(proto, images, [mid, last]), run_ort(linearized(proto), images, [mid, last])
    for name in (mid, last):
        assert_identity(fd.decode(model, name, dtype="float64"), linear[name], images, rtol=1e-6)
    for name in (mid, last) if batch_axis else (mid,):
        local = fd.decode(model, name, mode="local", images=fd.ArrayImages(images), top=2, per_instance=True,
                          dtype="float64")
        assert_instance_identity(local, acts[name], images, rtol=1e-6)


def test_gather_on_a_spatial_axis_is_refused_unless_it_is_the_identity(tmp_path):
    b = NetBuilder(height=10, width=10, seed=1)
    x = b.conv("input", 4, 3)
    _, h, w = b.shapes[x]
    rows = b.conv(_gather(b, x, [0, 2, 4], 2, (4, 3, w)), 2, 1)
    same = b.conv(_gather(b, x, np.arange(w), 3, (4, h, w)), 2, 1)
    layers = {layer.name: layer for layer in fd.inspect_model(load_proto(b.build([rows, same]), tmp_path)).layers}
    assert not layers[rows].decodable and "spatial axis 2" in layers[rows].reason
    assert layers[same].decodable


# ---- quantized models ---------------------------------------------------------------------------------------
def test_qdq_model_decodes_like_its_float_original(tmp_path):
    """onnxruntime's static QDQ quantization of a net: the QDQ pairs around activations cancel, the int8 weights
    fold to float; the filters equal the float model's within the weights' quantization error."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    b = NetBuilder(height=12, width=12, seed=2)
    x = b.relu(b.conv("input", 6, 3, 1, (1, 1, 1, 1)))
    last = b.conv(b.relu(b.conv(x, 8, 3, 2)), 5, 3)
    model = load_proto(b.build([last]), tmp_path)
    images = random_images(model, 8)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": images[i : i + 1]} for i in range(len(images))])

        def get_next(self):
            return next(self.batches, None)

    quantized = str(tmp_path / "qdq.onnx")
    quantize_static(model.path, quantized, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    qmodel = fd.load_model(quantized)
    assert any(n.op_type == "QuantizeLinear" for n in qmodel.nodes)
    assert all(layer.decodable for layer in fd.inspect_model(qmodel).layers)
    want, got = fd.decode(model, last, dtype="float64"), fd.decode(qmodel, last, dtype="float64")
    scale = np.abs(want.filters).max()
    assert np.abs(got.filters - want.filters).max() <= 0.05 * scale
    assert np.abs(got.filters - want.filters).max() > 0  # the quantized weights do differ



@pytest.mark.parametrize("kind", ["hardswish_hardsigmoid", "silu"])
def test_qdq_self_gated_product_is_read_as_its_float_pattern(kind, tmp_path):
    """onnxruntime's QDQ quantization puts Q/DQ pairs between x and f(x) (a MobileNetV3 exported at opset 13: x *
    HardSigmoid(x)): the product is still x * f(x), with the float pattern's slope (not the saturated quantized
    one); weights decodes every layer with the linearized identity exact, local the per-instance identity."""
    from quantize import quantize

    b, x, last = _gated_net(kind, seed=4)
    (tmp_path / "f").mkdir()
    float_model = load_proto(b.build([last]), tmp_path / "f")
    quantize(float_model.path, tmp_path / "qdq.onnx", "qdq")
    model = fd.load_model(str(tmp_path / "qdq.onnx"))
    gated = [p for p in model.patterns.values() if isinstance(p, SelfGated)]
    assert len(gated) == 1 and gated[0].slope == pytest.approx(1.0), model.patterns
    assert all(layer.decodable for layer in fd.inspect_model(model).layers)
    images = random_images(model, 4, seed=5)
    proto = model.proto
    target = [lay.name for lay in fd.inspect_model(model).layers][-1]
    decoded = fd.decode(model, target, dtype="float64")
    assert_identity(decoded, run_ort(linearized(proto, model.patterns), images, [target])[target], images, rtol=1e-5)
    local = fd.decode(model, target, mode="local", images=fd.ArrayImages(images), top=3, per_instance=True,
                      dtype="float64")
    assert_instance_identity(local, run_ort(proto, images, [target])[target], images, rtol=1e-4)

# ---- channels-last blocks (ConvNeXt, TF exports) ------------------------------------------------------------
def _transpose(b: NetBuilder, x: str, perm, shape) -> str:
    return b._node("Transpose", [x], shape, perm=list(perm))


def _convnext_net(seed: int = 2):
    """conv -> NHWC -> LayerNormalization -> MatMul (+bias) -> GELU (erf) -> MatMul -> NCHW -> layer scale ->
    residual add -> conv: one ConvNeXt block."""
    b = NetBuilder(height=12, width=12, seed=seed, opset=17)  # LayerNormalization is opset 17
    rng = np.random.default_rng(seed)
    x = b.conv("input", 6, 3, 1, (1, 1, 1, 1))
    c, h, w = b.shapes[x]
    t = _transpose(b, x, (0, 2, 3, 1), (h, w, c))  # shapes are (C, H, W)-like triples for NetBuilder
    ln = b._node("LayerNormalization", [t, b._const("ln_g", rng.uniform(0.5, 1.5, c).astype(np.float32)),
                                        b._const("ln_b", 0.1 * rng.standard_normal(c).astype(np.float32))],
                 (h, w, c), axis=-1, epsilon=1e-6)
    up = b._node("MatMul", [ln, b._const("w_up", rng.standard_normal((c, 12)).astype(np.float32) / 3)], (h, w, 12))
    up = b._node("Add", [up, b._const("b_up", 0.1 * rng.standard_normal(12).astype(np.float32))], (h, w, 12))
    act = _gelu(b, up)
    down = b._node("MatMul", [act, b._const("w_dn", rng.standard_normal((12, c)).astype(np.float32) / 4)], (h, w, c))
    back = _transpose(b, down, (0, 3, 1, 2), (c, h, w))
    scaled = b._node("Mul", [back, b._const("ls", rng.uniform(0.2, 0.5, (c, 1, 1)).astype(np.float32))], (c, h, w))
    return b, b.conv(b.add(scaled, x), 4, 3)


def test_convnext_block_decodes_and_obeys_its_identities(tmp_path):
    """Layer norm held at the reference input's 1/std in weights mode (the linearized copy holds the same), and
    the local mode exact per instance through LayerNormalization, channels-last MatMuls and GELU."""
    b, last = _convnext_net()
    proto = b.build([last])
    model = load_proto(proto, tmp_path)
    assert all(layer.decodable for layer in fd.inspect_model(model).layers if layer.op == "Conv")
    decoded = fd.decode(model, last, dtype="float64")
    ln = next(n.output[0] for n in model.nodes if n.op_type == "LayerNormalization")
    assert ln in decoded.gates
    linear = linearized(model.proto, model.patterns, decoded.gates)
    images = random_images(model, 3)
    assert_identity(decoded, run_ort(linear, images, [last])[last], images, rtol=1e-6)
    local = fd.decode(model, last, mode="local", images=fd.ArrayImages(images), top=2, per_instance=True,
                      dtype="float64")
    assert_instance_identity(local, run_ort(proto, images, [last])[last], images, rtol=1e-6)


def test_channels_last_matmul_layers_decode_as_maps(tmp_path):
    """ConvNeXt's pointwise MatMul layers [N, H, W, C]: listed decodable with their map's geometry, their neurons the
    channels on the last axis; weights obeys the identity at every interior position and local per instance."""
    from fdsub_onnx.graph.model import as_map

    b, last = _convnext_net(seed=5)
    proto = b.build([last])
    model = load_proto(proto, tmp_path)
    matmuls = [layer for layer in fd.inspect_model(model).layers if layer.op == "MatMul"]
    assert matmuls and all(layer.decodable and not layer.per_position and layer.stride for layer in matmuls)
    images = random_images(model, 3, seed=4)
    for layer in matmuls:
        assert layer.channels == model.shapes[layer.name][3]
        decoded = fd.decode(model, layer.name, dtype="float64")
        linear = linearized(model.proto, model.patterns, decoded.gates)
        assert_identity(decoded, as_map(model, layer.name, run_ort(linear, images, [layer.name])[layer.name]),
                        images, rtol=1e-6)
        local = fd.decode(model, layer.name, mode="local", images=fd.ArrayImages(images), top=2, neurons="0-2",
                          per_instance=True, dtype="float64")
        assert_instance_identity(local, as_map(model, layer.name, run_ort(proto, images, [layer.name])[layer.name]),
                                 images, rtol=1e-6)


def test_nhwc_input_and_channels_last_bias_decode_exactly(tmp_path):
    """A TF-style graph: NHWC image input transposed to NCHW, a bias added on the NHWC view, a map flattened in
    HWC order into Gemm. The input is read as NCHW; every layer decodes and obeys the weights identity."""
    rng = np.random.default_rng(0)
    inits = {"w1": rng.standard_normal((4, 3, 3, 3)), "b1": rng.standard_normal(4), "bias": rng.standard_normal(4),
             "shape": np.array([1, -1]), "w2": rng.standard_normal((4 * 8 * 8, 5)) / 10}
    nodes = [helper.make_node("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["nchw", "w1", "b1"], ["c1"], name="c1", kernel_shape=[3, 3]),
             helper.make_node("Transpose", ["c1"], ["nhwc"], perm=[0, 2, 3, 1]),
             helper.make_node("Add", ["nhwc", "bias"], ["biased"]),
             helper.make_node("Reshape", ["biased", "shape"], ["flat"]),
             helper.make_node("MatMul", ["flat", "w2"], ["fc"], name="fc")]
    graph = helper.make_graph(nodes, "nhwc", [helper.make_tensor_value_info("image", 1, [1, 10, 10, 3])],
                              [helper.make_tensor_value_info("fc", 1, [1, 5])],
                              [onnx_tensor(v.astype(np.int64 if k == "shape" else np.float32), k)
                               for k, v in inits.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model = load_proto(proto, tmp_path)
    assert model.input_shape == (1, 3, 10, 10)
    assert all(layer.decodable for layer in fd.inspect_model(model).layers)
    decoded = fd.decode(model, "fc", dtype="float64")
    images = random_images(model, 3)
    acts = run_ort(proto, images.transpose(0, 2, 3, 1).copy(), ["fc"])["fc"]
    assert_identity(decoded, acts, images, rtol=1e-6)


def onnx_tensor(array, name):
    from onnx import numpy_helper

    return numpy_helper.from_array(array, name)


def test_nf_fidelity_and_report_run_on_a_squeeze_excitation_net(tmp_path):
    """Every command's pipeline passes through a channel gate: Neuron Feature, fidelity of all modes, report."""
    b, x, gate, y, last = _se_net(seed=9)
    model = load_proto(b.build([last]), tmp_path)
    images = fd.ArrayImages(random_images(model, 6, seed=5))
    top = fd.capture_top(model, last, images, top=2, neurons="0,1")
    assert fd.neuron_feature(model, top, images).filters.shape[:2] == (2, 3)
    scores = fd.compare_modes(model, last, images, images, top=2, neurons="0,1").scores
    assert set(scores["decodings"]) == set(fd.FIDELITY_MODES)
    page = fd.report(model, images, tmp_path / "report", layers=last, neurons="0", top=2)
    assert page.exists() and page.stat().st_size > 1000
