"""Resize and ConvTranspose through the adjoint route: after an upsampling a neuron's filter depends on the phase
of its output position; decoded at each position, it satisfies the identity against onnxruntime there
(nearest, linear and cubic, integer and non-integer scales, sizes; strided, padded, grouped, dilated
transposed convolutions with output padding)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from checks import assert_identity, random_images
from netgen import NetBuilder, run_ort
from zoo import linearized

import fdsub_onnx as fd


def _resize(b: NetBuilder, x: str, scale=None, sizes=None, **attrs) -> str:
    c, h, w = b.shapes[x]
    roi = b._const(b._fresh("roi"), np.zeros(0, np.float32))
    if sizes is not None:
        out = tuple(sizes)
        inputs = [x, roi, "", b._const(b._fresh("sizes"), np.array([1, c, *out], np.int64))]
    else:
        out = (math.floor(h * scale[0]), math.floor(w * scale[1]))
        inputs = [x, roi, b._const(b._fresh("scales"), np.array([1, 1, *scale], np.float32))]
    return b._node("Resize", inputs, (c, *out), **attrs)


def _conv_transpose(b: NetBuilder, x: str, out_ch: int, kernel, stride, pads=(0, 0, 0, 0), output_padding=(0, 0),
                    dilation=(1, 1), group=1, **extra) -> str:
    c, h, w = b.shapes[x]
    weight = b._const(b._fresh("wt"), b.rng.standard_normal((c, out_ch // group, *kernel)).astype(np.float32) * 0.3)
    bias = b._const(b._fresh("bt"), b.rng.standard_normal(out_ch).astype(np.float32) * 0.1)
    size = tuple((n - 1) * s - pads[a] - pads[a + 2] + (k - 1) * d + 1 + op
                 for a, (n, s, k, d, op) in enumerate(zip((h, w), stride, kernel, dilation, output_padding)))
    if "output_shape" in extra:
        size = tuple(extra["output_shape"])
    elif extra.get("auto_pad", "").startswith("SAME"):
        size = (h * stride[0], w * stride[1])
    attrs = dict(kernel_shape=list(kernel), strides=list(stride), dilations=list(dilation), group=group,
                 output_padding=list(output_padding), **extra)
    if "output_shape" not in extra and "auto_pad" not in extra:
        attrs["pads"] = list(pads)
    return b._node("ConvTranspose", [x, weight, bias], (out_ch, *size), layer=True, **attrs)


UPSAMPLINGS = {
    "nearest_asymmetric_x2": lambda b, x: _resize(b, x, (2.0, 2.0), mode="nearest",
                                                  coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
    "nearest_half_pixel_x1.5": lambda b, x: _resize(b, x, (1.5, 1.5), mode="nearest"),
    "linear_half_pixel_x2": lambda b, x: _resize(b, x, (2.0, 2.0), mode="linear"),
    "linear_align_corners_sizes": lambda b, x: _resize(b, x, sizes=(13, 11), mode="linear",
                                                       coordinate_transformation_mode="align_corners"),
    "linear_pytorch_x0.75_x2.5": lambda b, x: _resize(b, x, (0.75, 2.5), mode="linear",
                                                      coordinate_transformation_mode="pytorch_half_pixel"),
    "cubic_x2": lambda b, x: _resize(b, x, (2.0, 2.0), mode="cubic"),
    "convtranspose_s2_k3_p1_op1": lambda b, x: _conv_transpose(b, x, 4, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1)),
    "convtranspose_s3_k2": lambda b, x: _conv_transpose(b, x, 3, (2, 2), (3, 3)),
    "convtranspose_grouped_dilated": lambda b, x: _conv_transpose(b, x, 4, (3, 2), (2, 1), (0, 1, 1, 0), (1, 0),
                                                                  dilation=(2, 1), group=2),
    "convtranspose_output_shape": lambda b, x: _conv_transpose(b, x, 2, (4, 4), (2, 2), output_shape=(15, 16)),
    "convtranspose_same_upper": lambda b, x: _conv_transpose(b, x, 2, (3, 3), (2, 2), auto_pad="SAME_UPPER"),
}


def _net(case: str):
    """conv 3x3 (pad 1) -> ReLU -> the upsampling -> conv 3x3 (pad 1): the last conv, and the upsampling's output."""
    b = NetBuilder(height=8, width=7, seed=hash(case) % 1000)
    x = b.relu(b.conv("input", 4, 3, 1, (1, 1, 1, 1)))
    up = UPSAMPLINGS[case](b, x)
    last = b.conv(up, 3, 3, 1, (1, 1, 1, 1))
    return b.build([last, up]), last, up


