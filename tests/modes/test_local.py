"""`local` and `deconvnet` modes: the per-instance identity, the gradient, a hand-checked deconvnet case."""

from __future__ import annotations

import numpy as np
import pytest
from checks import load_proto
from netgen import NetBuilder, run_ort
from typer.testing import CliRunner

import fdsub_onnx as fd
from fdsub_onnx.cli.main import app
from fdsub_onnx.compose.backend import get_backend
from fdsub_onnx.graph.model import ancestors
from fdsub_onnx.modes.backward import ShapedValues, backward, forward_for, instance_gradients, one_hot, pass_sizes
from fdsub_onnx.modes.local import decode_instances


def _residual_net(seed: int):
    """conv+BN+relu, maxpool, a residual block (3x3 relu path + 1x1 projection), strided conv;
    every rule of a ResNet."""
    b = NetBuilder(height=18, width=18, seed=seed)
    x = b.maxpool(b.relu(b.batchnorm(b.conv("input", 4, 3, 1, (1, 1, 1, 1)))), 2, 2)
    y = b.relu(b.add(b.relu(b.conv(x, 5, 3, 1, (1, 1, 1, 1))), b.conv(x, 5, 1)))
    return b, b.conv(y, 3, 3, 2, (1, 1, 1, 1))


def _smooth_net(seed: int):
    """LeakyReLU, sigmoid, tanh, average pooling, concat, flatten and a fully connected layer."""
    b = NetBuilder(height=12, width=12, seed=seed)
    x = b.leaky_relu(b.conv("input", 4, 3))
    x = b.avgpool(x, 2, 2)
    x = b.concat([b.sigmoid(b.conv(x, 3, 3, 1, (1, 1, 1, 1))), b.tanh(b.conv(x, 2, 1))])
    c, h, w = b.shapes[x]
    flat = b._node("Flatten", [x], (c * h * w, 1, 1), axis=1)
    weight = b._const("fc_w", np.random.default_rng(seed).standard_normal((6, c * h * w)).astype(np.float32))
    fc = b._node("Gemm", [flat, weight, b._const("fc_b", np.linspace(-1, 1, 6).astype(np.float32))], (6, 1, 1),
                 transB=1)
    b._node("Reshape", [fc, b._const("as_map", np.array([0, 6, 1, 1], np.int64))], (6, 1, 1))
    return b, fc, b.last


def _padded_patches(images, decoded, positions):
    """Each instance's receptive-field window of its (zero-extended) image."""
    (ry, rx), (sy, sx), (oy, ox) = decoded.receptive_field, decoded.stride, decoded.origin
    padded = np.pad(images, ((0, 0), (0, 0), (ry, ry), (rx, rx)))
    return np.stack([padded[i, :, oy + qy * sy + ry : oy + qy * sy + 2 * ry, ox + qx * sx + rx : ox + qx * sx + 2 * rx]
                     for i, (qy, qx) in positions])


def _inside(decoded, positions, size) -> np.ndarray:
    """[M, R_y, R_x]: 1 where the window of each output position (qy, qx) lies inside the image of ``size``."""
    (ry, rx), (sy, sx), (oy, ox) = decoded.receptive_field, decoded.stride, decoded.origin
    ys = oy + np.asarray(positions)[:, 0, None] * sy + np.arange(ry)
    xs = ox + np.asarray(positions)[:, 1, None] * sx + np.arange(rx)
    return (((ys >= 0) & (ys < size[0]))[:, :, None] & ((xs >= 0) & (xs < size[1]))[:, None, :]).astype(np.float64)


def _pixel_mean(decoded, size) -> np.ndarray:
    """Reference, one neuron at a time: each pixel of the filter is the activation-weighted mean of the instance
    filters over the instances whose window holds that pixel inside the image; 0 where none does."""
    top, out = decoded.instances, np.zeros(decoded.filters.shape)
    for k in range(len(top.neurons)):
        filled = top.image_index[k] >= 0
        w = np.where(filled & (top.values[k] > 0), top.values[k], 0).astype(np.float64)
        w = w if w.sum() > 0 else filled.astype(np.float64)
        mass = (w[:, None, None] * _inside(decoded, top.position[k], size)).sum(0)
        total = (w[:, None, None, None] * decoded.instance_filters[k]).sum(0)
        out[k] = np.divide(total, mass, out=np.zeros_like(total), where=mass > 0)
    return out


