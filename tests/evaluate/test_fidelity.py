"""Fidelity: predictions against onnxruntime, the correlation and top-N share against direct computations."""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pytest
from checks import load_proto
from netgen import NetBuilder, run_ort
from typer.testing import CliRunner

import fdsub_onnx as fd
from fdsub_onnx.cli.main import app
from fdsub_onnx.evaluate.compare import compare_modes
from fdsub_onnx.evaluate.fidelity import fidelity, fidelity_of_layers
from fdsub_onnx.evaluate.predict import predict


@pytest.fixture
def linear(tmp_path):
    """Valid convs and an average pool only: every output position is interior, the weights identity is exact."""
    b = NetBuilder(height=14, width=14, seed=8)
    last = b.conv(b.avgpool(b.conv("input", 4, 3), 2, 2), 5, 3)
    proto = b.build([last])
    return load_proto(proto, tmp_path), proto, last


def test_weights_decoding_of_a_linear_net_has_perfect_fidelity(linear):
    model, proto, last = linear
    images = np.random.default_rng(0).standard_normal((20, 3, 14, 14)).astype(np.float32)
    decoded = fd.decode(model, last, dtype="float64")
    acts = run_ort(proto, images, [last])[last]
    np.testing.assert_allclose(predict(decoded, images, acts.shape[2:]), acts, rtol=1e-4, atol=1e-4)
    result = fidelity(model, {"weights": decoded}, fd.ArrayImages(images), top=5)
    scores = result["decodings"]["weights"]
    assert result["images"] == 20 and result["top"] == 5
    np.testing.assert_allclose(scores["correlation"], 1.0, atol=1e-6)
    assert scores["top_share"] == [1.0] * 5
    flipped = dataclasses.replace(decoded, filters=-decoded.filters, bias=-decoded.bias)
    np.testing.assert_allclose(
        fidelity(model, {"flipped": flipped}, fd.ArrayImages(images))["decodings"]["flipped"]["correlation"],
        -1.0, atol=1e-6)


def test_predictions_in_row_chunks_match_onnxruntime(linear, monkeypatch):
    """With a temporary budget of one output row, prediction runs row by row and still matches onnxruntime."""
    from fdsub_onnx.compose.backend import NumpyBackend

    model, proto, last = linear
    images = np.random.default_rng(3).standard_normal((6, 3, 14, 14)).astype(np.float32)
    decoded = fd.decode(model, last, dtype="float64")
    acts = run_ort(proto, images, [last])[last]
    monkeypatch.setattr(NumpyBackend, "temp_bytes", 1)
    np.testing.assert_allclose(predict(decoded, images, acts.shape[2:]), acts, rtol=1e-4, atol=1e-4)


def test_correlation_and_share_match_a_direct_computation(linear):
    model, proto, last = linear
    images = np.random.default_rng(1).standard_normal((24, 3, 14, 14)).astype(np.float32)
    decoded = fd.decode(model, last, neurons="1,3")
    noisy = dataclasses.replace(decoded, filters=decoded.filters + np.random.default_rng(2).normal(
        0, np.abs(decoded.filters).max(), decoded.filters.shape).astype(np.float32))
    scores = fidelity(model, {"noisy": noisy}, fd.ArrayImages(images), top=6, batch_size=5)["decodings"]["noisy"]
    acts = run_ort(proto, images, [last])[last][:, [1, 3]]
    pred = predict(noisy, images, acts.shape[2:])
    for k in range(2):
        want = np.corrcoef(pred[:, k].ravel(), acts[:, k].ravel())[0, 1]
        assert abs(scores["correlation"][k] - want) < 1e-6
        true_top = set(np.argsort(-acts[:, k].reshape(24, -1).max(1), kind="stable")[:6])
        pred_top = set(np.argsort(-pred[:, k].reshape(24, -1).max(1), kind="stable")[:6])
        assert scores["top_share"][k] == len(true_top & pred_top) / 6
        t, q = acts[:, k].reshape(24, -1).max(1), pred[:, k].reshape(24, -1).max(1)
        pairs = [(i, j) for i in range(24) for j in range(24) if t[i] > t[j]]  # the two-choice test, pair by pair
        won = sum(1.0 if q[i] > q[j] else 0.5 if q[i] == q[j] else 0.0 for i, j in pairs)
        assert abs(scores["two_choice"][k] - won / len(pairs)) < 1e-12
    assert 0 < min(scores["correlation"]) < 1 and 0.5 < min(scores["two_choice"]) < 1
    assert scores["degenerate"] == [None, None]


