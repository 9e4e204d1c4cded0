"""The `weights` identity (docs/method.md, property 1): on linear networks, every interior neuron's
response equals <decoded filter, image patch> + bias, checked against onnxruntime."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
from checks import assert_identity, interior, load_proto, random_images
from hypothesis import assume, given
from netgen import NetBuilder, linear_zoo, random_linear_dag, run_ort

import fdsub_onnx as fd


@functools.cache
def linear_cases() -> dict:
    return dict(linear_zoo())


LINEAR = list(linear_cases())
KERNEL_CASES = [
    "depthwise_grouped", "channel_shuffle", "concat_receptive_fields", "residual_projection", "dilation2",
    "auto_pad_same_lower", "sum3",
]
SUBSET_CASES = [
    "residual_projection", "depthwise_grouped", "channel_shuffle", "concat_receptive_fields", "batchnorm", "sum3",
]


def decodable_layers(model) -> list[str]:
    return [layer.name for layer in fd.inspect_model(model).layers if layer.decodable]


def has_interior(decoded, model, name) -> bool:
    """Whether some output position of ``name`` has its receptive field inside the image."""
    shape = model.shapes[name]
    in_y, in_x = interior(decoded, model.input_shape[2:], shape[2:] if len(shape) == 4 else (1, 1))
    return bool(in_y.any() and in_x.any())


def test_linear_zoo_is_not_empty():
    assert len(LINEAR) >= 10, LINEAR
    assert set(KERNEL_CASES) <= set(LINEAR)


@pytest.mark.parametrize("case", LINEAR)
def test_linear_zoo_layers_all_decodable(case, load):
    summary = fd.inspect_model(load(linear_cases()[case]))
    assert summary.layers, f"{case}: inspect lists no layer"
    blocked = [(layer.name, layer.reason) for layer in summary.layers if not layer.decodable]
    assert not blocked, f"{case}: layers not decodable: {blocked}"
    for layer in summary.layers:
        assert layer.receptive_field is not None and min(layer.receptive_field) >= 1, layer
        assert layer.stride is not None and min(layer.stride) >= 1, layer


@pytest.mark.parametrize("dtype, rtol", [("float64", 1e-5), ("float32", 1e-4)])
@pytest.mark.parametrize("case", LINEAR)
def test_linear_zoo_identity(case, dtype, rtol, load):
    proto = linear_cases()[case]
    model = load(proto)
    layers = decodable_layers(model)
    assert layers, f"{case}: no decodable layer"
    images = random_images(model, 3, seed=1)
    acts = run_ort(proto, images, layers)
    checked = []
    for name in layers:
        decoded = fd.decode(model, name, dtype=dtype)
        assert decoded.filters.dtype == np.dtype(dtype), (name, decoded.filters.dtype)
        if has_interior(decoded, model, name):  # else every neuron of the layer reads padding
            assert_identity(decoded, acts[name], images, rtol=rtol)
            checked.append(name)
    assert checked, f"{case}: no layer has an interior output position"


@given(random_linear_dag())
def test_random_dag_identity(load, proto):
    model = load(proto)
    images = random_images(model, 2, seed=2)
    outputs = [o.name for o in proto.graph.output]
    # every graph output (every layer and the last tensor) that is decodable and has interior positions
    targets = []
    for name in outputs:
        try:
            decoded = fd.decode(model, name, dtype="float64")
        except fd.FdsubError:
            continue
        if has_interior(decoded, model, name):
            targets.append(decoded)
    assume(targets)
    acts = run_ort(proto, images, [d.layer for d in targets])
    for decoded in targets:
        assert_identity(decoded, acts[decoded.layer], images, rtol=1e-5)


@pytest.mark.parametrize("case", KERNEL_CASES)
def test_fast_and_reference_kernels_agree(case, load):
    model = load(linear_cases()[case])
    layers = decodable_layers(model)
    assert layers
    for name in layers:
        fast = fd.decode(model, name, dtype="float64", kernel="fast")
        ref = fd.decode(model, name, dtype="float64", kernel="reference")
        assert fast.filters.shape == ref.filters.shape, (name, fast.filters.shape, ref.filters.shape)
        assert (fast.stride, fast.origin) == (ref.stride, ref.origin)
        assert np.abs(ref.filters).max() > 0, f"{name}: reference filters are all zero"
        diff = max(np.abs(fast.filters - ref.filters).max(), np.abs(fast.bias - ref.bias).max())
        assert diff <= 1e-10, f"{case}/{name}: fast and reference kernels differ by {diff:.3e}"


@pytest.mark.parametrize("case", SUBSET_CASES)
def test_neuron_subset_equals_rows_of_full_decode(case, load):
    model = load(linear_cases()[case])
    layers = decodable_layers(model)
    assert layers
    for name in layers:
        full = fd.decode(model, name, dtype="float64")
        channels = full.filters.shape[0]
        picks = [channels - 1, 0, channels // 2]  # unordered on purpose: order is kept
        picks = list(dict.fromkeys(picks))
        part = fd.decode(model, name, neurons=picks, dtype="float64")
        assert list(part.neurons) == picks
        assert part.filters.shape == (len(picks), *full.filters.shape[1:])
        np.testing.assert_allclose(part.filters, full.filters[picks], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(part.bias, full.bias[picks], rtol=1e-12, atol=1e-14)
        assert (part.stride, part.origin) == (full.stride, full.origin)
        single = fd.decode(model, name, neurons=channels - 1, dtype="float64")
        np.testing.assert_allclose(single.filters[0], full.filters[channels - 1], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("case", LINEAR)
def test_iter_decode_equals_per_layer_decode(case, load):
    model = load(linear_cases()[case])
    layers = decodable_layers(model)
    together = list(fd.iter_decode(model, dtype="float64"))
    assert [d.layer for d in together] == layers
    for decoded in together:
        alone = fd.decode(model, decoded.layer, dtype="float64")
        assert list(decoded.neurons) == list(range(decoded.filters.shape[0]))
        assert (decoded.stride, decoded.origin) == (alone.stride, alone.origin)
        assert decoded.filters.shape == alone.filters.shape
        np.testing.assert_allclose(decoded.filters, alone.filters, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(decoded.bias, alone.bias, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("case", LINEAR)
def test_iter_decode_neurons_per_layer(case, load):
    """``neurons=`` per layer returns those rows (in the order asked) of the full decode, whether the layer is
    composed for them only (no other decoded layer reads it) or cut from its whole bank."""
    from fdsub_onnx.modes.decode import leaf_rows

    model = load(linear_cases()[case])
    layers = decodable_layers(model)
    full = {d.layer: d for d in fd.iter_decode(model, dtype="float64")}
    picks = {name: list(dict.fromkeys([full[name].filters.shape[0] - 1, 0])) for name in layers}
    assert leaf_rows(model, layers, picks)  # the deepest layer at least is composed for its rows only
    for decoded in fd.iter_decode(model, dtype="float64", neurons=picks):
        want = full[decoded.layer]
        assert list(decoded.neurons) == picks[decoded.layer]
        np.testing.assert_allclose(decoded.filters, want.filters[picks[decoded.layer]], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(decoded.bias, want.bias[picks[decoded.layer]], rtol=1e-12, atol=1e-14)


@pytest.fixture(scope="module")
def chain3(tmp_path_factory):
    """The last layer of chain3, its onnxruntime activations and the images."""
    proto = linear_cases()["chain3"]
    model = load_proto(proto, tmp_path_factory.mktemp("chain3"))
    layer = decodable_layers(model)[-1]
    images = random_images(model, 3, seed=3)
    return fd.decode(model, layer, dtype="float64"), run_ort(proto, images, [layer])[layer], images


def test_identity_holds_before_mutation(chain3):
    decoded, act, images = chain3
    assert assert_identity(decoded, act, images, rtol=1e-5) <= 1e-5


@pytest.mark.parametrize("where", ["centre", "corner"])
def test_identity_detects_a_perturbed_filter_value(chain3, where):
    decoded, act, images = chain3
    filters = decoded.filters.copy()
    ry, rx = filters.shape[2:]
    y, x = (ry // 2, rx // 2) if where == "centre" else (0, rx - 1)
    filters[0, 1, y, x] += 1e-3 * np.abs(filters).max()
    with pytest.raises(AssertionError, match="weights identity broken"):
        assert_identity(dataclasses.replace(decoded, filters=filters), act, images, rtol=1e-5)


def test_identity_detects_a_wrong_bias(chain3):
    decoded, act, images = chain3
    bias = decoded.bias.copy()
    bias[-1] += 1e-3 * np.abs(act).max()
    with pytest.raises(AssertionError, match="weights identity broken"):
        assert_identity(dataclasses.replace(decoded, bias=bias), act, images, rtol=1e-5)


@pytest.mark.parametrize("shift", [(1, 0), (0, -1)])
def test_identity_detects_a_shifted_origin(chain3, shift):
    decoded, act, images = chain3
    origin = (decoded.origin[0] + shift[0], decoded.origin[1] + shift[1])
    with pytest.raises(AssertionError, match="weights identity broken"):
        assert_identity(dataclasses.replace(decoded, origin=origin), act, images, rtol=1e-5)


def test_identity_fails_when_nothing_is_interior(chain3):
    decoded, act, images = chain3
    with pytest.raises(AssertionError, match="no interior output position"):
        assert_identity(dataclasses.replace(decoded, origin=(-1000, 0)), act, images, rtol=1e-5)


def _fully_connected_net(kind: str):
    """conv (VALID, non-square map) -> flatten -> fully connected: (proto, FC node output, output with bias)."""
    b = NetBuilder(height=10, width=14, seed=11)
    x = b.conv("input", 4, 3, 2)  # [4, 4, 6], receptive field 9 x 13: fits the image
    c, h, w = b.shapes[x]
    rng = np.random.default_rng(12)
    k = 5
    if kind == "gap_gemm":
        x = b.global_avgpool(x)
        h = w = 1
    if kind == "matmul":
        flat = b._node("Reshape", [x, b._const("flat_shape", np.array([1, -1], np.int64))], (c * h * w, 1, 1))
        weight = b._const("fc_w", rng.standard_normal((c * h * w, k)).astype(np.float32))
        fc = b._node("MatMul", [flat, weight], (k, 1, 1))
        out = b._node("Add", [fc, b._const("fc_b", rng.standard_normal(k).astype(np.float32))], (k, 1, 1))
    else:
        flat = b._node("Flatten", [x], (c * h * w, 1, 1), axis=1)
        weight = b._const("fc_w", rng.standard_normal((k, c * h * w)).astype(np.float32))
        bias = b._const("fc_b", rng.standard_normal(k).astype(np.float32))
        fc = out = b._node("Gemm", [flat, weight, bias], (k, 1, 1), transB=1, alpha=0.5, beta=2.0)
    b._node("Reshape", [out, b._const("as_map", np.array([1, k, 1, 1], np.int64))], (k, 1, 1))
    return b.build([b.last]), fc, out


@pytest.mark.parametrize("kind", ["gemm", "matmul", "gap_gemm"])
def test_fully_connected_identity(kind, load):
    proto, fc, out = _fully_connected_net(kind)
    model = load(proto)
    layers = {layer.name: layer for layer in fd.inspect_model(model).layers}
    assert fc in layers and layers[fc].decodable, layers.get(fc)
    images = random_images(model, 3, seed=13)
    acts = run_ort(proto, images, [out])
    assert acts[out].shape == (3, 5)
    decoded = fd.decode(model, out, dtype="float64")
    assert decoded.filters.shape == (5, 3, 9, 13)
    assert_identity(decoded, acts[out], images, rtol=1e-5)


def _deep_convs(size: int):
    """Three 5x5 convs, no bias: a 13 x 13 receptive field, larger than a small image (the result is cropped)."""
    b = NetBuilder(height=size, width=size, seed=3)
    x = "input"
    for _ in range(3):
        x = b.conv(x, 4, (5, 5), pads=(2, 2, 2, 2), bias=False)
    return b.build(), x


@pytest.mark.parametrize("size, view", [(6, True), (2, False)])
def test_cropped_result_is_a_view_of_its_bank_when_it_keeps_most_of_it(size, view, load):
    """A bottom-up result cropped to the image holds the filters' part that can meet a pixel: a view of the bank
    where that part is at least half of it (``decode.CROP_VIEW_SHARE``: 11 of 13 rows and columns on a 6 px image,
    72%: no copy, no fresh memory), a compact copy where it is less (3 of 13 on a 2 px image, 5%: the rest is
    freed with the bank); the same filters either way as the uncropped ones of a larger image."""
    proto, name = _deep_convs(32)
    whole = fd.decode(load(proto), name, position="interior", route="bottom-up")
    assert whole.filters.shape[2:] == (13, 13) and whole.crop == (0, 0)
    proto, name = _deep_convs(size)
    cropped = fd.decode(load(proto), name, position="interior", route="bottom-up")
    (cy, cx), (h, w) = cropped.crop, cropped.filters.shape[2:]
    assert (h, w) == ((11, 11) if size == 6 else (3, 3)) and tuple(cropped.field) == (13, 13)
    np.testing.assert_array_equal(cropped.filters, whole.filters[:, :, cy : cy + h, cx : cx + w])
    is_view = cropped.filters.base is not None and not cropped.filters.flags.c_contiguous
    assert is_view == view, (cropped.filters.flags, cropped.filters.base is not None)