def _assert_local_identity(proto, last, images, top, folder):
    """Decode ``last`` in local mode (per instance) and check activation = <instance filter, patch> + instance bias
    against onnxruntime for every top instance; return the decoding."""
    model = load_proto(proto, folder)
    decoded = fd.decode(model, last, mode="local", images=fd.ArrayImages(images), top=top, per_instance=True)
    acts = run_ort(proto, images, [last])[last]
    found = decoded.instances
    for k in range(len(decoded.neurons)):
        pairs = list(zip(found.image_index[k], map(tuple, found.position[k])))
        patches = _padded_patches(images.astype(np.float64), decoded, pairs)
        pred = (decoded.instance_filters[k] * patches).sum(axis=(1, 2, 3)) + decoded.instance_bias[k]
        want = np.array([acts[i, decoded.neurons[k], qy, qx] for i, (qy, qx) in pairs])
        np.testing.assert_allclose(pred, want, rtol=1e-4, atol=1e-4 * np.abs(acts).max())
    return decoded


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_local_identity_holds_for_every_instance(seed, tmp_path):
    """docs/method.md property 2: activation = <instance filter, patch> + instance bias, for every top-N instance."""
    b, last = _residual_net(seed)
    images = np.random.default_rng(seed).standard_normal((12, 3, 18, 18)).astype(np.float32)
    decoded = _assert_local_identity(b.build([last]), last, images, 4, tmp_path)
    # the filter is the activation-weighted mean of the instance filters, per pixel over those inside the image
    np.testing.assert_allclose(decoded.filters, _pixel_mean(decoded, images.shape[2:]), rtol=1e-4, atol=1e-6)


def _corner_images(count: int, size: int, seed: int) -> np.ndarray:
    """Faint noise with strong noise in one corner of each image (the four corners in turn): the strongest
    responses, and so the top instances, lie at the border."""
    rng = np.random.default_rng(seed)
    images = 0.05 * rng.standard_normal((count, 3, size, size))
    for i in range(count):
        rows = slice(0, 4) if i % 4 < 2 else slice(size - 4, size)
        cols = slice(0, 4) if i % 2 == 0 else slice(size - 4, size)
        images[i, :, rows, cols] = 3 * rng.standard_normal((3, 4, 4))
    return images.astype(np.float32)


@pytest.mark.parametrize("rule", ["local", "deconvnet"])
@pytest.mark.parametrize("conv", [{"kernel": 3, "pads": (1, 1, 1, 1)},
                                  {"kernel": 5, "stride": 2, "pads": (2, 1, 2, 3)}], ids=["3x3", "5x5_s2_asym"])
def test_first_layer_local_equals_weights_at_the_border(rule, conv, tmp_path):
    """docs/method.md property 8: on a network whose first layer is linear, its `local` (and `deconvnet`) filter is
    its `weights` filter, whatever the positions of its top instances: the part of a border instance's window in the
    padding does not pull the mean toward 0. The top instances here are mostly at the border (bright corners)."""
    b = NetBuilder(height=14, width=14, seed=5)
    first = b.conv("input", 6, **conv)
    last = b.conv(b.maxpool(b.relu(first), 2, 2), 4, 3)
    model = load_proto(b.build([last]), tmp_path)
    images = _corner_images(24, 14, seed=6)
    local = fd.decode(model, first, mode=rule, images=fd.ArrayImages(images), top=6, per_instance=True)
    weights = fd.decode(model, first, mode="weights", position="interior")
    top = local.instances
    inside = np.stack([_inside(local, p, (14, 14)) for p in top.position])  # [K, N, R_y, R_x]
    border = (inside.min(axis=(2, 3)) == 0) & (top.values > 0)
    assert border.any(axis=1).all(), "every neuron should have a top instance at the border"
    covered = inside.max(axis=1) > 0  # [K, R_y, R_x]: a pixel no instance holds inside the image is 0
    assert covered.mean() > 0.9
    want = np.where(covered[:, None], weights.filters[local.neurons], 0)
    scale = np.abs(weights.filters).max()
    np.testing.assert_allclose(local.filters, want, rtol=1e-5, atol=1e-6 * scale)
    if rule == "local":
        np.testing.assert_allclose(local.bias, weights.bias[local.neurons], rtol=1e-5, atol=1e-6)
    else:
        assert not local.bias.any()


def test_border_pixels_average_over_the_instances_inside_the_image(tmp_path):
    """Two hand-placed instances of one neuron (weights 3 and 1; 5x5 windows): the first's window has its two top
    rows above the image, the second's is inside. Those two rows are the second's filter alone; the other rows
    are the weighted mean of both (what the whole mean would give everywhere, with the padding counted as 0)."""
    import dataclasses

    b = NetBuilder(in_channels=1, height=6, width=6, seed=2)
    last = b.conv(b.relu(b.conv("input", 2, 3, 1, (1, 1, 1, 1))), 1, 3, 1, (1, 1, 1, 1))
    model = load_proto(b.build([last]), tmp_path)
    images = fd.ArrayImages(np.random.default_rng(3).standard_normal((2, 1, 6, 6)).astype(np.float32))
    found = fd.capture_top(model, last, images, top=2, neurons=[0])
    found = dataclasses.replace(found, values=np.array([[3.0, 1.0]], np.float32), image_index=np.array([[0, 1]]),
                                position=np.array([[[0, 2], [3, 2]]]))
    decoded = decode_instances(model, last, images, instances=found, per_instance=True, dtype="float64")
    assert decoded.receptive_field == (5, 5) and decoded.origin == (-2, -2)
    first, second = decoded.instance_filters[0]
    assert not first[:, :2].any() and np.abs(second[:, :2]).max() > 0  # rows above the image: zeros, evidence
    np.testing.assert_allclose(decoded.filters[0, :, :2], second[:, :2], rtol=1e-6)
    np.testing.assert_allclose(decoded.filters[0, :, 2:], (3 * first[:, 2:] + second[:, 2:]) / 4, rtol=1e-6)
    np.testing.assert_allclose(decoded.bias[0], (3 * decoded.instance_bias[0, 0] + decoded.instance_bias[0, 1]) / 4,
                               rtol=1e-6)


