"""Test helpers: the weights identity of docs/method.md, checked on interior output positions.

The comparison itself is the library's (``fdsub_onnx.evaluate.self_test.identity_error``, also run by
``fdsub check``); ``assert_identity`` turns it into an assertion with the worst position.

For a decoded neuron k at output position q = (qy, qx) whose receptive field
``[O + q*S, O + q*S + R)`` (per axis) lies inside the image::

    activation[n, k, qy, qx] == sum(filters[k] * patch(image n, q)) + bias[k]
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import fdsub_onnx
from fdsub_onnx.evaluate.self_test import identity_error


def load_proto(proto: onnx.ModelProto, folder, input_shape=None) -> fdsub_onnx.Model:
    """Save ``proto`` as ``folder``/model.onnx and load it with the library."""
    path = os.path.join(os.fspath(folder), "model.onnx")
    onnx.save(proto, path)
    return fdsub_onnx.load_model(path, input_shape=input_shape)


def save_proto(folder, name: str, proto: onnx.ModelProto):
    """Save ``proto`` as ``folder``/``name``; return the path."""
    path = folder / name
    onnx.save(proto, str(path))
    return path


def softmax_between_convs() -> onnx.ModelProto:
    """input -> Conv 'c1' -> Softmax (no rule) -> Conv 'c2': c2 is not decodable."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (4, 3, 3, 3)), ("w2", (2, 4, 3, 3)))]
    nodes = [
        helper.make_node("Conv", ["input", "w1"], ["c1"], name="conv_a", kernel_shape=[3, 3]),
        helper.make_node("Softmax", ["c1"], ["soft"], name="softmax", axis=1),
        helper.make_node("Conv", ["soft", "w2"], ["c2"], name="conv_b", kernel_shape=[3, 3]),
    ]
    image = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 12, 12])
    output = helper.make_tensor_value_info("c2", TensorProto.FLOAT, [1, 2, 8, 8])
    graph = helper.make_graph(nodes, "blocked", [image], [output], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    onnx.checker.check_model(model)
    return model


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


def assert_identity(
    decoded: fdsub_onnx.Decoded, activation: np.ndarray, images: np.ndarray, rtol: float, atol: float = 1e-9
) -> float:
    """Assert the weights identity on every interior position; return the relative error.

    ``activation`` is the whole layer's output [N, C, H, W] (or [N, C] for a fully
    connected layer); its channels ``decoded.neurons`` are compared. Fails when there
    is no interior position, so a check that compares nothing cannot pass.
    """
    act = np.asarray(activation)
    assert act.ndim in (2, 4) and act.shape[0] == len(images), f"activation shape {act.shape} for {len(images)} images"
    assert len(decoded.neurons) > 0 and decoded.filters.shape[0] == len(decoded.neurons) == len(decoded.bias), (
        f"{decoded.layer}: {len(decoded.neurons)} neurons, filters {decoded.filters.shape}, bias {decoded.bias.shape}"
    )
    result = identity_error(decoded, act, images)
    assert result.positions > 0, (
        f"{decoded.layer}: no interior output position (image {images.shape[2:]}, output {act.shape[2:]}, "
        f"stride {decoded.stride}, origin {decoded.origin}, receptive field {decoded.filters.shape[2:]})"
    )
    assert np.isfinite(result.max_abs), f"{decoded.layer}: non-finite prediction"
    image, neuron, pred, want = result.worst
    assert result.within(rtol, atol), (
        f"{decoded.layer}: weights identity broken, max |pred - act| = {result.max_abs:.3e} > {rtol:g} * max|act| "
        f"({result.scale:.3e}) at image {image}, neuron {neuron}: pred {pred:.6g} vs act {want:.6g} "
        f"({result.positions} interior positions)"
    )
    return result.relative


def assert_instance_identity(decoded: fdsub_onnx.Decoded, activation: np.ndarray, images: np.ndarray,
                             rtol: float) -> None:
    """The local identity of every top-N instance of a ``per_instance`` decode: activation ==
    sum(instance filter * patch) + instance bias, the patch cut from the zero-extended image at the window's
    corner, within ``rtol`` of max |activation|."""
    found, (ry, rx) = decoded.instances, decoded.receptive_field
    pad = max(ry, rx)
    padded = np.pad(np.asarray(images, np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    corner = decoded.geometry.corner(found.position) + pad
    scale = np.abs(activation).max()
    for k in range(len(decoded.neurons)):
        for n in range(found.top):
            if found.image_index[k, n] < 0:
                continue
            i, (y0, x0) = found.image_index[k, n], corner[k, n]
            pred = (decoded.instance_filters[k, n] * padded[i, :, y0:y0 + ry, x0:x0 + rx]).sum()
            pred += decoded.instance_bias[k, n]
            want = activation[i, decoded.neurons[k], found.position[k, n, 0], found.position[k, n, 1]]
            assert abs(pred - want) <= rtol * scale, (decoded.layer, k, n, pred, want)
