"""Receptive-field geometry (docs/method.md, property 3): stride S, receptive field R and origin O
reported by ``inspect_model`` match the pixels that actually reach each neuron in onnxruntime.

The impulse probe: a network with positive weights gets one image per pixel (a one-hot
on channel 0); an output neuron changed by a pixel reads that pixel. For an interior
neuron at q, the changed pixels span exactly ``[O + q*S, O + q*S + R)`` per axis; for
any neuron, they never fall outside that window.
"""

from __future__ import annotations

import numpy as np
import pytest
from netgen import NetBuilder, run_ort

import fdsub_onnx as fd
from fdsub_onnx.errors import NotDecodable
from fdsub_onnx.graph.geometry import resolve_pads

IMPULSE = 1e3  # large enough that far taps survive float32 rounding, harmless in positive nets


def _strided(b):
    x = b.conv("input", 6, 3, 2, (1, 1, 1, 1))
    x = b.conv(x, 6, 3, 1, (1, 1, 1, 1))
    b.conv(x, 4, 3, 2)


def _dilated(b):
    x = b.conv("input", 6, 3, dilation=2)
    x = b.conv(x, 6, 3, 2, (1, 1, 1, 1), dilation=2)
    b.maxpool(x, 2, 1, dilation=2)


def _asymmetric_pads(b):
    x = b.conv("input", 6, 3, 1, (1, 0, 2, 1))
    x = b.avgpool(x, 3, 2, (1, 0, 2, 1))
    b.conv(x, 4, 2, 1, (0, 1, 1, 0))


def _auto_pad(mode):
    def build(b):
        x = b.conv("input", 6, 3, 2, auto_pad=mode)
        x = b.conv(x, 6, 4, 1, auto_pad=mode)  # even kernel: SAME_UPPER and SAME_LOWER differ
        x = b.conv(x, 6, 5, 2, auto_pad=mode)
        b.avgpool(x, 3, 2, auto_pad=mode)

    return build


def _ceil_mode_pools(b):
    x = b.conv("input", 4, 3, 1, (1, 1, 1, 1))
    x = b.maxpool(x, 3, 2, (1, 0, 1, 1), ceil_mode=1)
    x = b.avgpool(x, 2, 2, ceil_mode=1, count_include_pad=1)
    b.conv(x, 4, 3)


def _relu_maxpool(b):
    x = b.maxpool(b.relu(b.conv("input", 6, 3, 1, (1, 1, 1, 1))), 2, 2)
    x = b.relu(b.batchnorm(b.conv(x, 6, 3)))
    b.maxpool(x, 3, 2, (1, 1, 1, 1))


def _branches(b):
    x = b.relu(b.conv("input", 4, 3, 1, (1, 1, 1, 1)))
    cat = b.concat([b.conv(x, 4, 1), b.conv(x, 4, 3, 1, (1, 1, 1, 1)), b.conv(x, 4, 5, 1, (4, 4, 4, 4), dilation=2)])
    y = b.conv(cat, 6, 3, 2)
    z = b.add(y, b.conv(b.avgpool(x, 3, 2), 6, 1))
    b.conv(b.affine_const(b.affine_const(z, "Mul"), "Div"), 4, 3)


def _pad_op(b):
    x = b.conv(b.pad("input", (1, 2, 0, 1)), 6, 3)
    x = b.affine_const(x, "Add")
    b.conv(b.pad(x, (2, 0, 1, 1)), 4, 3, 2)


def _non_square(b):
    x = b.conv("input", 6, (1, 3))
    x = b.conv(x, 6, (5, 2), (1, 2))
    b.maxpool(x, (2, 3), (2, 1), (0, 1, 1, 1))


def _resnet_stem(b):
    x = b.relu(b.batchnorm(b.conv("input", 8, 7, 2, (3, 3, 3, 3))))
    x = b.maxpool(x, 3, 2, (1, 1, 1, 1))
    y = b.relu(b.conv(x, 8, 3, 1, (1, 1, 1, 1)))
    b.relu(b.add(x, b.conv(y, 8, 3, 1, (1, 1, 1, 1))))
    b.conv(b.last, 8, 1, 2)