def test_two_choice_is_one_for_an_exact_filter_and_blind_to_scale_and_offset(linear):
    model, _, last = linear
    images = fd.ArrayImages(np.random.default_rng(3).standard_normal((16, 3, 14, 14)).astype(np.float32))
    decoded = fd.decode(model, last, dtype="float64")
    noisy = dataclasses.replace(decoded, filters=decoded.filters + np.random.default_rng(5).normal(
        0, np.abs(decoded.filters).max(), decoded.filters.shape))
    scaled = dataclasses.replace(noisy, filters=3 * noisy.filters, bias=3 * noisy.bias - 7)
    scores = fidelity(model, {"weights": decoded, "noisy": noisy, "scaled": scaled}, images, top=4)["decodings"]
    assert scores["weights"]["two_choice"] == [1.0] * 5 and scores["weights"]["mean_two_choice"] == 1.0
    assert scores["scaled"]["two_choice"] == scores["noisy"]["two_choice"] and min(scores["noisy"]["two_choice"]) < 1


def test_degenerate_filters_are_reported_per_neuron_not_scored(linear):
    """An all-zero or a non-finite filter predicts nothing: its neuron is named degenerate, with no score (not the
    rounding noise or index tie-breaking it would otherwise get), and the means are over the other neurons."""
    model, _, last = linear
    images = fd.ArrayImages(np.random.default_rng(4).standard_normal((16, 3, 14, 14)).astype(np.float32))
    decoded = fd.decode(model, last, dtype="float64")
    filters, bias = decoded.filters.copy(), decoded.bias.copy()
    filters[1], filters[3, 0, 0, 0], bias[4] = 0.0, np.inf, np.nan
    broken = dataclasses.replace(decoded, filters=filters, bias=bias)
    assert broken.degenerate == [None, "all zero", None, "not finite", "not finite"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no raw NumPy RuntimeWarning on the way
        scores = fidelity(model, {"broken": broken}, images, top=4)["decodings"]["broken"]
    assert scores["degenerate"] == broken.degenerate
    for key in ("correlation", "top_share", "two_choice"):
        assert [v is None for v in scores[key]] == [False, True, False, True, True], key
    assert abs(scores["mean_correlation"] - 1.0) < 1e-9 and scores["mean_top_share"] == 1.0
    assert scores["mean_two_choice"] == 1.0


def test_compare_modes_on_a_relu_net(tmp_path):
    b = NetBuilder(height=16, width=16, seed=3)
    last = b.conv(b.maxpool(b.relu(b.conv("input", 4, 3, 1, (1, 1, 1, 1))), 2, 2), 5, 3)
    model = load_proto(b.build([last]), tmp_path)
    rng = np.random.default_rng(0)
    images, holdout = (fd.ArrayImages(rng.standard_normal((n, 3, 16, 16)).astype(np.float32)) for n in (30, 20))
    result = compare_modes(model, last, images, holdout, top=5, neurons="0-2").scores
    assert (list(result["decodings"]) == ["weights", "fds", "local", "deconvnet", "nf"]
            and result["neurons"] == [0, 1, 2])
    for scores in result["decodings"].values():
        assert all(-1 <= r <= 1 for r in scores["correlation"]) and all(0 <= s <= 1 for s in scores["top_share"])
    with pytest.raises(fd.FdsubError, match="unknown mode 'gradcam'"):
        compare_modes(model, last, images, holdout, modes=["weights", "gradcam"])


def test_cli_fidelity(linear, tmp_path):
    model, _, last = linear
    rng = np.random.default_rng(0)
    np.save(tmp_path / "a.npy", rng.standard_normal((16, 3, 14, 14)).astype(np.float32))
    np.save(tmp_path / "b.npy", rng.standard_normal((12, 3, 14, 14)).astype(np.float32))
    out = tmp_path / "fid"
    args = ["fidelity", model.path, "--layer", last, "--images", str(tmp_path / "a.npy"), "--holdout",
            str(tmp_path / "b.npy"), "--top", "4", "--out", str(out)]
    result = CliRunner().invoke(app, args + ["--modes", "weights,local"])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "fidelity.json").read_text())
    assert set(saved["decodings"]) == {"weights", "local"} and "weights" in result.output
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "fidelity.json", "local-decoded.npz", "local-filters.png", "weights-decoded.npz", "weights-filters.png"]
    scored = np.load(out / "weights-decoded.npz")
    assert str(scored["mode"]) == "weights" and scored["filters"].shape[0] == len(saved["neurons"])
    fds = CliRunner().invoke(app, args[:-1] + [str(tmp_path / "fds"), "--modes", "fds", "--select", "all",
                                              "--weighting", "activation"])
    assert fds.exit_code == 0, fds.output
    assert str(np.load(tmp_path / "fds" / "fds-decoded.npz")["mode"]) == "fds"
    for option, value in (("--select", "best"), ("--weighting", "mean")):
        bad = CliRunner().invoke(app, args[:-1] + [str(tmp_path / "bad"), option, value])
        assert bad.exit_code == 2 and f"{option} must be one of" in bad.output and not (tmp_path / "bad").exists()
    bad = CliRunner().invoke(app, args[:-1] + [str(tmp_path / "other"), "--modes", "weights,magic"])
    assert bad.exit_code == 2 and "unknown mode 'magic'" in bad.output and not (tmp_path / "other").exists()