# Window geometries of the backward rules: overlapping, padded, ceil_mode, dilated and auto-padded MaxPools, and
# grouped, dilated, strided and asymmetrically padded convolutions (each pair: a MaxPool's, then a Conv's).
GEOMETRIES = {
    "overlapping_padded": ({"kernel": 3, "stride": 2, "pads": (1, 1, 1, 1)}, {"groups": 2}),
    "demo_4x4s2": ({"kernel": 4, "stride": 2, "pads": (1, 1, 1, 1)}, {"dilation": (2, 2), "pads": (2, 2, 2, 2)}),
    "ceil_mode": ({"kernel": 3, "stride": 2, "ceil_mode": 1}, {"stride": 2, "pads": (0, 1, 1, 0)}),
    "dilated": ({"kernel": 2, "stride": 1, "dilation": (2, 2)}, {"auto_pad": "SAME_LOWER"}),
    "auto_pad": ({"kernel": (3, 2), "stride": (2, 1), "auto_pad": "SAME_UPPER"}, {"kernel": (1, 3), "groups": 4}),
}


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_local_identity_over_window_geometries(geometry, tmp_path):
    """The per-instance identity (docs/method.md property 2) through MaxPool and Conv backward rules
    of every geometry."""
    pool, conv = GEOMETRIES[geometry]
    b = NetBuilder(height=17, width=15, seed=3)
    x = b.maxpool(b.relu(b.conv("input", 4, 3, 1, (1, 1, 1, 1))), **pool)
    x = b.maxpool(b.relu(b.conv(x, 8, **{"kernel": 3, **conv})), 2, 1, (0, 0, 1, 1))
    last = b.conv(x, 3, 2)
    images = np.random.default_rng(7).standard_normal((10, 3, 17, 15)).astype(np.float32)
    decoded = _assert_local_identity(b.build([last]), last, images, 5, tmp_path)
    assert all(np.abs(f).max() > 0 for f in decoded.instance_filters)


def test_every_walker_op_has_a_backward_rule():
    from fdsub_onnx.compose.ops import RULES

    refused_in_weights = {"Resize", "Upsample", "ConvTranspose", "DynamicQuantizeLinear", "ConvInteger"}
    walker_ops = {name for name, op in RULES.items() if op.implements("apply")} - refused_in_weights
    missing = {name for name in walker_ops if not RULES[name].implements("backward")}
    assert missing == {name for name in walker_ops if RULES[name].refuses_reading("backward")} == {"QLinearConv"}, (
        "ops decodable in weights mode but not in local/deconvnet mode")


def test_local_filters_are_input_gradients(tmp_path):
    """Finite differences through onnxruntime, on a net with smooth activations, pooling, concat and Gemm."""
    b, fc, last = _smooth_net(3)
    proto = b.build([last])
    model = load_proto(proto, tmp_path)
    images = np.random.default_rng(5).standard_normal((3, 3, 12, 12))
    neurons, positions = np.array([0, 4, 5]), np.zeros((3, 2), np.int64)
    grads, bias = instance_gradients(model, fc, images, neurons, positions)
    base = run_ort(proto, images.astype(np.float32), [last])[last][np.arange(3), neurons, 0, 0]
    np.testing.assert_allclose((grads * images).sum(axis=(1, 2, 3)) + bias, base, rtol=1e-5, atol=1e-5)
    rng, eps = np.random.default_rng(0), 1e-3
    for m in range(3):
        for _ in range(4):
            c, y, x = rng.integers(3), rng.integers(12), rng.integers(12)
            bumped = images.copy()
            bumped[m, c, y, x] += eps
            down = images.copy()
            down[m, c, y, x] -= eps
            both = run_ort(proto, np.concatenate([bumped[m : m + 1], down[m : m + 1]]).astype(np.float32), [last])[last]
            slope = (both[0, neurons[m], 0, 0] - both[1, neurons[m], 0, 0]) / (2 * eps)
            assert abs(slope - grads[m, c, y, x]) <= 2e-3 * max(1.0, abs(grads[m]).max()), (m, c, y, x)