NETS = {
    "strided": (_strided, 20, 20),
    "dilated": (_dilated, 22, 22),
    "asymmetric_pads": (_asymmetric_pads, 20, 18),
    "auto_pad_same_upper": (_auto_pad("SAME_UPPER"), 32, 32),
    "auto_pad_same_lower": (_auto_pad("SAME_LOWER"), 32, 32),
    "auto_pad_valid": (_auto_pad("VALID"), 32, 32),
    "ceil_mode_pools": (_ceil_mode_pools, 19, 19),
    "relu_maxpool": (_relu_maxpool, 24, 24),
    "branches": (_branches, 20, 20),
    "pad_op": (_pad_op, 18, 18),
    "non_square": (_non_square, 12, 20),
    "resnet_stem": (_resnet_stem, 32, 32),
}


def positive_net(name: str, channels: int = 2):
    """(dynamic-shape proto with positive weights, static input shape) of net ``name``."""
    build, h, w = NETS[name]
    b = NetBuilder(in_channels=channels, height=h, width=w, seed=7, dynamic=True, positive=True)
    build(b)
    return b.build([*b.layers, b.last]), (1, channels, h, w)


def impulse_response(proto, shape, names):
    """For each tensor: which output neurons each pixel changes, [H, W, K, Q_y, Q_x] booleans."""
    _, c, h, w = shape
    images = np.zeros((h * w + 1, c, h, w), np.float32)
    images[np.arange(h * w), 0, np.repeat(np.arange(h), w), np.tile(np.arange(w), h)] = IMPULSE
    acts = run_ort(proto, images, names)
    out = {}
    for name, act in acts.items():
        act = act if act.ndim == 4 else act[:, :, None, None]
        assert np.isfinite(act).all(), name
        out[name] = (act[:-1] != act[-1]).reshape(h, w, *act.shape[1:])
    return out


def boxes(changed):
    """First and last changed pixel per axis for every neuron: ([K,Qy,Qx] x4, any-changed mask)."""
    rows, cols = changed.any(axis=1), changed.any(axis=0)  # [H, K, Qy, Qx], [W, K, Qy, Qx]
    h, w = rows.shape[0], cols.shape[0]
    y0, y1 = rows.argmax(axis=0), h - 1 - rows[::-1].argmax(axis=0)
    x0, x1 = cols.argmax(axis=0), w - 1 - cols[::-1].argmax(axis=0)
    return (y0, y1, x0, x1), rows.any(axis=0)


@pytest.mark.parametrize("name", list(NETS))
def test_impulse_geometry(name, load):
    proto, shape = positive_net(name)
    model = load(proto, input_shape=shape)
    layers = fd.inspect_model(model).layers
    assert layers, name
    blocked = [(layer.name, layer.reason) for layer in layers if not layer.decodable]
    assert not blocked, blocked
    changed = impulse_response(proto, shape, [layer.name for layer in layers])
    h, w = shape[2:]
    for layer in layers:
        (sy, sx), (ry, rx), (oy, ox) = layer.stride, layer.receptive_field, layer.origin
        (y0, y1, x0, x1), hit = boxes(changed[layer.name])
        qy = np.arange(y0.shape[1])[None, :, None]
        qx = np.arange(y0.shape[2])[None, None, :]
        start_y, start_x = oy + qy * sy, ox + qx * sx
        inside = (start_y >= 0) & (start_y + ry <= h) & (start_x >= 0) & (start_x + rx <= w)
        inside = np.broadcast_to(inside, y0.shape)
        where = f"{name}/{layer.name} (S={layer.stride}, R={layer.receptive_field}, O={layer.origin})"
        assert inside.any(), f"{where}: no interior neuron on a {h}x{w} image"
        # interior neurons: every one is reached, and the reached pixels span the window exactly
        assert hit[inside].all(), f"{name}/{layer.name}: an interior neuron is reached by no pixel"
        ends = (("y0", y0, start_y), ("y1", y1, start_y + ry - 1), ("x0", x0, start_x), ("x1", x1, start_x + rx - 1))
        for axis, got, want in ends:
            want = np.broadcast_to(want, got.shape)
            bad = inside & (got != want)
            assert not bad.any(), (
                f"{where}: {int(bad.sum())} interior neurons have {axis} != expected, first at (k, qy, qx)="
                f"{tuple(int(v[0]) for v in np.nonzero(bad))}: got {got[bad][0]}, expected {want[bad][0]}"
            )
        # every neuron (border ones too): no pixel outside the window reaches it
        outside = hit & ((y0 < start_y) | (y1 > start_y + ry - 1) | (x0 < start_x) | (x1 > start_x + rx - 1))
        assert not outside.any(), f"{where}: pixels outside [O+qS, O+qS+R) reach {int(outside.sum())} neurons"