@pytest.mark.parametrize("rectified", [False, True])
def test_deconvnet_reuses_the_local_pass_only_without_a_rectifier(tmp_path, monkeypatch, rectified):
    """Without a rectifier (tanh here) deconvnet is local with bias 0: one backward pass serves both. With ReLU6
    (Clip 0..6) the two passes run and differ (property 7 in the comparison)."""
    from fdsub_onnx.evaluate import compare

    b = NetBuilder(height=10, width=10, seed=4)
    x = b.conv("input", 4, 3)
    last = b.conv(b.clip(x, 0.0, 6.0) if rectified else b.tanh(x), 3, 3)
    model = load_proto(b.build([last]), tmp_path)
    calls = []
    real = compare.decode_instances
    monkeypatch.setattr(compare, "decode_instances", lambda *a, **k: calls.append(k["rule"]) or real(*a, **k))
    rng = np.random.default_rng(0)
    images, holdout = (fd.ArrayImages(rng.standard_normal((n, 3, 10, 10)).astype(np.float32)) for n in (12, 10))
    result = compare_modes(model, last, images, holdout, modes=["local", "deconvnet"], top=4)
    local, deconvnet = result.decoded["local"], result.decoded["deconvnet"]
    assert sorted(calls) == (["deconvnet", "local"] if rectified else ["local"])
    assert deconvnet.mode == "deconvnet" and not deconvnet.bias.any()
    differ = np.abs(local.filters - deconvnet.filters).max() > 1e-3 * np.abs(local.filters).max()
    assert differ == rectified


def test_layers_scored_in_one_pass_score_as_each_alone(tmp_path):
    """``fidelity_of_layers`` runs the images through onnxruntime once for every layer: each layer's figures are
    those of ``fidelity`` on it alone, bit for bit, whatever the order of the layers."""
    b = NetBuilder(height=16, width=16, seed=12)
    first = b.relu(b.conv("input", 4, 3, 1, (1, 1, 1, 1)))
    last = b.conv(b.maxpool(first, 2, 2), 5, 3, 1, (1, 1, 1, 1))
    model = load_proto(b.build([last]), tmp_path)
    first = model.producer[first].input[0]  # the Conv under the Relu
    images = fd.ArrayImages(np.random.default_rng(2).standard_normal((11, 3, 16, 16)).astype(np.float32))
    layers = [{"weights": fd.decode(model, name, dtype="float64", neurons=[1, 3]),
               "local": fd.decode(model, name, mode="local", images=images, top=3, dtype="float64", neurons=[1, 3])}
              for name in (first, last)]
    together = fidelity_of_layers(model, layers[::-1], images, top=3, batch_size=4)[::-1]
    for decodings, got in zip(layers, together):
        assert got == fidelity(model, decodings, images, top=3, batch_size=4)


def test_a_report_reads_its_fidelity_images_once_for_all_layers(tmp_path, monkeypatch):
    """compare_layers scores every layer in one pass over the fidelity images (the report of 6 layers over 1,000
    images read and ran them 6 times)."""
    b = NetBuilder(height=12, width=12, seed=13)
    first = b.relu(b.conv("input", 4, 3))
    last = b.conv(first, 3, 3)
    model = load_proto(b.build([last]), tmp_path)
    rng = np.random.default_rng(3)
    images = fd.ArrayImages(rng.standard_normal((8, 3, 12, 12)).astype(np.float32))
    held = fd.ArrayImages(rng.standard_normal((9, 3, 12, 12)).astype(np.float32))
    reads = []
    original = type(held).batches
    monkeypatch.setattr(type(held), "batches", lambda self, *a, **k: (reads.append(self is held),
                                                                      original(self, *a, **k))[1])
    choice = fd.choose_report(model)
    from fdsub_onnx.evaluate.compare import compare_layers

    compared = compare_layers(model, choice.layers, choice.picks, images, held, top=3)
    assert len(compared) == 2 and sum(reads) == 1