def test_deconvnet_hand_checked_case(tmp_path):
    """1 channel, conv 2x2 -> relu -> conv 2x2: the projection of output (0, 0) is sum relu(w2[i, j]) * w1
    placed at (i, j)."""
    b = NetBuilder(in_channels=1, height=4, width=4, seed=0)
    h = b.relu(b.conv("input", 1, 2))
    out = b.conv(h, 1, 2)
    proto = b.build([out])
    model = load_proto(proto, tmp_path)
    w1 = model.constants[model.producer[model.producer[h].input[0]].input[1]][0, 0].astype(np.float64)
    w2 = model.constants[model.producer[out].input[1]][0, 0].astype(np.float64)
    image = np.random.default_rng(1).standard_normal((1, 1, 4, 4))
    grads, _ = instance_gradients(model, out, image, np.array([0]), np.array([[0, 0]]), rule="deconvnet")
    want = np.zeros((4, 4))
    for i in range(2):
        for j in range(2):
            want[i : i + 2, j : j + 2] += max(w2[i, j], 0) * w1
    np.testing.assert_allclose(grads[0, 0], want, rtol=1e-6, atol=1e-7)
    local, _ = instance_gradients(model, out, image, np.array([0]), np.array([[0, 0]]), rule="local")
    assert not np.allclose(local, grads) or (w2 > 0).all()


def _rectifier(b, x, kind):
    """``x`` through one rectifier: ReLU6 written as Clip(0, 6), LeakyRelu (alpha 0.2) or PRelu (slope 0.3)."""
    if kind == "relu6":
        return b.clip(x, 0.0, 6.0)
    if kind == "leaky":
        return b.leaky_relu(x, 0.2)
    slope = b._const(b._fresh("slope"), np.full((1, 1, 1), 0.3, np.float32))
    return b._node("PRelu", [x, slope], b.shapes[x])


@pytest.mark.parametrize("kind, negative", [("relu6", 0.0), ("leaky", 0.2), ("prelu", 0.3)])
def test_deconvnet_rectifies_at_every_rectifier(tmp_path, kind, negative):
    """Property 7: at Clip(0, 6) (ReLU6), LeakyRelu and PRelu the deconvnet applies the rectifier to the backward
    signal itself: the projection of output (0, 0) is sum f(w2[i, j]) * w1 placed at (i, j), f(g) = g for g > 0
    and ``negative`` * g below; `local` follows the forward slope instead, so they differ where w2 < 0."""
    b = NetBuilder(in_channels=1, height=4, width=4, seed=0)
    h = _rectifier(b, b.conv("input", 1, 2), kind)
    out = b.conv(h, 1, 2)
    model = load_proto(b.build([out]), tmp_path)
    conv1 = next(n for n in model.nodes if n.op_type == "Conv")
    w1 = model.constants[conv1.input[1]][0, 0].astype(np.float64)
    w2 = model.constants[model.producer[out].input[1]][0, 0].astype(np.float64)
    assert (w2 < 0).any() and (w2 > 0).any()  # a negative backward signal reaches the rectifier
    image = np.random.default_rng(1).standard_normal((1, 1, 4, 4))
    grads, _ = instance_gradients(model, out, image, np.array([0]), np.array([[0, 0]]), rule="deconvnet")
    want = np.zeros((4, 4))
    for i in range(2):
        for j in range(2):
            want[i : i + 2, j : j + 2] += (w2[i, j] if w2[i, j] > 0 else negative * w2[i, j]) * w1
    np.testing.assert_allclose(grads[0, 0], want, rtol=1e-6, atol=1e-7)
    local, _ = instance_gradients(model, out, image, np.array([0]), np.array([[0, 0]]), rule="local")
    pre = run_ort(b.build([conv1.output[0]]), image, [conv1.output[0]])[conv1.output[0]][0, 0]
    forward = np.where((pre > 0) & ((pre <= 6) if kind == "relu6" else True), 1.0, negative)  # local's slopes
    local_want = np.zeros((4, 4))
    for i in range(2):
        for j in range(2):
            local_want[i : i + 2, j : j + 2] += w2[i, j] * forward[i, j] * w1
    np.testing.assert_allclose(local[0, 0], local_want, rtol=1e-6, atol=1e-7)
    assert np.abs(local - grads).max() > 1e-3 * np.abs(want).max()  # they differ


def test_clip_that_is_no_rectifier_keeps_its_slope_in_deconvnet(tmp_path):
    """Clip(-1, 1) (a hard tanh) does not rectify: deconvnet follows its forward slope, as local does."""
    b = NetBuilder(in_channels=1, height=4, width=4, seed=0)
    out = b.conv(b.clip(b.conv("input", 1, 2), -1.0, 1.0), 1, 2)
    model = load_proto(b.build([out]), tmp_path)
    image = np.random.default_rng(1).standard_normal((1, 1, 4, 4))
    args = (model, out, image, np.array([0]), np.array([[0, 0]]))
    np.testing.assert_array_equal(instance_gradients(*args, rule="deconvnet")[0], instance_gradients(*args)[0])


