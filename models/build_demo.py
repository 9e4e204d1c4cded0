"""Build models/demo.onnx: a small deterministic 4-conv CNN on 3x64x64 images.

conv1 holds oriented Gabor-like edge filters (luminance and colour-opponent), so its
decoded filters look like the first layer of a trained network; conv2-conv4 are sparse
random combinations of a few lower channels along short lines, so their decoded filters
are composite edge patterns rather than noise. The batch dimension is dynamic.

    python models/build_demo.py            # writes models/demo.onnx
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SEED = 2024
OPSET = 13


def gabor(theta: float, phase: float, size: int = 7, sigma: float = 1.6, wavelength: float = 4.5) -> np.ndarray:
    """A size x size Gabor patch at orientation theta (radians), zero mean, unit max |value|."""
    r = np.arange(size) - (size - 1) / 2
    y, x = np.meshgrid(r, r, indexing="ij")
    u = x * np.cos(theta) + y * np.sin(theta)
    g = np.exp(-(x**2 + y**2) / (2 * sigma**2)) * np.cos(2 * np.pi * u / wavelength + phase)
    g -= g.mean()
    return g / np.abs(g).max()


def first_layer() -> np.ndarray:
    """16 filters [16, 3, 7, 7]: 12 luminance Gabors (6 orientations x even/odd) and 4 colour-opponent edges."""
    filters = []
    for i in range(6):
        theta = np.pi * i / 6
        for phase in (0.0, np.pi / 2):
            filters.append(np.stack([gabor(theta, phase)] * 3) / np.sqrt(3))
    red_green, blue_yellow = np.array([1.0, -1.0, 0.0]), np.array([-0.5, -0.5, 1.0])
    for colours in (red_green, blue_yellow):
        for theta in (0.0, np.pi / 2):
            filters.append(colours[:, None, None] * gabor(theta, np.pi / 2, wavelength=7.0))
    return np.stack(filters).astype(np.float32) * 0.5


def sparse_layer(rng: np.random.Generator, out_ch: int, in_ch: int, fan: int) -> np.ndarray:
    """[out_ch, in_ch, 3, 3]: each output sums `fan` input channels along a random short line, plus faint noise."""
    w = rng.normal(0.0, 0.02, (out_ch, in_ch, 3, 3))
    lines = [((0, 1), (1, 1), (2, 1)), ((1, 0), (1, 1), (1, 2)), ((0, 0), (1, 1), (2, 2)), ((0, 2), (1, 1), (2, 0)),
             ((0, 1), (1, 1), (1, 2)), ((1, 0), (1, 1), (2, 1))]
    for k in range(out_ch):
        for c in rng.choice(in_ch, size=fan, replace=False):
            sign = rng.choice([-1.0, 1.0], p=[0.3, 0.7])
            for i, j in lines[rng.integers(len(lines))]:
                w[k, c, i, j] += sign * rng.uniform(0.5, 1.0)
    return (w / np.sqrt(fan * 3)).astype(np.float32)


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(SEED)
    weights = {
        "conv1.weight": first_layer(),
        "conv2.weight": sparse_layer(rng, 32, 16, 2),
        "conv3.weight": sparse_layer(rng, 32, 32, 3),
        "conv4.weight": sparse_layer(rng, 64, 32, 3),
        "fc.weight": rng.normal(0.0, 0.1, (10, 64)).astype(np.float32),
    }
    for name, w in list(weights.items()):
        weights[name.replace("weight", "bias")] = rng.normal(0.0, 0.02, w.shape[0]).astype(np.float32)

    def conv(i, x, stride=1, pads=1):
        k = weights[f"conv{i}.weight"].shape[-1]
        return helper.make_node(
            "Conv", [x, f"conv{i}.weight", f"conv{i}.bias"], [f"conv{i}"], name=f"Conv_{i - 1}",
            kernel_shape=[k, k], strides=[stride, stride], pads=[pads] * 4,
        )

    nodes = [
        conv(1, "image", pads=3),
        helper.make_node("Relu", ["conv1"], ["relu1"], name="Relu_0"),
        helper.make_node("MaxPool", ["relu1"], ["pool1"], name="MaxPool_0", kernel_shape=[2, 2], strides=[2, 2]),
        conv(2, "pool1"),
        helper.make_node("Relu", ["conv2"], ["relu2"], name="Relu_1"),
        conv(3, "relu2", stride=2),
        helper.make_node("Relu", ["conv3"], ["relu3"], name="Relu_2"),
        conv(4, "relu3"),
        helper.make_node("Relu", ["conv4"], ["relu4"], name="Relu_3"),
        helper.make_node("GlobalAveragePool", ["relu4"], ["gap"], name="GlobalAveragePool_0"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="Flatten_0", axis=1),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="Gemm_0", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "fdsub-demo",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 64, 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(w, name) for name, w in weights.items()],
    )
    opsets = [helper.make_opsetid("", OPSET)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="fdsub-demo", ir_version=7)
    onnx.checker.check_model(model, full_check=True)
    return model


def main(path: str = str(Path(__file__).with_name("demo.onnx"))) -> None:
    onnx.save(build(), path)
    print(f"wrote {path} ({Path(path).stat().st_size} bytes)")


if __name__ == "__main__":
    main(*sys.argv[1:])
