"""`fds` mode: the statistics against a brute-force computation, the select rules, the reduction to `weights`."""

from __future__ import annotations

import numpy as np
import pytest
from checks import load_proto
from netgen import NetBuilder, run_ort
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


def _brute_window_mean(acts_in, top, k, kernel, stride, pad):
    """Activation-weighted mean of the zero-padded input windows of neuron k's instances (plain loops)."""
    padded = np.pad(acts_in, ((0, 0), (0, 0), (pad, pad + kernel), (pad, pad + kernel)))
    weights = np.where((top.image_index[k] >= 0) & (top.values[k] > 0), top.values[k], 0.0)
    if weights.sum() == 0:
        weights = (top.image_index[k] >= 0).astype(float)
    total = 0
    for w, n, (r, c) in zip(weights, top.image_index[k], top.position[k]):
        if n >= 0:
            total = total + w * padded[n, :, r * stride : r * stride + kernel, c * stride : c * stride + kernel]
    return total / weights.sum()


def test_statistics_equal_brute_force(net):
    model, proto, images, names = net
    sub = gather_statistics(model, names["c3"], fd.ArrayImages(images), top=7, batch_size=8)
    assert set(sub.stats) == {names["c1"], names["p1"], names["c2"], names["c3"]}
    ort = run_ort(proto, images, ["input", names["p1"], names["c2"]])
    relu_c2 = np.maximum(ort[names["c2"]], 0)
    for layer, source, kernel, stride, pad in ((names["c2"], ort[names["p1"]], 3, 2, 1),
                                              (names["c3"], relu_c2, 3, 1, 0), (names["c1"], images, 3, 1, 1)):
        top = sub.tops[layer]
        assert (top.image_index >= 0).all()
        for k in range(top.values.shape[0]):
            want = _brute_window_mean(source, top, k, kernel, stride, pad)
            np.testing.assert_allclose(sub.stats[layer][k], want, rtol=1e-5, atol=1e-6, err_msg=f"{layer} neuron {k}")


def test_maxpool_statistic_is_a_switch_distribution(net):
    model, _, images, names = net
    stat = gather_statistics(model, names["p1"], fd.ArrayImages(images), top=5).stats[names["p1"]]
    assert stat.shape == (4, 1, 2, 2) and (stat >= 0).all()
    np.testing.assert_allclose(stat.sum(axis=(1, 2, 3)), 1.0, rtol=1e-6)


def test_fully_connected_statistic_is_the_mean_input_vector(tmp_path):
    b = NetBuilder(height=8, width=8, seed=5)
    x = b.relu(b.conv("input", 3, 3))
    flat = b._node("Flatten", [x], (3 * 6 * 6, 1, 1), axis=1)
    matrix = b._const("fc_w", np.random.default_rng(1).standard_normal((108, 4)).astype(np.float32))
    fc = b._node("MatMul", [flat, matrix], (4, 1, 1))
    b._node("Reshape", [fc, b._const("as_map", np.array([0, 4, 1, 1], np.int64))], (4, 1, 1))
    proto = b.build([b.last])
    model = load_proto(proto, tmp_path)
    images = np.random.default_rng(2).standard_normal((12, 3, 8, 8)).astype(np.float32)
    sub = gather_statistics(model, fc, fd.ArrayImages(images), top=4)
    top, flat_acts = sub.tops[fc], run_ort(proto, images, [flat])[flat].reshape(len(images), -1)
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
                                      "--select", "topk:2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    decoded, top = np.load(out / "decoded.npz"), np.load(out / "top.npz")
    assert str(decoded["mode"]) == "fds" and decoded["filters"].shape[0] == 2
    assert top["values"].shape == (2, 5) and top["neurons"].tolist() == [0, 2]
    assert (out / "filters.png").exists() and (out / "top.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--mode", "fds"], "needs --images"),
    (["--images", "IMAGES", "--select", "best"], "--select must be one of"),
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