def test_unsupported_op_in_local_mode_is_one_line(tmp_path, monkeypatch):
    """Every op the walker supports has a backward rule; one without (LRN's removed here) stops with one line."""
    from fdsub_onnx.compose.ops import RULES, OpRule

    monkeypatch.setattr(type(RULES["LRN"]), "backward", OpRule.backward)
    b = NetBuilder(height=10, width=10)
    last = b.conv(b.lrn(b.conv("input", 4, 3)), 3, 3)
    model = load_proto(b.build([last]), tmp_path)
    images = fd.ArrayImages(np.random.default_rng(0).standard_normal((4, 3, 10, 10)))
    with pytest.raises(fd.FdsubError, match="local mode does not support op LRN"):
        fd.decode(model, last, mode="local", images=images, top=2)
    with pytest.raises(fd.FdsubError, match="needs images"):
        fd.decode(model, last, mode="deconvnet")


@pytest.mark.parametrize("mode", ["local", "deconvnet"])
def test_cli_local_and_deconvnet(mode, tmp_path):
    b, last = _residual_net(4)
    model = load_proto(b.build([last]), tmp_path)
    np.save(tmp_path / "images.npy", np.random.default_rng(0).standard_normal((10, 3, 18, 18)).astype(np.float32))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["decode", model.path, "--layer", last, "--mode", mode, "--images",
                                      str(tmp_path / "images.npy"), "--top", "3", "--neurons", "1,2", "--per-instance",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    decoded, top = np.load(out / "decoded.npz"), np.load(out / "top.npz")
    assert str(decoded["mode"]) == mode and decoded["filters"].shape[0] == 2
    assert decoded["instance_filters"].shape == (2, 3, *decoded["filters"].shape[1:])
    assert decoded["instance_bias"].shape == (2, 3) and top["neurons"].tolist() == [1, 2]
    if mode == "deconvnet":
        assert not decoded["bias"].any()


SLOPE_OPS = [
    ("HardSwish", {}), ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}), ("Elu", {"alpha": 0.7}), ("Softplus", {}),
    ("PRelu", None), ("Clip", None), ("Selu", {}), ("Celu", {"alpha": 0.8}), ("Gelu", {}),
    ("Gelu", {"approximate": "tanh"}), ("Mish", {}),
    ("LRN", {"size": 3, "alpha": 0.9, "beta": 0.75, "bias": 1.0}),
    ("LRN", {"size": 5, "alpha": 2.0, "beta": 0.6, "bias": 0.5}),
]


def _activation_net(op, attrs):
    """conv -> ``op`` -> conv on a 9x9 image (``"Erf"``: GELU's exact form written out, as torch exports it)."""
    b = NetBuilder(height=9, width=9, seed=11, opset=20 if op == "Gelu" else 18)
    x = b.conv("input", 4, 3)
    if op == "PRelu":
        y = b._node(op, [x, b._const("slope", np.array([0.1, 0.2, -0.3, 0.5], np.float32).reshape(4, 1, 1))],
                    b.shapes[x])
    elif op == "Clip":
        y = b.clip(x, -0.2, 0.3)
    elif op == "Erf":
        erf = b._node("Erf", [b._node("Div", [x, b._const("root2", np.float32(np.sqrt(2)))], b.shapes[x])],
                      b.shapes[x])
        y = b._node("Mul", [x, b._node("Add", [erf, b._const("one", np.float32(1))], b.shapes[x])], b.shapes[x])
    else:
        y = b._node(op, [x], b.shapes[x], **attrs)
    last = b.conv(y, 2, 3)
    return b.build([last]), last


@pytest.mark.parametrize("op, attrs", SLOPE_OPS)
def test_local_slope_rules_linearize_exactly_at_the_instance(op, attrs, tmp_path):
    """Smooth or piecewise activations: identity at the instance, and the slope against finite differences."""
    proto, last = _activation_net(op, attrs)
    model = load_proto(proto, tmp_path)
    images = np.random.default_rng(3).standard_normal((4, 3, 9, 9))
    neurons, positions = np.array([0, 1, 0, 1]), np.array([[0, 0], [1, 2], [2, 1], [4, 4]])
    grads, bias = instance_gradients(model, last, images, neurons, positions)
    acts = run_ort(proto, images.astype(np.float32), [last])[last]
    want = acts[np.arange(4), neurons, positions[:, 0], positions[:, 1]]
    np.testing.assert_allclose((grads * images).sum(axis=(1, 2, 3)) + bias, want, rtol=1e-5, atol=1e-5)
    m, eps = 1, 1e-4
    c, yy, xx = np.unravel_index(np.argmax(np.abs(grads[m])), grads[m].shape)
    pair = np.repeat(images[m : m + 1], 2, axis=0)
    pair[0, c, yy, xx] += eps
    pair[1, c, yy, xx] -= eps
    both = run_ort(proto, pair, [last])[last][:, neurons[m], positions[m, 0], positions[m, 1]].astype(np.float64)
    assert abs((both[0] - both[1]) / (2 * eps) - grads[m, c, yy, xx]) <= 2e-2 * abs(grads[m, c, yy, xx]) + 1e-3