def test_impulse_probe_measures_the_hand_computed_extent():
    """The probe itself, without inspect: "strided" ends with S=4, R=11, O=-3 (worked by hand)."""
    proto, shape = positive_net("strided")
    last = proto.graph.output[-1].name
    (y0, y1, x0, x1), hit = boxes(impulse_response(proto, shape, [last])[last])
    q = np.arange(y0.shape[1])
    inside = (-3 + 4 * q >= 0) & (-3 + 4 * q + 11 <= 20)
    assert list(np.flatnonzero(inside)) == [1, 2, 3]
    sub = (slice(None), inside)
    assert hit[sub][:, :, inside].all()
    assert (y0[sub][:, :, inside] == (-3 + 4 * q[inside])[None, :, None]).all()
    assert (y1[sub][:, :, inside] - y0[sub][:, :, inside] + 1 == 11).all()
    assert (x1[sub][:, :, inside] - x0[sub][:, :, inside] + 1 == 11).all()


def _geometry(model):
    layers = fd.inspect_model(model).layers
    return {layer.name: (tuple(layer.stride), tuple(layer.receptive_field), tuple(layer.origin)) for layer in layers}


def test_hand_computed_geometry_stride_pad(load):
    b = NetBuilder(height=16, width=16)
    a = b.conv("input", 4, 3, 2, (1, 1, 1, 1))
    c = b.conv(a, 4, 3, 1, (1, 1, 1, 1))
    d = b.avgpool(c, 2, 2)
    e = b.conv(d, 4, 3, 1, (2, 0, 0, 1), dilation=(2, 1))
    geom = _geometry(load(b.build([a, c, d, e])))
    assert geom[a] == ((2, 2), (3, 3), (-1, -1))
    assert geom[c] == ((2, 2), (7, 7), (-3, -3))
    # avgpool k2 s2: R = 7 + 1*2 = 9, S = 4, O unchanged
    assert geom[d] == ((4, 4), (9, 9), (-3, -3))
    # conv (3,3) dilation (2,1), pads top 2 left 0: R = 9 + 2*2*4 = 25 (y), 9 + 2*1*4 = 17 (x); O = -3 - 2*4 = -11 (y)
    assert geom[e] == ((4, 4), (25, 17), (-11, -3))


def test_hand_computed_geometry_resnet_stem(load):
    b = NetBuilder(height=32, width=32)
    conv1 = b.conv("input", 8, 7, 2, (3, 3, 3, 3))
    pool = b.maxpool(b.relu(b.batchnorm(conv1)), 3, 2, (1, 1, 1, 1))
    geom = _geometry(load(b.build([conv1, pool])))
    assert geom[conv1] == ((2, 2), (7, 7), (-3, -3))
    assert geom[pool] == ((4, 4), (11, 11), (-5, -5))


@pytest.mark.parametrize("mode, origin", [("SAME_UPPER", 0), ("SAME_LOWER", -1), ("VALID", 0)])
def test_hand_computed_geometry_auto_pad(mode, origin, load):
    b = NetBuilder(height=8, width=8)
    a = b.conv("input", 4, 3, 2, auto_pad=mode)  # SAME: total pad 1 -> begin 0 (UPPER) or 1 (LOWER)
    geom = _geometry(load(b.build([a])))
    assert geom[a] == ((2, 2), (3, 3), (origin, origin))