def _positions(size) -> list[tuple[int, int]]:
    """Every phase near the centre, and the corners."""
    qy, qx = size
    near = [(y, x) for y in range(max(0, qy // 2 - 3), min(qy, qy // 2 + 3))
            for x in range(max(0, qx // 2 - 3), min(qx, qx // 2 + 3))]
    return sorted(set(near) | {(0, 0), (qy - 1, qx - 1), (0, qx - 1), (qy - 1, 0)})


@pytest.mark.parametrize("case", sorted(UPSAMPLINGS))
def test_per_position_identity_at_every_phase(case, load):
    proto, last, up = _net(case)
    model = load(proto)
    layers = {layer.name: layer for layer in fd.inspect_model(model).layers}
    assert layers[last].decodable and layers[last].per_position, layers[last]
    images = random_images(model, 3, seed=11)
    acts = run_ort(linearized(proto, {}, {}), images, [last, up])
    size = acts[last].shape[2:]
    for q in _positions(size):
        decoded = fd.decode(model, last, dtype="float64", position=q)
        assert decoded.plan.route == "adjoint" and decoded.exact_at == "position" and decoded.position == q
        assert tuple(decoded.stride) == (0, 0)
        assert_identity(decoded, acts[last], images, rtol=1e-5)
    if up in layers:  # a ConvTranspose is a layer itself
        for q in _positions(acts[up].shape[2:])[:6]:
            assert_identity(fd.decode(model, up, dtype="float64", position=q), acts[up], images, rtol=1e-5)


@pytest.mark.parametrize("case", ["nearest_asymmetric_x2", "convtranspose_s2_k3_p1_op1"])
def test_phases_differ(case, load):
    """Neighbouring positions of different phase have different filters: one filter per channel could not hold."""
    proto, last, _ = _net(case)
    model = load(proto)
    placed = []
    for q in ((6, 6), (7, 6)):
        d = fd.decode(model, last, dtype="float64", position=q, neurons=0)
        image = np.zeros((3, 64, 64))  # the filter at its place in image coordinates
        (y, x), (ry, rx) = d.origin, d.filters.shape[2:]
        image[:, y : y + ry, x : x + rx] = d.filters[0]
        placed.append(image)
    a, b = placed
    assert min(np.abs(a - np.roll(b, dy, axis=1)).max() for dy in range(-3, 4)) > 1e-3 * np.abs(a).max()


def test_resize_of_channels_is_refused(load):
    b = NetBuilder(height=6, width=6)
    x = b.conv("input", 4, 3)
    roi = b._const("roi", np.zeros(0, np.float32))
    scales = b._const("scales", np.array([1, 2, 1, 1], np.float32))
    up = b._node("Resize", [x, roi, scales], (8, 4, 4), mode="nearest")
    last = b.conv(up, 2, 1)
    model = load(b.build([last]))
    with pytest.raises(fd.FdsubError, match="resizes the batch or channel axis"):
        fd.decode(model, last)


def _after_resize(b: NetBuilder, tail):
    x = b.conv("input", 4, 3, 1, (1, 1, 1, 1))
    up = _resize(b, x, (2.0, 2.0), mode="nearest")
    return b.conv(tail(b, up), 2, 3, 1, (1, 1, 1, 1))


def test_a_gather_of_channels_after_an_upsampling_decodes_per_position(load):
    """Gather with constant indices is linear: the adjoint reads it (it refused it before)."""
    b = NetBuilder(height=6, width=7, seed=3)

    def tail(b, up):
        c, h, w = b.shapes[up]
        return b._node("Gather", [up, b._const("picked", np.array([3, 0, 2], np.int64))], (3, h, w), axis=1)

    last = _after_resize(b, tail)
    proto = b.build([last])
    model = load(proto)
    assert {lay.name: lay for lay in fd.inspect_model(model).layers}[last].per_position
    images = random_images(model, 3, seed=2)
    acts = run_ort(linearized(proto, {}, {}), images, [last])[last]
    for q in [(5, 6), (6, 7)]:
        assert_identity(fd.decode(model, last, dtype="float64", position=q), acts, images, rtol=1e-5)


def test_inspect_does_not_promise_what_the_adjoint_refuses(load):
    """A product of two maps after an upsampling has no data-free rule: inspect says so (it listed the layer as
    decodable per position, and decode then refused it)."""
    b = NetBuilder(height=6, width=7, seed=4)

    def tail(b, up):
        left, right = b.conv(up, 4, 1), b.conv(up, 4, 1)
        return b._node("Mul", [left, right], b.shapes[left])

    last = _after_resize(b, tail)
    model = load(b.build([last]))
    layer = {lay.name: lay for lay in fd.inspect_model(model).layers}[last]
    assert not layer.decodable and not layer.per_position
    assert "no data-free backward rule for Mul" in layer.reason
    with pytest.raises(fd.FdsubError, match="Mul"):
        fd.decode(model, last)
