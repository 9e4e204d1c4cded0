"""Test helpers: the weights identity of METHOD.md, checked on interior output positions.

For a decoded neuron k at output position q = (qy, qx) whose receptive field
``[O + q*S, O + q*S + R)`` (per axis) lies inside the image::

    activation[n, k, qy, qx] == sum(filters[k] * patch(image n, q)) + bias[k]
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view

import fdsub_onnx


def load_proto(proto: onnx.ModelProto, folder, input_shape=None) -> fdsub_onnx.Model:
    """Save ``proto`` as ``folder``/model.onnx and load it with the library."""
    path = os.path.join(os.fspath(folder), "model.onnx")
    onnx.save(proto, path)
    return fdsub_onnx.load_model(path, input_shape=input_shape)


def random_images(model: fdsub_onnx.Model, count: int = 3, seed: int = 0) -> np.ndarray:
    """``count`` standard-normal float32 images of the model's input shape."""
    _, c, h, w = model.input_shape
    return np.random.default_rng(seed).standard_normal((count, c, h, w)).astype(np.float32)


def interior(decoded: fdsub_onnx.Decoded, image_size, out_size) -> tuple[np.ndarray, np.ndarray]:
    """Per axis, a boolean mask over output positions whose receptive field lies in the image."""
    masks = []
    for a in range(2):
        lo, hi = 0, image_size[a]
        if decoded.bounds is not None:  # after a crop, only the kept span holds genuine values
            lo, hi = max(lo, decoded.bounds[a][0]), min(hi, decoded.bounds[a][1])
        start = decoded.origin[a] + np.arange(out_size[a]) * decoded.stride[a]
        masks.append((start >= lo) & (start + decoded.filters.shape[2 + a] <= hi))
    return masks[0], masks[1]


def predict(decoded: fdsub_onnx.Decoded, images: np.ndarray, out_size=None) -> tuple[np.ndarray, np.ndarray]:
    """``sum(filters * patch) + bias`` at every interior output position, in float64.

    Returns predictions [N, K, Q_y, Q_x] (NaN outside the interior) and the interior mask
    [Q_y, Q_x]. ``out_size`` defaults to the smallest grid holding every interior position.
    """
    images = np.asarray(images, dtype=np.float64)
    filters = np.asarray(decoded.filters, dtype=np.float64)
    bias = np.asarray(decoded.bias, dtype=np.float64)
    (sy, sx), (oy, ox), (ry, rx) = decoded.stride, decoded.origin, filters.shape[2:]
    h, w = images.shape[2:]
    if out_size is None:
        out_size = (max(0, (h - ry - oy) // sy + 1), max(0, (w - rx - ox) // sx + 1))
    in_y, in_x = interior(decoded, (h, w), out_size)
    pred = np.full((images.shape[0], filters.shape[0], *out_size), np.nan)
    mask = in_y[:, None] & in_x[None, :]
    if mask.any():
        qy, qx = np.flatnonzero(in_y), np.flatnonzero(in_x)
        windows = sliding_window_view(images, (ry, rx), axis=(2, 3))  # [N, C, H-ry+1, W-rx+1, ry, rx]
        patches = windows[:, :, (oy + qy * sy)[:, None], (ox + qx * sx)[None, :]]  # [N, C, qy, qx, ry, rx]
        values = np.tensordot(patches, filters, axes=([1, 4, 5], [1, 2, 3]))  # [N, qy, qx, K]
        pred[:, :, qy[:, None], qx[None, :]] = values.transpose(0, 3, 1, 2) + bias[None, :, None, None]
    return pred, mask


def assert_identity(
    decoded: fdsub_onnx.Decoded, activation: np.ndarray, images: np.ndarray, rtol: float, atol: float = 1e-9
) -> float:
    """Assert the weights identity on every interior position; return the relative error.

    ``activation`` is the whole layer's output [N, C, H, W] (or [N, C] for a fully
    connected layer); its channels ``decoded.neurons`` are compared. Fails when there
    is no interior position, so a check that compares nothing cannot pass.
    """
    act = np.asarray(activation, dtype=np.float64)
    if act.ndim == 2:
        act = act[:, :, None, None]
    assert act.ndim == 4 and act.shape[0] == len(images), f"activation shape {act.shape} for {len(images)} images"
    assert len(decoded.neurons) > 0 and decoded.filters.shape[0] == len(decoded.neurons) == len(decoded.bias), (
        f"{decoded.layer}: {len(decoded.neurons)} neurons, filters {decoded.filters.shape}, bias {decoded.bias.shape}"
    )
    act = act[:, np.asarray(decoded.neurons)]
    pred, mask = predict(decoded, images, act.shape[2:])
    assert mask.any(), (
        f"{decoded.layer}: no interior output position (image {images.shape[2:]}, output {act.shape[2:]}, "
        f"stride {decoded.stride}, origin {decoded.origin}, receptive field {decoded.filters.shape[2:]})"
    )
    got, want = pred[:, :, mask], act[:, :, mask]
    assert np.isfinite(got).all(), f"{decoded.layer}: non-finite prediction"
    err = np.abs(got - want)
    scale = float(np.abs(want).max())
    worst = np.unravel_index(int(np.argmax(err)), err.shape)
    assert err.max() <= rtol * scale + atol, (
        f"{decoded.layer}: weights identity broken, max |pred - act| = {err.max():.3e} > {rtol:g} * max|act| "
        f"({scale:.3e}) at image {worst[0]}, neuron {decoded.neurons[worst[1]]}: "
        f"pred {got[worst]:.6g} vs act {want[worst]:.6g} "
        f"({int(mask.sum())} interior positions)"
    )
    return float(err.max() / scale) if scale else float(err.max())