@pytest.mark.parametrize("op, attrs", [*SLOPE_OPS, ("Erf", {})])
def test_a_float32_pass_stays_float32_through_every_rule(op, attrs, tmp_path):
    """A rule that mixes a NumPy float64 scalar into its slope (``2 / np.sqrt(np.pi)``) turns a float32 pass into
    float64 from there on: twice the time in every product after it (ViT-S's local pass: 0.92 s -> 0.46 s)."""
    proto, last = _activation_net(op, attrs)
    model = load_proto(proto, tmp_path)
    images = np.random.default_rng(3).standard_normal((2, 3, 9, 9)).astype(np.float32)
    values = ShapedValues({name: v.astype(np.float32) for name, v in forward_for(model, last)(images).items()}, model)
    seed = one_hot(get_backend("numpy"), values[last].shape, [0, 1], [[1, 1], [2, 2]], np.float32)
    leaks = []

    def rule(op_rule, node, ins, is_data, out, grad):
        grads, added = op_rule.backward(node, ins, is_data, out, grad)
        leaks.extend(node.op_type for g in grads if g is not None and g.dtype != np.float32)
        return grads, added

    grads, _ = backward(model, ancestors(model, [last]), values, {last: seed}, "backward", "local", run=rule)
    assert not leaks and grads[model.input_name].dtype == np.float32
    assert instance_gradients(model, last, images, [0, 1], [[1, 1], [2, 2]], dtype="float32")[0].dtype == np.float32


@pytest.mark.parametrize("gate", ["squeeze_excitation", "silu"])
def test_local_products_of_feature_maps(gate, tmp_path):
    """SE gates are held at their value (identity exact, gate path not differentiated); SiLU takes the product rule
    (identity exact and the filter is the true gradient)."""
    b = NetBuilder(height=10, width=10, seed=13)
    x = b.conv("input", 4, 3)
    if gate == "silu":
        g = b.sigmoid(x)
    else:
        g = b.sigmoid(b.conv(b.global_avgpool(x), 4, 1))
    y = b._node("Mul", [x, g], b.shapes[x])
    last = b.conv(y, 2, 3)
    proto = b.build([last])
    model = load_proto(proto, tmp_path)
    images = np.random.default_rng(4).standard_normal((3, 3, 10, 10))
    neurons, positions = np.array([0, 1, 1]), np.array([[0, 0], [2, 3], [5, 5]])
    grads, bias = instance_gradients(model, last, images, neurons, positions)
    acts = run_ort(proto, images.astype(np.float32), [last])[last]
    want = acts[np.arange(3), neurons, positions[:, 0], positions[:, 1]]
    np.testing.assert_allclose((grads * images).sum(axis=(1, 2, 3)) + bias, want, rtol=1e-5, atol=1e-5)
    c, yy, xx = np.unravel_index(np.argmax(np.abs(grads[0])), grads[0].shape)
    pair = np.repeat(images[:1], 2, axis=0)
    pair[0, c, yy, xx] += 1e-4
    pair[1, c, yy, xx] -= 1e-4
    both = run_ort(proto, pair, [last])[last][:, 0, 0, 0].astype(np.float64)
    slope = (both[0] - both[1]) / 2e-4
    if gate == "silu":
        assert abs(slope - grads[0, c, yy, xx]) <= 2e-2 * abs(grads[0, c, yy, xx]) + 1e-3
    else:  # the gate's own dependence on the image is left out, so the filter differs from the gradient
        assert abs(slope - grads[0, c, yy, xx]) > 1e-4


class _Memory:
    """A backend stand-in with a given amount of free memory."""

    def __init__(self, free: int):
        self.free = free

    def free_bytes(self) -> int:
        return self.free


def test_instance_batches_shrink_to_the_memory_left(tmp_path):
    b, last = _residual_net(0)
    model = load_proto(b.build([last]), tmp_path)
    frees = [0] + [1 << bits for bits in range(16, 24)] + [1 << 40]
    sizes = [pass_sizes(model, last, 16, _Memory(free), 8)[0] for free in frees]
    assert sizes[0] == 1 and sizes[-1] == 16 and any(1 < n < 16 for n in sizes) and sizes == sorted(sizes), sizes
    # the passes that run at once share the room
    assert [pass_sizes(model, last, 16, _Memory(free), 8, workers=2)[0] for free in frees] < sizes
    # batching changes no result
    images = fd.ArrayImages(np.random.default_rng(4).standard_normal((9, 3, 18, 18)).astype(np.float32))
    one, many = (decode_instances(model, last, images, top=3, batch_size=size, per_instance=True) for size in (1, 16))
    np.testing.assert_array_equal(one.instance_filters, many.instance_filters)
    np.testing.assert_array_equal(one.instance_bias, many.instance_bias)


