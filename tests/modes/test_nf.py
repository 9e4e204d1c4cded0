"""The Neuron Feature comparator against a brute-force computation, its weights, and `fdsub nf`."""

from __future__ import annotations

import netgen  # tests/ is on sys.path (tests/conftest.py)
import numpy as np
import onnx
import pytest
from PIL import Image
from typer.testing import CliRunner

import fdsub_onnx as fd
from fdsub_onnx import TopN
from fdsub_onnx.cli.main import app
from fdsub_onnx.compose.inspect import layer_geometry
from fdsub_onnx.data.images import ArrayImages

runner = CliRunner()
# conv 3x3 pad 1 -> relu -> conv 3x3 stride 2 pad 1: S=2, R=3+2*1=5, O=-1-1=-2 (by hand, see _geometry)
STRIDE, RF, ORIGIN = (2, 2), (5, 5), (-2, -2)


def _padded_net():
    b = netgen.NetBuilder(height=12, width=12, seed=3)
    conv1 = b.conv("input", 4, 3, 1, (1, 1, 1, 1))
    conv2 = b.conv(b.relu(conv1), 5, 3, 2, (1, 1, 1, 1))
    b.relu(conv2)
    return b.build([b.last]), conv2


@pytest.fixture(scope="module")
def padded(load):
    proto, layer = _padded_net()
    images = np.random.default_rng(4).standard_normal((9, 3, 12, 12)).astype(np.float32)
    return proto, load(proto), layer, images


def brute_nf(top: TopN, images: np.ndarray, stride, rf, origin) -> np.ndarray:
    """The NF the slow, obvious way: windows cut from NaN-padded images, NaN pixels left out of the weighted mean."""
    margin = max(rf) + max(abs(o) for o in origin) + max(stride) * max(images.shape[2:])
    border = ((0, 0), (0, 0), (margin, margin), (margin, margin))
    padded = np.pad(images.astype(np.float64), border, constant_values=np.nan)
    k_neurons, n_top = top.values.shape
    out = np.zeros((k_neurons, images.shape[1], *rf))
    for k in range(k_neurons):
        filled = [n for n in range(n_top) if top.image_index[k, n] >= 0]
        weights = {n: max(float(top.values[k, n]), 0.0) for n in filled}
        if sum(weights.values()) == 0:
            weights = dict.fromkeys(filled, 1.0)
        num, den = np.zeros_like(out[k]), np.zeros_like(out[k])
        for n in filled:
            y0 = origin[0] + top.position[k, n, 0] * stride[0] + margin
            x0 = origin[1] + top.position[k, n, 1] * stride[1] + margin
            patch = padded[top.image_index[k, n], :, y0 : y0 + rf[0], x0 : x0 + rf[1]]
            inside = ~np.isnan(patch)
            num += weights[n] * np.where(inside, patch, 0)
            den += weights[n] * inside
        out[k] = np.where(den > 0, num / np.where(den > 0, den, 1), 0)
    return out


def test_nf_equals_brute_force_with_border_exclusion(padded):
    _, model, layer, images = padded
    geom = layer_geometry(model, layer)
    assert (geom.stride, geom.rf, geom.origin) == (STRIDE, RF, ORIGIN)
    top = fd.capture_top(model, layer, ArrayImages(images), top=6, per_image=2)
    starts = ORIGIN[0] + top.position * STRIDE[0]
    assert ((starts < 0) | (starts + RF[0] > 12)).any(), "no instance touches the border: the test checks nothing"
    calls = []
    nf = fd.neuron_feature(model, top, ArrayImages(images), batch_size=2, progress=lambda d, t: calls.append((d, t)))
    assert nf.mode == "nf" and nf.filters.dtype == np.float32 and nf.filters.shape == (5, 3, *RF)
    assert np.array_equal(nf.bias, np.zeros(5)) and list(nf.neurons) == list(range(5))
    assert (tuple(nf.stride), tuple(nf.origin), nf.layer) == (STRIDE, ORIGIN, layer)
    np.testing.assert_allclose(nf.filters, brute_nf(top, images, STRIDE, RF, ORIGIN), rtol=1e-5, atol=1e-6)
    needed = len(np.unique(top.image_index[top.image_index >= 0]))
    assert calls[0] == (0, needed) and calls[-1] == (needed, needed)


def test_nf_reads_only_the_images_of_the_instances(padded):
    _, model, layer, images = padded
    top = fd.capture_top(model, layer, ArrayImages(images), top=2, neurons="1")
    read = []

    class Watched(ArrayImages):
        def _load(self, first, stop):
            read.extend(range(first, stop))
            return super()._load(first, stop)

    fd.neuron_feature(model, top, Watched(images), batch_size=4)
    assert sorted(read) == sorted(set(top.image_index[0].tolist()))


def _hand_case(load):
    """A 3x3 valid conv on 1x6x6 (R=3, S=1, O=0) and two random images."""
    b = netgen.NetBuilder(in_channels=1, height=6, width=6, seed=1)
    layer = b.conv("input", 1, 3)
    images = np.random.default_rng(2).standard_normal((2, 1, 6, 6)).astype(np.float32)
    return load(b.build([layer])), layer, images


def _top(values, image_index, positions, layer):
    return TopN(np.array([values], np.float32), np.array([image_index], np.int64), np.array([positions], np.int64),
                np.array([0]), layer, ["array[0]", "array[1]"])  # ArrayImages names its images so


