"""Quantized copies of a float model made with onnxruntime.quantization, as models/build_modern_zoo.py makes them:
static QDQ or QOperator (per-channel int8 weights, uint8 activations, seeded random calibration images) or
dynamic (uint8 weights)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx


class RandomImages:
    """onnxruntime's CalibrationDataReader protocol over seeded random images."""

    def __init__(self, name: str, shape, count: int = 8, seed: int = 14):
        self.feeds = iter([{name: np.random.default_rng([seed, i]).standard_normal(shape, dtype=np.float32)}
                           for i in range(count)])

    def get_next(self):
        return next(self.feeds, None)


#: onnxruntime.quantization's formats: (the ops each writes, whether fdsub rewrites it to float at load)
QUANTIZED = {"qdq": ({"QuantizeLinear", "DequantizeLinear"}, False), "qop": ({"QLinearConv"}, True),
             "qdyn": ({"DynamicQuantizeLinear", "ConvInteger"}, True)}


def quantize(source: Path, target: Path, fmt: str) -> None:
    """Write ``source`` quantized in format ``fmt`` (a key of QUANTIZED) to ``target``."""
    from onnxruntime import quantization as q  # noqa: PLC0415 - imported only here: a heavy module

    inp = onnx.load(str(source), load_external_data=False).graph.input[0]
    shape = tuple(d.dim_value for d in inp.type.tensor_type.shape.dim)
    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(logging.ERROR)  # quiet "please consider pre-processing before quantization"
    try:
        if fmt == "qdyn":
            q.quantize_dynamic(str(source), str(target), weight_type=q.QuantType.QUInt8,
                               op_types_to_quantize=["Conv", "MatMul", "Gemm"])
        else:
            q.quantize_static(str(source), str(target), RandomImages(inp.name, shape),
                              quant_format=q.QuantFormat.QDQ if fmt == "qdq" else q.QuantFormat.QOperator,
                              per_channel=True, activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8)
    finally:
        root.setLevel(level)