@pytest.mark.parametrize("mode", ["local", "deconvnet"])
def test_iter_decode_honours_neurons_and_dtype_in_instance_modes(mode, tmp_path):
    """iter_decode in local/deconvnet mode returns the neurons asked per layer, in the dtype asked, equal to decode."""
    b, last = _residual_net(2)
    model = load_proto(b.build(), tmp_path)
    images = fd.ArrayImages(np.random.default_rng(3).standard_normal((6, *b.shapes["input"])).astype(np.float32))
    first = fd.inspect_model(model).layers[0].name
    picks = {first: [1, 3], last: "2"}
    got = {d.layer: d for d in fd.iter_decode(model, [first, last], mode=mode, images=images, top=3, dtype="float64",
                                             neurons=picks)}
    assert got[first].neurons.tolist() == [1, 3] and got[last].neurons.tolist() == [2]
    for name, neurons in picks.items():
        assert got[name].filters.dtype == np.float64
        alone = fd.decode(model, name, mode=mode, images=images, top=3, dtype="float64", neurons=neurons)
        np.testing.assert_array_equal(got[name].filters, alone.filters)
    with pytest.raises(fd.FdsubError, match="kernel"):
        next(fd.iter_decode(model, [last], mode=mode, images=images, kernel="nope"))


def _cone_nets() -> dict:
    """The ReLU zoo, the window geometries above, and average pools dividing at the border after a Pad."""
    from netgen import relu_zoo

    nets = dict(relu_zoo())
    for name, (pool, conv) in GEOMETRIES.items():
        b = NetBuilder(height=17, width=15, seed=3)
        x = b.maxpool(b.relu(b.conv("input", 4, 3, 1, (1, 1, 1, 1))), **pool)
        nets[name] = b.build([b.conv(b.relu(b.conv(x, 8, **{"kernel": 3, **conv})), 3, 2)])
    b = NetBuilder(height=14, width=13, seed=5)
    x = b.avgpool(b.pad(b.relu(b.conv("input", 4, 3)), (1, 2, 0, 1)), 3, 2, (1, 1, 1, 1), count_include_pad=0)
    x = b.avgpool(b.relu(b.conv(x, 4, 3, 1, (1, 1, 1, 1))), 2, 1, (1, 0, 0, 1), count_include_pad=1)
    nets["avgpool_borders"] = b.build([b.conv(x, 3, 2)])
    return nets


CONE_NETS = sorted(_cone_nets())


@pytest.mark.parametrize("case", CONE_NETS)
@pytest.mark.parametrize("rule", ["local", "deconvnet"])
def test_cone_passes_equal_whole_map_passes(case, rule, tmp_path, monkeypatch):
    """Restricted to each instance's receptive-field cone (paddings, ceil_mode and dilated pools, average pools
    dividing at the border, LRN...), the passes give the whole-map instance filters and biases."""
    from fdsub_onnx.modes import cone as _cone
    from fdsub_onnx.modes import local as _local

    proto = _cone_nets()[case]
    model = load_proto(proto, tmp_path)
    layers = [layer.name for layer in fd.inspect_model(model).layers if layer.op in ("Conv", "MaxPool")]
    images = fd.ArrayImages(np.random.default_rng(4).standard_normal((10, *model.input_shape[1:])).astype("float32"))
    checked = 0
    for name in layers:
        found = _cone.cones(model, fd.graph.model.ancestors(model, [name]), name)
        if found is None:
            continue
        cut = decode_instances(model, name, images, top=4, rule=rule, per_instance=True, dtype="float64")
        with monkeypatch.context() as patch:
            patch.setattr(_local, "cones", lambda *args: None)
            whole = decode_instances(model, name, images, top=4, rule=rule, per_instance=True, dtype="float64")
        scale = np.abs(whole.instance_filters).max()
        assert scale > 0
        np.testing.assert_allclose(cut.instance_filters, whole.instance_filters, rtol=1e-9, atol=1e-12 * scale)
        np.testing.assert_allclose(cut.instance_bias, whole.instance_bias, rtol=1e-9, atol=1e-12)
        checked += 1
    assert checked, f"{case}: no layer has a cone form"