@pytest.mark.parametrize(("rf", "stride", "origin", "out_size"), [((35, 35), (8, 8), (-17, -17), (6, 6)),
                                                                  ((29, 19), (4, 2), (-3, 5), (7, 9)),
                                                                  ((5, 5), (1, 1), (-2, -2), (20, 20))])
def test_the_fft_correlation_equals_the_windows_products(monkeypatch, rf, stride, origin, out_size):
    """Large fields are predicted through the FFT: the same values as the windows' products, windows that read
    the padding included."""
    from fdsub_onnx.evaluate import predict as module

    rng = np.random.default_rng(3)
    images = rng.standard_normal((3, 2, 23, 21))
    decoded = fd.Decoded(rng.standard_normal((5, 2, *rf)), rng.standard_normal(5), np.arange(5), stride, origin,
                         "x", "weights", None)
    monkeypatch.setattr(module, "_fft_cheaper", lambda *_: False)
    direct = predict(decoded, images, out_size)
    monkeypatch.setattr(module, "_fft_cheaper", lambda *_: True)
    fft = predict(decoded, images, out_size)
    assert fft.shape == direct.shape == (3, 5, *out_size)
    np.testing.assert_allclose(fft, direct, rtol=0, atol=1e-10 * np.abs(direct).max())


@pytest.mark.parametrize(("rf", "stride", "origin", "out_size"), [((61, 57), (8, 8), (-30, -28), (3, 3)),
                                                                  ((29, 19), (4, 2), (-3, 5), (7, 9)),
                                                                  ((40, 9), (16, 1), (-35, -4), (2, 21)),
                                                                  ((5, 5), (1, 1), (-2, -2), (20, 20))])
@pytest.mark.parametrize("fft", [False, True])
def test_the_swapped_correlation_equals_the_windows_products(monkeypatch, rf, stride, origin, out_size, fft):
    """A field wider than the image is predicted with the roles of image and filter swapped (only the part of the
    filter some window meets inside the image is read): the same values as the windows of the padded image, by
    the windows' products or the FFT, for fields wider or narrower than the image, windows inside or outside it."""
    from fdsub_onnx.evaluate import predict as module

    rng = np.random.default_rng(4)
    images = rng.standard_normal((3, 2, 23, 21))
    decoded = fd.Decoded(rng.standard_normal((5, 2, *rf)), rng.standard_normal(5), np.arange(5), stride, origin,
                         "x", "weights", None)
    monkeypatch.setattr(module, "_fft_cheaper", lambda *_: False)
    monkeypatch.setattr(module, "_swap_cheaper", lambda *_: False)
    plain = predict(decoded, images, out_size)
    monkeypatch.setattr(module, "_fft_cheaper", lambda *_: fft)
    monkeypatch.setattr(module, "_swap_cheaper", lambda *_: True)
    swapped = predict(decoded, images, out_size)
    assert swapped.shape == plain.shape == (3, 5, *out_size)
    np.testing.assert_allclose(swapped, plain, rtol=0, atol=1e-10 * np.abs(plain).max())


def test_a_field_wider_than_the_image_takes_the_swapped_form():
    from fdsub_onnx.evaluate.predict import _swap_cheaper

    # EfficientNet-Lite2 conv_head at 260 px: 1,115-px field, 9 x 9 positions 32 px apart, 16 images a batch
    assert _swap_cheaper((16, 3, 1115, 1115), (16, 3, 260, 260), (32, 32), (9, 9))
    assert not _swap_cheaper((16, 3, 3, 3), (16, 3, 260, 260), (2, 2), (130, 130))  # its stem


def test_a_large_field_takes_the_fft():
    from fdsub_onnx.evaluate.predict import _fft_cheaper

    assert _fft_cheaper((16, 3, 347, 347), (603, 603), (17, 17))  # EfficientNet-Lite2 blocks.12 at 260 px
    assert not _fft_cheaper((16, 3, 3, 3), (261, 261), (130, 130))  # its stem


def test_fft_lengths_are_the_smallest_with_factors_2_3_5():
    from fdsub_onnx.evaluate.predict import _fast_length

    def smooth(m):
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        return m == 1

    for n in range(1, 2000):
        assert _fast_length(n) == next(m for m in range(n, 2 * n + 1) if smooth(m)), n
