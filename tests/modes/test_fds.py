"""`fds` mode: the statistics against a brute-force computation, the select rules, the reduction to `weights`."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from checks import load_proto, random_images
from netgen import NetBuilder, linear_zoo, run_ort
from onnx import numpy_helper
from typer.testing import CliRunner

import fdsub_onnx as fd
from fdsub_onnx.cli.main import app
from fdsub_onnx.modes.fds import Substitution, gather_statistics, select_contributions


@pytest.fixture
def net(tmp_path):
    """conv(pad 1) -> relu -> maxpool 2/2 -> conv(pad 1, stride 2) -> relu -> conv -> flatten -> gemm."""
    b = NetBuilder(height=16, width=16, seed=2)
    c1 = b.conv("input", 4, 3, 1, (1, 1, 1, 1))
    p1 = b.maxpool(b.relu(c1), 2, 2)
    c2 = b.conv(p1, 6, 3, 2, (1, 1, 1, 1))
    c3 = b.conv(b.relu(c2), 5, 3)
    proto = b.build([c3])
    model = load_proto(proto, tmp_path)
    images = np.random.default_rng(4).standard_normal((30, 3, 16, 16)).astype(np.float32)
    return model, proto, images, {"c1": c1, "p1": p1, "c2": c2, "c3": c3}


def _instance_weights(top, k):
    weights = np.where((top.image_index[k] >= 0) & (top.values[k] > 0), top.values[k], 0.0)
    return weights if weights.sum() > 0 else (top.image_index[k] >= 0).astype(float)


def _brute_window_mean(acts_in, top, k, kernel, stride, pad, gates=False):
    """Activation-weighted mean of the input windows of neuron k's instances (plain loops): activations with zeros
    in the padding, or gates averaged per offset over the instances whose window holds a unit there (else 1)."""
    padded = np.pad(acts_in, ((0, 0), (0, 0), (pad, pad + kernel), (pad, pad + kernel)),
                    constant_values=np.nan if gates else 0.0)
    num = den = 0
    for w, n, (r, c) in zip(_instance_weights(top, k), top.image_index[k], top.position[k]):
        if n >= 0:
            window = padded[n, :, r * stride : r * stride + kernel, c * stride : c * stride + kernel]
            num, den = num + w * np.nan_to_num(window), den + w * np.isfinite(window)
    return np.where(den > 0, num / np.where(den > 0, den, 1), 1.0)


def test_activation_statistics_equal_brute_force(net):
    """--weighting activation: the mean input activation, never of the pixels (the first layer has none)."""
    model, proto, images, names = net
    sub = gather_statistics(model, names["c3"], fd.ArrayImages(images), top=7, batch_size=8, weighting="activation")
    assert set(sub.stats) == {names["p1"], names["c2"], names["c3"]} and sub.weighting == "activation"
    ort = run_ort(proto, images, [names["p1"], names["c2"]])
    relu_c2 = np.maximum(ort[names["c2"]], 0)
    for layer, source, kernel, stride, pad in ((names["c2"], ort[names["p1"]], 3, 2, 1),
                                              (names["c3"], relu_c2, 3, 1, 0)):
        top = sub.tops[layer]
        assert (top.image_index >= 0).all()
        for k in range(top.values.shape[0]):
            want = _brute_window_mean(source, top, k, kernel, stride, pad)
            np.testing.assert_allclose(sub.stats[layer][k], want, rtol=1e-5, atol=1e-6, err_msg=f"{layer} neuron {k}")


def test_gate_statistics_equal_brute_force(tmp_path):
    """The mean gate of each lower unit: ReLU 1/0 at the MaxPool switch, LeakyReLU 1/alpha, ReLU6-like Clip 1 inside
    its range, 1 after a MaxPool (the pool is the unit); padding holds no unit."""
    b = NetBuilder(height=16, width=16, seed=2)
    c1 = b.conv("input", 4, 3, 1, (1, 1, 1, 1))
    p1 = b.maxpool(b.relu(c1), 2, 2)
    c2 = b.conv(p1, 6, 3, 2, (1, 1, 1, 1))
    c3 = b.conv(b.leaky_relu(c2, 0.1), 5, 3, 1, (1, 1, 1, 1))
    c4 = b.conv(b.clip(c3, 0.0, 0.5), 3, 3)
    proto = b.build([c4])
    model = load_proto(proto, tmp_path)
    images = np.random.default_rng(4).standard_normal((30, 3, 16, 16)).astype(np.float32)
    sub = gather_statistics(model, c4, fd.ArrayImages(images), top=7, batch_size=8)
    assert set(sub.stats) == {p1, c2, c3, c4} and sub.weighting == "gate"
    ort = run_ort(proto, images, [c1, c2, c3])
    leaky, clip = np.where(ort[c2] > 0, 1.0, 0.1), ((ort[c3] >= 0) & (ort[c3] <= 0.5)).astype(float)
    ones = np.ones((30, 4, 8, 8))
    for layer, gate, kernel, stride, pad in ((c2, ones, 3, 2, 1), (c3, leaky, 3, 1, 1), (c4, clip, 3, 1, 0)):
        top = sub.tops[layer]
        for k in range(top.values.shape[0]):
            want = _brute_window_mean(gate, top, k, kernel, stride, pad, gates=True)
            np.testing.assert_allclose(sub.stats[layer][k], want, rtol=1e-5, atol=1e-6, err_msg=f"{layer} neuron {k}")
    assert 0 < clip.mean() < 1 and 0.1 < leaky.mean() < 1  # the gates vary: the comparison is not of constants
    relu = np.pad(ort[c1] > 0, ((0, 0), (0, 0), (0, 1), (0, 1)))
    top = sub.tops[p1]
    for k in range(4):  # MaxPool: the switch, times the ReLU gate of the unit it picked
        want = np.zeros((2, 2))
        for w, n, (r, c) in zip(_instance_weights(top, k), top.image_index[k], top.position[k]):
            window = np.pad(np.maximum(ort[c1], 0), ((0, 0), (0, 0), (0, 1), (0, 1)))[n, k, 2 * r : 2 * r + 2,
                                                                                      2 * c : 2 * c + 2]
            i, j = np.unravel_index(np.argmax(window), (2, 2))
            want[i, j] += w * relu[n, k, 2 * r + i, 2 * c + j]
        np.testing.assert_allclose(sub.stats[p1][k, 0], want / _instance_weights(top, k).sum(), rtol=1e-5, atol=1e-7)


def test_maxpool_statistic_is_a_switch_distribution(net):
    model, _, images, names = net
    sub = gather_statistics(model, names["p1"], fd.ArrayImages(images), top=5, weighting="activation")
    stat = sub.stats[names["p1"]]
    assert stat.shape == (4, 1, 2, 2) and (stat >= 0).all()
    np.testing.assert_allclose(stat.sum(axis=(1, 2, 3)), 1.0, rtol=1e-6)


@pytest.mark.parametrize("weighting", ["gate", "activation"])
def test_fully_connected_statistic_is_the_mean_input_vector(tmp_path, weighting):
    """The mean input vector (activation) or the mean ReLU gate of each flattened unit (gate)."""
    b = NetBuilder(height=8, width=8, seed=5)
    pre = b.conv("input", 3, 3)
    x = b.relu(pre)
    flat = b._node("Flatten", [x], (3 * 6 * 6, 1, 1), axis=1)
    matrix = b._const("fc_w", np.random.default_rng(1).standard_normal((108, 4)).astype(np.float32))
    fc = b._node("MatMul", [flat, matrix], (4, 1, 1))
    b._node("Reshape", [fc, b._const("as_map", np.array([0, 4, 1, 1], np.int64))], (4, 1, 1))
    proto = b.build([b.last])
    model = load_proto(proto, tmp_path)
    images = np.random.default_rng(2).standard_normal((12, 3, 8, 8)).astype(np.float32)
    sub = gather_statistics(model, fc, fd.ArrayImages(images), top=4, weighting=weighting)
    ort = run_ort(proto, images, [flat, pre])
    flat_acts = ort[flat] if weighting == "activation" else (ort[pre] > 0).astype(float)
    top, flat_acts = sub.tops[fc], flat_acts.reshape(len(images), -1)
    assert 0 < flat_acts.mean() < 1
    for k in range(4):
        w = np.where(top.values[k] > 0, top.values[k], 0)
        w = w if w.sum() > 0 else np.ones_like(w)
        want = (w[:, None] * flat_acts[top.image_index[k]]).sum(0) / w.sum()
        np.testing.assert_allclose(sub.stats[fc][k], want, rtol=1e-5, atol=1e-6)
    up = fd.decode(model, fc, mode="fds", substitution=sub, dtype="float64")
    assert up.filters.shape == (4, 3, 8, 8)
    down = fd.decode(model, fc, mode="fds", substitution=sub, dtype="float64", route="adjoint")  # substituted matrix
    assert down.plan.route == "adjoint" and np.abs(up.filters).max() > 0
    np.testing.assert_allclose(down.filters, up.filters, rtol=1e-6, atol=1e-7 * np.abs(up.filters).max())
    np.testing.assert_allclose(down.bias, up.bias, rtol=1e-6, atol=1e-9)


def test_constant_statistics_with_select_all_reduce_to_weights(net):
    """All a_bar equal to a: each substituted conv scales by a; MaxPool held at the uniform switch."""
    model, _, _, names = net
    a = 1.7
    stats = {names["c1"]: np.full((4, 3, 3, 3), a), names["c2"]: np.full((6, 4, 3, 3), a),
             names["c3"]: np.full((5, 6, 3, 3), a), names["p1"]: np.full((4, 1, 2, 2), 0.25)}
    fds = fd.decode(model, names["c3"], mode="fds", dtype="float64", substitution=Substitution(stats, "all"))
    weights = fd.decode(model, names["c3"], dtype="float64", route="bottom-up")  # fds is bottom-up: its filters
    assert fds.mode == "fds" and fds.filters.shape == weights.filters.shape  # hold at interior positions
    np.testing.assert_allclose(fds.filters, a**3 * weights.filters, rtol=1e-10, atol=1e-12)
    other = fd.decode(model, names["c3"], mode="fds", dtype="float64", substitution=Substitution(stats, "positive"))
    assert not np.allclose(other.filters, fds.filters)  # the selection changes something


def test_select_rules():
    rng = np.random.default_rng(0)
    contrib = rng.standard_normal((3, 5, 2, 2))
    np.testing.assert_array_equal(select_contributions(contrib, "all"), contrib)
    positive = select_contributions(contrib, "positive")
    assert (positive >= 0).all() and np.array_equal(positive > 0, contrib > 0)
    best = select_contributions(contrib, "max")
    assert ((best != 0).sum(axis=1) == 1).all()
    np.testing.assert_array_equal(best.sum(axis=1), contrib.max(axis=1))
    two = select_contributions(contrib, "topk:2")
    assert ((two != 0).sum(axis=1) == 2).all()
    np.testing.assert_allclose(two.sum(axis=1), np.sort(contrib, axis=1)[:, -2:].sum(axis=1))


@pytest.mark.parametrize("select", ["best", "topk:0", "topk:x", ""])
def test_bad_select_is_one_line(select):
    with pytest.raises(fd.FdsubError, match="--select must be one of"):
        select_contributions(np.ones((1, 1, 1, 1)), select)


def test_fds_without_images_is_refused(net):
    model, _, _, names = net
    with pytest.raises(fd.FdsubError, match="needs images"):
        fd.decode(model, names["c3"], mode="fds")


def test_decode_fds_with_images_matches_precomputed_statistics(net):
    model, _, images, names = net
    direct = fd.decode(model, names["c3"], neurons="1,3", mode="fds", images=fd.ArrayImages(images), top=6,
                       select="max")
    sub = gather_statistics(model, names["c3"], fd.ArrayImages(images), top=6, select="max")
    again = fd.decode(model, names["c3"], neurons="1,3", mode="fds", substitution=sub)
    np.testing.assert_array_equal(direct.filters, again.filters)
    assert direct.filters.shape[0] == 2 and np.isfinite(direct.filters).all() and np.abs(direct.filters).max() > 0


def test_cli_decode_fds_writes_filters_and_instances(net, tmp_path):
    model, _, images, names = net
    np.save(tmp_path / "images.npy", images)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["decode", model.path, "--layer", names["c3"],
                                      "--images", str(tmp_path / "images.npy"), "--top", "5", "--neurons", "0,2",
                                      "--select", "topk:2", "--weighting", "activation", "--out", str(out)])
    assert result.exit_code == 0, result.output
    decoded, top = np.load(out / "decoded.npz"), np.load(out / "top.npz")
    assert str(decoded["mode"]) == "fds" and decoded["filters"].shape[0] == 2
    assert top["values"].shape == (2, 5) and top["neurons"].tolist() == [0, 2]
    assert (out / "filters.png").exists() and (out / "top.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--mode", "fds"], "needs --images"),
    (["--images", "IMAGES", "--select", "best"], "--select must be one of"),
    (["--images", "IMAGES", "--weighting", "mean"], "--weighting must be one of"),
    (["--mode", "weights", "--images", "IMAGES"], "no use in weights mode"),
])
def test_cli_decode_fds_bad_input_is_one_line(net, tmp_path, args, message):
    model, _, images, names = net
    np.save(tmp_path / "images.npy", images)
    args = [str(tmp_path / "images.npy") if a == "IMAGES" else a for a in args]
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["decode", model.path, "--layer", names["c3"], "--out", str(out), *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()


def test_squeeze_excitation_gate_is_held_at_its_mean(tmp_path):
    """An SE gate [N, C, 1, 1] over a map: fds holds the gate at its mean over the images (weights mode holds it
    at the reference input: tests/compose/test_patterns.py)."""
    b = NetBuilder(height=10, width=10, seed=6)
    x = b.relu(b.conv("input", 4, 3))
    gate = b.sigmoid(b.conv(b.global_avgpool(x), 4, 1))
    y = b._node("Mul", [x, gate], b.shapes[x])
    last = b.conv(y, 3, 3)
    proto = b.build([last])
    model = load_proto(proto, tmp_path)
    images = np.random.default_rng(1).standard_normal((16, 3, 10, 10)).astype(np.float32)
    sub = gather_statistics(model, last, fd.ArrayImages(images), top=5, batch_size=6)
    want = run_ort(proto, images, [gate])[gate].mean(axis=(0, 2, 3))
    np.testing.assert_allclose(sub.gates[y], want, rtol=1e-5)
    held = fd.decode(model, last, mode="fds", dtype="float64", substitution=sub)
    sub.gates[y] = 2 * sub.gates[y]  # the held gate scales everything above it linearly
    doubled = fd.decode(model, last, mode="fds", dtype="float64", substitution=sub)
    np.testing.assert_allclose(doubled.filters, 2 * held.filters, rtol=1e-10, atol=1e-14)


# ---- docs/method.md §4.2: gates, no substitution of pixels (properties 5 and 6) --------------------------------
@pytest.mark.parametrize("select", ["all", "positive", "max", "topk:2"])
@pytest.mark.parametrize("weighting", ["gate", "activation"])
def test_first_layer_fds_is_its_weights(net, select, weighting):
    """Property 5: pixels are not neurons, so the first layer's fds filter is its weight filter (any select)."""
    model, _, images, names = net
    fds = fd.decode(model, names["c1"], mode="fds", dtype="float64", images=fd.ArrayImages(images), top=5,
                    select=select, weighting=weighting)
    weights = fd.decode(model, names["c1"], dtype="float64", route="bottom-up")
    np.testing.assert_allclose(fds.filters, weights.filters, rtol=1e-12, atol=0)
    np.testing.assert_allclose(fds.bias, weights.bias, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name, proto", linear_zoo(), ids=[name for name, _ in linear_zoo()])
def test_linear_network_fds_all_is_weights_at_every_layer(name, proto, tmp_path):
    """Property 5: without nonlinearities every gate is 1, so `fds --select all` is `weights` at every layer."""
    model = load_proto(proto, tmp_path)
    images = fd.ArrayImages(random_images(model, 12, seed=3))
    layers = [layer.name for layer in fd.inspect_model(model).layers if layer.decodable]
    fds = {d.layer: d for d in fd.iter_decode(model, layers, mode="fds", dtype="float64", images=images, top=4,
                                              select="all")}
    weights = {d.layer: d for d in fd.iter_decode(model, layers, dtype="float64", route="bottom-up")}
    assert set(fds) == set(weights) == set(layers)
    for layer in layers:
        scale = np.abs(weights[layer].filters).max()
        np.testing.assert_allclose(fds[layer].filters, weights[layer].filters, rtol=1e-10, atol=1e-12 * scale,
                                   err_msg=f"{name}: {layer}")
        np.testing.assert_allclose(fds[layer].bias, weights[layer].bias, rtol=1e-10, atol=1e-12 * scale)


def _positive_relu_net(off=()):
    """Valid convs with positive weights and biases: on positive images every ReLU is on (every position is
    interior). ``off``: channels of conv1 given a bias of -1000, so that they are off in every image."""
    b = NetBuilder(height=12, width=12, seed=3, positive=True)
    c1 = b.conv("input", 5, 3)
    c2 = b.conv(b.relu(c1), 4, 3)
    c3 = b.conv(b.relu(c2), 3, 3)
    proto = b.build([c3])
    bias = next(t for t in proto.graph.initializer if t.name == proto.graph.node[0].input[2])
    values = numpy_helper.to_array(bias).copy()
    values[list(off)] = -1000.0
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    return proto, (c1, c2, c3)


def test_all_on_relu_network_fds_all_equals_local_and_weights(tmp_path):
    """Property 6: every unit on in every image, so every gate is 1: fds --select all = local = weights."""
    proto, layers = _positive_relu_net()
    model = load_proto(proto, tmp_path)
    images = fd.ArrayImages(np.random.default_rng(0).uniform(0, 1, (10, 3, 12, 12)))
    assert all((run_ort(proto, images.array, [c])[c] > 0).all() for c in layers[:2])  # the premise
    for layer in layers:
        weights = fd.decode(model, layer, dtype="float64", route="bottom-up")
        for mode, select in (("fds", "all"), ("local", "all")):
            other = fd.decode(model, layer, mode=mode, dtype="float64", images=images, top=4, select=select)
            scale = np.abs(weights.filters).max()
            np.testing.assert_allclose(other.filters, weights.filters, rtol=1e-9, atol=1e-12 * scale,
                                       err_msg=f"{mode} {layer}")
            np.testing.assert_allclose(other.bias, weights.bias, rtol=1e-9, atol=1e-9, err_msg=f"{mode} {layer}")


def test_units_off_in_every_image_change_fds_as_removing_them(tmp_path):
    """Property 6: conv1 channels 1 and 3 are off in every image; fds --select all of every layer above is then
    the `weights` decoding of the network whose conv2 does not read those channels (the units removed)."""
    proto, (c1, c2, c3) = _positive_relu_net(off=(1, 3))
    model = load_proto(proto, tmp_path)
    images = fd.ArrayImages(np.random.default_rng(1).uniform(0, 1, (10, 3, 12, 12)))
    acts = run_ort(proto, images.array, [c1, c2])
    assert (acts[c1][:, [1, 3]] < 0).all() and (acts[c1][:, [0, 2, 4]] > 0).all() and (acts[c2] > 0).all()
    removed = onnx.ModelProto()
    removed.CopyFrom(proto)
    w2 = next(t for t in removed.graph.initializer if t.name == removed.graph.node[2].input[1])
    values = numpy_helper.to_array(w2).copy()
    values[:, [1, 3]] = 0
    w2.CopyFrom(numpy_helper.from_array(values, w2.name))
    (tmp_path / "removed").mkdir()
    pruned = load_proto(removed, tmp_path / "removed")
    fds = {d.layer: d for d in fd.iter_decode(model, [c2, c3], mode="fds", dtype="float64", images=images, top=4,
                                              select="all")}
    for layer in (c2, c3):
        want = fd.decode(pruned, layer, dtype="float64", route="bottom-up")
        scale = np.abs(want.filters).max()
        np.testing.assert_allclose(fds[layer].filters, want.filters, rtol=1e-9, atol=1e-12 * scale, err_msg=layer)
        np.testing.assert_allclose(fds[layer].bias, want.bias, rtol=1e-9, atol=1e-9, err_msg=layer)


def test_gates_through_silu_pad_and_concat(tmp_path):
    """SiLU's gate is its derivative s + x s (1 - s); a Pad's ring holds no unit; Concat stacks its inputs' gates."""
    b = NetBuilder(height=10, width=10, seed=7)
    a = b.conv("input", 3, 3)
    silu = b._node("Mul", [a, b.sigmoid(a)], b.shapes[a])
    c = b.conv("input", 2, 3)
    x = b.pad(b.concat([silu, b.relu(c)]), (1, 1, 1, 1))
    last = b.conv(x, 4, 3)
    proto = b.build([last])
    model = load_proto(proto, tmp_path)
    images = np.random.default_rng(3).standard_normal((20, 3, 10, 10)).astype(np.float32)
    sub = gather_statistics(model, last, fd.ArrayImages(images), top=6)
    assert set(sub.stats) == {last}  # a and c read the pixels
    ort = run_ort(proto, images, [a, c])
    s = 1 / (1 + np.exp(-ort[a].astype(np.float64)))
    gate = np.concatenate([s + ort[a] * s * (1 - s), (ort[c] > 0).astype(float)], axis=1)
    gate = np.pad(gate, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=np.nan)
    top = sub.tops[last]
    for k in range(4):
        want = _brute_window_mean(gate, top, k, 3, 1, 0, gates=True)
        np.testing.assert_allclose(sub.stats[last][k], want, rtol=1e-5, atol=1e-6, err_msg=f"neuron {k}")


def test_overflow_is_a_named_warning_not_a_runtime_warning(tmp_path):
    """--weighting activation multiplies each layer's activation scale into the next: with images of 1e30 the
    composition overflows float32. The library stays quiet (no NumPy RuntimeWarning) and names the neurons
    (``Decoded.degenerate``); the CLI warns with the cause and exits 1. The gate weighting stays finite."""
    b = NetBuilder(height=10, width=10, seed=3, positive=True)
    last = b.conv(b.relu(b.conv(b.relu(b.conv("input", 4, 3)), 4, 3)), 2, 3)
    model = load_proto(b.build([last]), tmp_path)
    images = (np.random.default_rng(0).uniform(0.5, 1, (6, 3, 10, 10)) * 1e30).astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        blown = fd.decode(model, last, mode="fds", images=fd.ArrayImages(images), top=3, weighting="activation")
        kept = fd.decode(model, last, mode="fds", images=fd.ArrayImages(images), top=3, weighting="gate")
    assert blown.degenerate == ["not finite", "not finite"] and kept.degenerate == [None, None]
    args = ["decode", model.path, "--layer", last, "--images", str(tmp_path / "images.npy"), "--top", "3"]
    result = CliRunner().invoke(app, [*args, "--weighting", "activation", "--out", str(tmp_path / "a")])
    assert result.exit_code == 1, result.output
    assert "warning: 2 filters of" in result.output and "overflowed float32" in result.output
    assert "--weighting gate" in result.output and "RuntimeWarning" not in result.output
    fine = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "g")])
    assert fine.exit_code == 0 and "warning" not in fine.output, fine.output