def test_hand_computed_geometry_pad_op(load):
    b = NetBuilder(height=10, width=10)
    a = b.conv(b.pad("input", (1, 2, 0, 1)), 4, 3)  # pads top 1, left 2
    geom = _geometry(load(b.build([a])))
    assert geom[a] == ((1, 1), (3, 3), (-1, -2))


@pytest.mark.parametrize(
    "args, expected",
    [
        # SAME_UPPER, input 8, kernel 3, stride 2: output 4, total pad (4-1)*2+3-8 = 1 -> begin 0, end 1
        (((8, 8), (3, 3), (2, 2), (1, 1), (), "SAME_UPPER"), ((0, 0), (1, 1))),
        (((8, 8), (3, 3), (2, 2), (1, 1), (), "SAME_LOWER"), ((1, 1), (0, 0))),
        # input 5, kernel 4, stride 1: total 3 -> UPPER (1, 2), LOWER (2, 1)
        (((5, 5), (4, 4), (1, 1), (1, 1), (), "SAME_UPPER"), ((1, 1), (2, 2))),
        (((5, 5), (4, 4), (1, 1), (1, 1), (), "SAME_LOWER"), ((2, 2), (1, 1))),
        # dilation 2, kernel 3 (effective 5), input 10, stride 1: total 4 -> (2, 2)
        (((10, 10), (3, 3), (1, 1), (2, 2), (), "SAME_UPPER"), ((2, 2), (2, 2))),
        # stride larger than kernel: input 7, kernel 1, stride 3 -> output 3, total 2*3+1-7 = 0
        (((7, 7), (1, 1), (3, 3), (1, 1), (), "SAME_LOWER"), ((0, 0), (0, 0))),
        # per-axis: y (input 8, k 3, s 2) total 1; x (input 9, k 5, s 1) total 4
        (((8, 9), (3, 5), (2, 1), (1, 1), (), "SAME_UPPER"), ((0, 2), (1, 2))),
        (((8, 9), (3, 5), (2, 1), (1, 1), (7, 7, 7, 7), "VALID"), ((0, 0), (0, 0))),
        # explicit pads (ONNX order y_begin, x_begin, y_end, x_end)
        (((8, 8), (3, 3), (1, 1), (1, 1), (1, 2, 3, 4), "NOTSET"), ((1, 2), (3, 4))),
        (((8, 8), (3, 3), (1, 1), (1, 1), (1, 2, 3, 4), ""), ((1, 2), (3, 4))),
        (((8, 8), (3, 3), (1, 1), (1, 1), (), "NOTSET"), ((0, 0), (0, 0))),
    ],
)
def test_resolve_pads(args, expected):
    assert resolve_pads(*args) == expected


def test_resolve_pads_same_matches_onnx_output_size():
    """SAME pads give output ceil(n / s), the ONNX rule, for many sizes."""
    for n in range(1, 20):
        for k in range(1, 6):
            for s in range(1, 4):
                for d in (1, 2):
                    for mode in ("SAME_UPPER", "SAME_LOWER"):
                        (b, _), (e, _) = resolve_pads((n, n), (k, k), (s, s), (d, d), (), mode)
                        assert b >= 0 and e >= 0
                        out = (n + b + e - ((k - 1) * d + 1)) // s + 1
                        assert out == -(-n // s), (n, k, s, d, mode, b, e)
                        assert (e - b) in ((0, 1) if mode == "SAME_UPPER" else (0, -1)), (n, k, s, d, mode, b, e)


def test_resolve_pads_unknown_auto_pad():
    with pytest.raises(NotDecodable, match="SAME_MIDDLE"):
        resolve_pads((8, 8), (3, 3), (1, 1), (1, 1), (), "SAME_MIDDLE")