def test_nf_weights_are_the_positive_activations(load):
    model, layer, images = _hand_case(load)
    # weights 3 and 1; the negative instance weighs 0; the unfilled slot is ignored
    top = _top([3.0, 1.0, -2.0, -np.inf], [0, 1, 1, -1], [(0, 0), (2, 1), (3, 3), (0, 0)], layer)
    nf = fd.neuron_feature(model, top, ArrayImages(images))
    expected = (3 * images[0, :, 0:3, 0:3] + 1 * images[1, :, 2:5, 1:4]) / 4
    np.testing.assert_allclose(nf.filters[0], expected, rtol=1e-6)


def test_nf_of_all_zero_weights_is_the_plain_mean(load):
    model, layer, images = _hand_case(load)
    top = _top([0.0, -1.0, -np.inf], [0, 1, -1], [(1, 2), (3, 0), (0, 0)], layer)
    nf = fd.neuron_feature(model, top, ArrayImages(images))
    np.testing.assert_allclose(nf.filters[0], (images[0, :, 1:4, 2:5] + images[1, :, 3:6, 0:3]) / 2, rtol=1e-6)


# ---- command line ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_files(tmp_path_factory, padded):
    proto, _, layer, images = padded
    folder = tmp_path_factory.mktemp("nf-cli")
    onnx.save(proto, str(folder / "net.onnx"))
    np.save(folder / "images.npy", images)
    return folder, layer


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_cli_nf_writes_filters_and_instances(cli_files, padded, tmp_path):
    folder, layer = cli_files
    _, model, _, images = padded
    common = ("--layer", layer, "--images", folder / "images.npy")
    result = invoke("nf", folder / "net.onnx", *common, "--top", 4, "--neurons", "0-2", "--out", tmp_path / "nf")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "nf").iterdir()) == [".fdsub-result.json", "decoded.npz", "filters.png",
                                                                   "top.json", "top.npz"]
    with np.load(tmp_path / "nf" / "decoded.npz") as data:
        assert str(data["mode"]) == "nf" and data["filters"].shape == (3, 3, *RF) and data["bias"].shape == (3,)
        assert list(data["stride"]) == list(STRIDE) and list(data["origin"]) == list(ORIGIN)
        filters = data["filters"]
    top = fd.load_top(tmp_path / "nf")
    assert top.values.shape == (3, 4) and top.layer == layer
    np.testing.assert_allclose(filters, brute_nf(top, images, STRIDE, RF, ORIGIN), rtol=1e-5, atol=1e-6)
    again = invoke("nf", folder / "net.onnx", *common, "--from-top", tmp_path / "nf", "--out", tmp_path / "again")
    assert again.exit_code == 0, again.output
    with np.load(tmp_path / "again" / "decoded.npz") as data:
        assert np.array_equal(data["filters"], filters)


def test_cli_nf_from_top_of_another_layer_is_one_line(cli_files, padded, tmp_path):
    folder, layer = cli_files
    _, model, _, images = padded
    first = next(n.output[0] for n in model.nodes if n.op_type == "Conv")
    fd.save_top(fd.capture_top(model, first, ArrayImages(images), top=2), tmp_path / "top")
    result = invoke("nf", folder / "net.onnx", "--layer", layer, "--images", folder / "images.npy",
                    "--from-top", tmp_path / "top", "--out", tmp_path / "out")
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and first in lines[0], result.output
    assert not (tmp_path / "out").exists()


def test_nf_of_another_image_set_is_refused(padded):
    _, model, layer, images = padded
    top = fd.capture_top(model, layer, ArrayImages(images), top=2)
    with pytest.raises(fd.FdsubError, match="captured on 9 images but the image set has 4"):
        fd.neuron_feature(model, top, ArrayImages(images[:4]))


def test_nf_of_other_images_of_the_same_count_is_refused(padded, tmp_path):
    """Images named otherwise than the top-N's (another folder, another built-in set) are refused, not averaged;
    the same files reached by another path are the same images."""
    _, model, layer, _ = padded
    shape = tuple(model.input_shape[1:])
    glyphs = fd.open_images("builtin:glyphs:6", shape)
    top = fd.capture_top(model, layer, glyphs, top=2)
    with pytest.raises(fd.FdsubError, match=r"captured on other images: image 0 is 'builtin:glyphs\[0\]' there, "
                                            r"'builtin:gratings\[0\]' here"):
        fd.neuron_feature(model, top, fd.open_images("builtin:gratings:6", shape))
    pictures = np.random.default_rng(5).integers(0, 256, (6, 12, 12, 3), dtype=np.uint8)
    for name, prefix in (("a", ""), ("b", "b")):
        (tmp_path / name).mkdir()
        for i, picture in enumerate(pictures):
            Image.fromarray(picture).save(tmp_path / name / f"{prefix}{i}.png")
    folder_top = fd.capture_top(model, layer, fd.open_images(str(tmp_path / "a"), shape), top=2)
    same = fd.open_images(str(tmp_path / "b" / ".." / "a"), shape)
    assert fd.neuron_feature(model, folder_top, same).filters.shape[0] == len(folder_top.neurons)
    with pytest.raises(fd.FdsubError, match=r"captured on other images: image 0 is '.*/0.png' there, '.*/b0.png'"):
        fd.neuron_feature(model, folder_top, fd.open_images(str(tmp_path / "b"), shape))