def test_a_field_wider_than_the_image_takes_whole_maps(tmp_path, monkeypatch):
    """Cones of a field much wider than the image are mostly padding (EfficientNet-Lite2's conv_head at 260 px: 465
    M values per instance against 34 M in its maps, 24 s and 4.7 GiB for 8 instances): such a layer's passes take
    whole maps, a shallow layer's keep their cones, and the filters are those of the cone passes."""
    from fdsub_onnx.compose.inspect import layer_geometry
    from fdsub_onnx.modes import local as _local
    from fdsub_onnx.modes.cone import cones

    b = NetBuilder(height=10, width=9, seed=11)
    x = "input"
    for _ in range(7):
        x = b.relu(b.conv(x, 4, 3, 1, (1, 1, 1, 1)))
    model = load_proto(b.build([b.conv(x, 3, 3, 1, (1, 1, 1, 1))]), tmp_path)
    first, last = model.nodes[0].output[0], model.nodes[-1].output[0]
    assert _local.instance_cone(model, first, layer_geometry(model, first)) is not None
    geom = layer_geometry(model, last)
    assert geom.rf == (17, 17) and _local.instance_cone(model, last, geom) is None
    assert _local.largest_cut(model, last, geom, None) == 3 * 17 * 17  # the filter, larger than any map
    images = fd.ArrayImages(np.random.default_rng(5).standard_normal((6, *model.input_shape[1:])).astype("float32"))
    whole = decode_instances(model, last, images, top=4, per_instance=True, dtype="float64")
    monkeypatch.setattr(_local, "instance_cone", lambda model, target, geom: cones(
        model, fd.graph.model.ancestors(model, [target]), target))
    cut = decode_instances(model, last, images, top=4, per_instance=True, dtype="float64")
    scale = np.abs(whole.instance_filters).max()
    assert scale > 0
    np.testing.assert_allclose(cut.instance_filters, whole.instance_filters, rtol=1e-9, atol=1e-12 * scale)
    np.testing.assert_allclose(cut.filters, whole.filters, rtol=1e-9, atol=1e-12 * scale)


@pytest.mark.parametrize("mode", ["local", "deconvnet", "nf"])
def test_filters_keep_the_part_of_a_wide_field_that_meets_the_image(tmp_path, monkeypatch, mode):
    """A field wider than the image allows (31 px, one position, 12-px image): `local`, `deconvnet` and the
    Neuron Feature keep the 12 x 12 px that meet the image (``field_part``, as ``weights`` does), with the same
    values there as the whole field, which is 0 elsewhere, and the same predictions."""
    from fdsub_onnx.evaluate.predict import predict
    from fdsub_onnx.modes import local as _local
    from fdsub_onnx.modes import nf as _nf

    b = NetBuilder(height=12, width=12, seed=17)
    x = "input"
    for _ in range(4):
        x = b.relu(b.conv(x, 4, 3, 2, (1, 1, 1, 1)))
    model = load_proto(b.build([b.conv(x, 3, 1)]), tmp_path)
    last = model.nodes[-1].output[0]
    images = fd.ArrayImages(np.random.default_rng(6).standard_normal((7, 3, 12, 12)).astype("float32"))

    def decoded():
        if mode == "nf":
            return fd.neuron_feature(model, fd.capture_top(model, last, images, top=3), images)
        return fd.decode(model, last, mode=mode, images=images, top=3, dtype="float64")

    kept = decoded()
    whole_field = lambda geom, image_size, out_size: ((0, 0), tuple(geom.rf))  # noqa: E731
    monkeypatch.setattr(_local, "field_part", whole_field)
    monkeypatch.setattr(_nf, "field_part", whole_field)
    whole = decoded()
    assert whole.filters.shape[2:] == (31, 31) and kept.filters.shape[2:] == (12, 12)
    assert kept.crop == (15, 15) and kept.field == (31, 31) and kept.geometry == whole.geometry
    np.testing.assert_array_equal(kept.filters, whole.filters[:, :, 15:27, 15:27])
    outside = whole.filters.copy()
    outside[:, :, 15:27, 15:27] = 0
    assert not outside.any() and np.abs(kept.filters).max() > 0
    batch = next(images.batches(7))[1]
    np.testing.assert_allclose(predict(kept, batch, (1, 1)), predict(whole, batch, (1, 1)), rtol=1e-12, atol=1e-12)


def test_passes_on_two_workers_give_the_one_worker_filters(tmp_path, monkeypatch):
    """Passes run on every core (``ordered_map``) and add up in image order: the filters, biases and instance
    filters are those of one pass after the other, from any number of workers."""
    from fdsub_onnx.compose.backend import NumpyBackend

    b, last = _residual_net(7)
    model = load_proto(b.build([last]), tmp_path)
    images = fd.ArrayImages(np.random.default_rng(8).standard_normal((12, *model.input_shape[1:])).astype("float32"))
    got = {}
    for workers in (1, 2, 3):
        monkeypatch.setattr(NumpyBackend, "workers", workers)
        got[workers] = decode_instances(model, last, images, top=6, per_instance=True, batch_size=2, dtype="float64")
    for workers in (2, 3):
        np.testing.assert_allclose(got[workers].filters, got[1].filters, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(got[workers].bias, got[1].bias, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(got[workers].instance_filters, got[1].instance_filters, rtol=1e-12, atol=1e-15)
