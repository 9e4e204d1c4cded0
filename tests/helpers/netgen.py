"""Small deterministic ONNX CNNs for tests, and a helper to run them in onnxruntime.

`NetBuilder` is a fluent wrapper over `onnx.helper`; `linear_zoo` / `relu_zoo` are canned
networks; `random_linear_dag` is a hypothesis strategy for random linear networks;
`run_ort` runs a model and returns any intermediate tensors.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

Pair = tuple[int, int]
Pads = tuple[int, int, int, int]  # ONNX 2-D order: top, left, bottom, right
Shape = tuple[int, int, int]  # channels, height, width (batch excluded)

AUTO_PADS = ("SAME_UPPER", "SAME_LOWER", "VALID")
AFFINE_OPS = ("Mul", "Add", "Sub", "Div")


def _pair(v: int | Sequence[int]) -> Pair:
    """Normalise an int or a 2-sequence to a pair of ints."""
    return (int(v), int(v)) if isinstance(v, (int, np.integer)) else (int(v[0]), int(v[1]))


def out_len(n: int, k: int, s: int, d: int, pb: int, pe: int,
            auto_pad: str | None = None, ceil_mode: int = 0) -> int:
    """Output length of a conv/pool along one axis, as onnxruntime computes it.

    Raises ValueError for sizes < 1, and for ceil_mode windows starting inside the end
    padding: onnxruntime drops such a window but ONNX shape inference keeps it.
    """
    ek = (k - 1) * d + 1
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return -(-n // s)
    if auto_pad == "VALID":
        pb = pe = 0
    num = n + pb + pe - ek
    if num < 0:
        raise ValueError(f"window {ek} larger than padded input {n + pb + pe}")
    out = (-(-num // s) if ceil_mode else num // s) + 1
    if ceil_mode and (out - 1) * s >= n + pb:
        raise ValueError("ceil_mode window starts in padding: onnxruntime and ONNX disagree")
    return out


class NetBuilder:
    """Fluent builder of a single-input float32 NCHW ONNX graph with deterministic weights.

    Every method returns the name of its output tensor; `shapes[name]` holds its static
    (C, H, W). With `positive=True` all weights/biases are drawn in [0.1, 1] (scaled).
    """

    def __init__(self, in_channels: int = 3, height: int = 16, width: int = 16, seed: int = 0,
                 opset: int = 13, dynamic: bool = False, positive: bool = False):
        if opset < 11:
            raise ValueError("NetBuilder needs opset >= 11 (Clip/Pad take inputs)")
        self.rng = np.random.default_rng(seed)
        self.opset, self.dynamic, self.positive = opset, dynamic, positive
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.shapes: dict[str, Shape] = {"input": (in_channels, height, width)}
        self.layers: list[str] = []
        self.last = "input"
        self._counter = 0

    # ---- bookkeeping -------------------------------------------------------------------
    def _fresh(self, prefix: str) -> str:
        self._counter += 1
        return f"{prefix}_{self._counter}"

    def _const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def _param(self, shape: Sequence[int], scale: float) -> np.ndarray:
        """Random float32 tensor: N(0,1) or, if positive, U[0.1, 1]; times scale."""
        v = self.rng.uniform(0.1, 1.0, shape) if self.positive else self.rng.standard_normal(shape)
        return (v * scale).astype(np.float32)

    def _magnitude(self, n: int) -> np.ndarray:
        """Per-channel values away from zero: U[0.5, 2], random sign unless positive."""
        v = self.rng.uniform(0.5, 2.0, n)
        if not self.positive:
            v *= self.rng.choice([-1.0, 1.0], n)
        return v.astype(np.float32)

    def _node(self, op: str, inputs: Sequence[str], shape: Shape, layer: bool = False,
              **attrs) -> str:
        """Append a node with one output of the given static shape; return its name."""
        out = self._fresh(op.lower())
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=out, **attrs))
        self.shapes[out] = shape
        if layer:
            self.layers.append(out)
        self.last = out
        return out

    def _window(self, x: str, kernel, stride, pads, dilation, auto_pad, ceil_mode=0
                ) -> tuple[tuple[int, int], dict]:
        """Spatial output size and ONNX attributes shared by Conv and the pools."""
        (kh, kw), (sh, sw), (dh, dw) = _pair(kernel), _pair(stride), _pair(dilation)
        pads = tuple(int(p) for p in pads)
        _, h, w = self.shapes[x]
        size = (out_len(h, kh, sh, dh, pads[0], pads[2], auto_pad, ceil_mode),
                out_len(w, kw, sw, dw, pads[1], pads[3], auto_pad, ceil_mode))
        attrs = dict(kernel_shape=[kh, kw], strides=[sh, sw])
        if auto_pad is None:
            attrs["pads"] = list(pads)
        else:
            if auto_pad not in AUTO_PADS:
                raise ValueError(f"auto_pad must be one of {AUTO_PADS}")
            if any(pads):
                raise ValueError("pads and auto_pad are exclusive")
            attrs["auto_pad"] = auto_pad
        return size, attrs

    # ---- convolution and pooling -------------------------------------------------------
    def conv(self, x: str, out_ch: int, kernel=(3, 3), stride=(1, 1), pads: Pads = (0, 0, 0, 0),
             dilation=(1, 1), groups: int = 1, auto_pad: str | None = None, bias: bool = True) -> str:
        c = self.shapes[x][0]
        if c % groups or out_ch % groups:
            raise ValueError(f"groups={groups} must divide in ({c}) and out ({out_ch}) channels")
        (h, w), attrs = self._window(x, kernel, stride, pads, dilation, auto_pad)
        kh, kw = attrs["kernel_shape"]
        fan_in = (c // groups) * kh * kw
        name = self._fresh("w")
        inputs = [x, self._const(name, self._param((out_ch, c // groups, kh, kw),
                                                   1 / math.sqrt(fan_in)))]
        if bias:
            inputs.append(self._const(name + "_b", self._param((out_ch,), 0.1)))
        return self._node("Conv", inputs, (out_ch, h, w), layer=True, dilations=list(_pair(dilation)),
                          group=groups, **attrs)

    def avgpool(self, x: str, kernel, stride, pads: Pads = (0, 0, 0, 0), ceil_mode: int = 0,
                count_include_pad: int = 0, auto_pad: str | None = None) -> str:
        (h, w), attrs = self._window(x, kernel, stride, pads, 1, auto_pad, ceil_mode)
        return self._node("AveragePool", [x], (self.shapes[x][0], h, w), layer=True,
                          ceil_mode=ceil_mode, count_include_pad=count_include_pad, **attrs)

    def maxpool(self, x: str, kernel, stride, pads: Pads = (0, 0, 0, 0), ceil_mode: int = 0,
                count_include_pad: int = 0, auto_pad: str | None = None, dilation=(1, 1)) -> str:
        """MaxPool; count_include_pad is accepted for symmetry with avgpool and ignored."""
        (h, w), attrs = self._window(x, kernel, stride, pads, dilation, auto_pad, ceil_mode)
        return self._node("MaxPool", [x], (self.shapes[x][0], h, w), layer=True,
                          ceil_mode=ceil_mode, dilations=list(_pair(dilation)), **attrs)

    def global_avgpool(self, x: str) -> str:
        return self._node("GlobalAveragePool", [x], (self.shapes[x][0], 1, 1), layer=True)

    # ---- per-channel affine ops --------------------------------------------------------
    def batchnorm(self, x: str) -> str:
        """BatchNormalization; if positive, mean is chosen so the folded bias stays > 0."""
        c, eps = self.shapes[x][0], 1e-5
        gamma = self.rng.uniform(0.5, 1.5, c).astype(np.float32)
        var = self.rng.uniform(0.5, 1.5, c).astype(np.float32)
        beta = self._param((c,), 0.1)
        if self.positive:
            mean = 0.5 * self.rng.uniform(0.1, 1.0, c) * beta * np.sqrt(var + eps) / gamma
        else:
            mean = 0.1 * self.rng.standard_normal(c)
        name = self._fresh("bn")
        params = [self._const(f"{name}_{k}", v.astype(np.float32))
                  for k, v in (("scale", gamma), ("B", beta), ("mean", mean), ("var", var))]
        return self._node("BatchNormalization", [x, *params], self.shapes[x], epsilon=eps)

    def _channel_const(self, x: str, op: str, value) -> str:
        c = self.shapes[x][0]
        if value is None:
            value = self._magnitude(c) if op in ("Mul", "Div") else self._param((c,), 0.5)
        value = np.broadcast_to(np.asarray(value, np.float32), (c,)).reshape(1, c, 1, 1)
        return self._const(self._fresh("k"), np.ascontiguousarray(value))

    def affine_const(self, x: str, op: str, value=None) -> str:
        """x <op> k with a [1,C,1,1] constant k (random unless `value` is given)."""
        if op not in AFFINE_OPS:
            raise ValueError(f"op must be one of {AFFINE_OPS}")
        return self._node(op, [x, self._channel_const(x, op, value)], self.shapes[x])

    def rsub_const(self, x: str, value=None) -> str:
        """k - x with a [1,C,1,1] constant k."""
        return self._node("Sub", [self._channel_const(x, "Sub", value), x], self.shapes[x])

    # ---- merges ------------------------------------------------------------------------
    def _same_shape(self, names: Sequence[str]) -> Shape:
        shapes = {self.shapes[n] for n in names}
        if len(shapes) != 1:
            raise ValueError(f"shape mismatch: {[self.shapes[n] for n in names]}")
        return shapes.pop()

    def add(self, a: str, b: str) -> str:
        return self._node("Add", [a, b], self._same_shape([a, b]))

    def sum_(self, names: Sequence[str]) -> str:
        return self._node("Sum", list(names), self._same_shape(names))

    def concat(self, names: Sequence[str]) -> str:
        spatial = {self.shapes[n][1:] for n in names}
        if len(spatial) != 1:
            raise ValueError(f"concat needs equal spatial sizes, got {spatial}")
        c = sum(self.shapes[n][0] for n in names)
        return self._node("Concat", list(names), (c, *spatial.pop()), axis=1)

    # ---- elementwise and misc ----------------------------------------------------------
    def relu(self, x: str) -> str:
        return self._node("Relu", [x], self.shapes[x])

    def leaky_relu(self, x: str, alpha: float = 0.1) -> str:
        return self._node("LeakyRelu", [x], self.shapes[x], alpha=alpha)

    def sigmoid(self, x: str) -> str:
        return self._node("Sigmoid", [x], self.shapes[x])

    def tanh(self, x: str) -> str:
        return self._node("Tanh", [x], self.shapes[x])

    def clip(self, x: str, lo: float, hi: float) -> str:
        name = self._fresh("clip")
        bounds = [self._const(f"{name}_{k}", np.array(v, np.float32)) for k, v in (("min", lo), ("max", hi))]
        return self._node("Clip", [x, *bounds], self.shapes[x])

    def identity(self, x: str) -> str:
        return self._node("Identity", [x], self.shapes[x])

    def dropout(self, x: str) -> str:
        """Dropout in inference form (no ratio / training_mode inputs): an identity."""
        return self._node("Dropout", [x], self.shapes[x])

    def pad(self, x: str, pads: Pads, value: float = 0.0) -> str:
        """Constant Pad of the spatial axes; pads in (top, left, bottom, right) order."""
        top, left, bottom, right = (int(p) for p in pads)
        c, h, w = self.shapes[x]
        name = self._fresh("pads")
        inputs = [x, self._const(name, np.array([0, 0, top, left, 0, 0, bottom, right], np.int64)),
                  self._const(name + "_value", np.array(value, np.float32))]
        return self._node("Pad", inputs, (c, h + top + bottom, w + left + right), mode="constant")

    def lrn(self, x: str, size: int = 3) -> str:
        return self._node("LRN", [x], self.shapes[x], size=size, alpha=1e-4, beta=0.75, bias=1.0)

    def channel_shuffle(self, x: str, groups: int) -> str:
        """Reshape-Transpose-Reshape channel shuffle (static H, W; batch copied via 0)."""
        c, h, w = self.shapes[x]
        if c % groups:
            raise ValueError(f"groups={groups} must divide channels {c}")
        name = self._fresh("shuffle")
        split = self._const(name + "_split", np.array([0, groups, c // groups, h, w], np.int64))
        merge = self._const(name + "_merge", np.array([0, c, h, w], np.int64))
        y = self._node("Reshape", [x, split], self.shapes[x])
        y = self._node("Transpose", [y], self.shapes[x], perm=[0, 2, 1, 3, 4])
        return self._node("Reshape", [y, merge], self.shapes[x])

    # ---- output ------------------------------------------------------------------------
    def _value_info(self, name: str) -> onnx.ValueInfoProto:
        c, h, w = self.shapes[name]
        dims = ["N", c, "H", "W"] if name == "input" else ["N", c, None, None]
        return helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                             dims if self.dynamic else [1, c, h, w])

    def build(self, outputs: Sequence[str] | None = None) -> onnx.ModelProto:
        """Checked, shape-inferred model whose graph outputs are `outputs` (default: last)."""
        outputs = list(dict.fromkeys(outputs or [self.last]))
        graph = helper.make_graph(self.nodes, "netgen", [self._value_info("input")],
                                  [self._value_info(n) for n in outputs], self.initializers)
        opsets = [helper.make_opsetid("", self.opset)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="netgen",
                                  ir_version=helper.find_min_ir_version_for(opsets))
        onnx.checker.check_model(model, full_check=True)
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)


# ---- running -----------------------------------------------------------------------------
def _with_outputs(model: onnx.ModelProto, outputs: Sequence[str]) -> onnx.ModelProto:
    """Copy of `model` whose graph outputs are exactly `outputs`."""
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    known = {vi.name: vi for vi in [*g.input, *g.value_info, *g.output]}
    result = onnx.ModelProto()
    result.CopyFrom(model)
    del result.graph.output[:]
    result.graph.output.extend(
        known.get(n) or helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs)
    return result


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _graph_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    inits = {t.name for t in model.graph.initializer}
    return next(vi for vi in model.graph.input if vi.name not in inits)


def run_ort(model: onnx.ModelProto, images: np.ndarray, outputs: Sequence[str]) -> dict[str, np.ndarray]:
    """Run `model` on images [N,C,H,W] and return the named (intermediate) tensors."""
    outputs = list(dict.fromkeys(outputs))
    inp = _graph_input(model)
    sess = _session(_with_outputs(model, outputs))
    images = np.asarray(images, np.float32)
    batch = inp.type.tensor_type.shape.dim[0]
    chunks = [images[i:i + 1] for i in range(len(images))] if batch.dim_value == 1 else [images]
    results = [sess.run(outputs, {inp.name: chunk}) for chunk in chunks]
    return {n: np.concatenate([r[i] for r in results]) for i, n in enumerate(outputs)}


# ---- canned networks ---------------------------------------------------------------------
def _finish(b: NetBuilder, *extra: str) -> onnx.ModelProto:
    """Build with every layer, `extra` and the last tensor as outputs."""
    return b.build([*b.layers, *extra, b.last])


_LINEAR_CASES: list[tuple[str, Callable[[], onnx.ModelProto]]] = []
_RELU_CASES: list[tuple[str, Callable[[], onnx.ModelProto]]] = []


def _case(registry: list, name: str):
    def register(fn):
        registry.append((name, fn))
        return fn
    return register


@_case(_LINEAR_CASES, "chain3")
def _chain3():
    b = NetBuilder()
    x = b.conv("input", 8, 3, 1, (1, 1, 1, 1))
    x = b.conv(x, 8, 3, 2, (1, 1, 1, 1))
    b.conv(x, 4, 3, 2)
    return _finish(b)


@_case(_LINEAR_CASES, "residual_projection")
def _residual_projection():
    b = NetBuilder()
    x = b.conv("input", 8, 3, 1, (1, 1, 1, 1))
    y = b.conv(b.conv(x, 8, 3, 2, (1, 1, 1, 1)), 8, 3, 1, (1, 1, 1, 1))
    b.add(y, b.conv(x, 8, 1, 2))
    return _finish(b)


@_case(_LINEAR_CASES, "concat_receptive_fields")
def _concat_receptive_fields():
    b = NetBuilder()
    x = b.conv("input", 4, 3, 1, (1, 1, 1, 1))
    branches = [b.conv(x, 4, 1), b.conv(x, 4, 3, 1, (1, 1, 1, 1)),
                b.conv(x, 4, 5, 1, (4, 4, 4, 4), dilation=2)]
    b.conv(b.concat(branches), 6, 3, 2)
    return _finish(b)


@_case(_LINEAR_CASES, "dense_block")
def _dense_block():
    """DenseNet's pattern: each layer's BatchNorm and 1x1 conv read the concatenation of every map before it,
    whose receptive fields differ; a concatenation of a concatenation; a 3x3 conv and a pool reading one."""
    b = NetBuilder(3, 18, 18, seed=5)
    maps = [b.conv("input", 6, 3, 1, (1, 1, 1, 1))]
    for _ in range(3):
        bottleneck = b.conv(b.batchnorm(b.concat(maps)), 8, 1)
        maps.append(b.conv(bottleneck, 4, 3, 1, (1, 1, 1, 1)))
    block = b.concat([b.concat(maps[:2]), *maps[2:]])
    b.conv(b.batchnorm(block), 5, 3, 2)
    b.conv(b.avgpool(b.affine_const(block, "Mul"), 2, 2), 4, 1)
    return _finish(b)


@_case(_LINEAR_CASES, "depthwise_grouped")
def _depthwise_grouped():
    b = NetBuilder()
    x = b.conv("input", 8, 3, 1, (1, 1, 1, 1))
    x = b.conv(x, 8, 3, 1, (1, 1, 1, 1), groups=8)
    b.conv(x, 6, 3, 2, groups=2)
    return _finish(b)


@_case(_LINEAR_CASES, "dilation2")
def _dilation2():
    b = NetBuilder()
    b.conv(b.conv("input", 6, 3, dilation=2), 6, 3, 2, dilation=2)
    return _finish(b)


@_case(_LINEAR_CASES, "batchnorm")
def _batchnorm():
    b = NetBuilder()
    x = b.batchnorm(b.conv("input", 6, 3))
    x = b.avgpool(x, 2, 2)
    b.batchnorm(b.conv(x, 4, 3, 1, (1, 1, 1, 1)))
    return _finish(b)


@_case(_LINEAR_CASES, "affine_consts")
def _affine_consts():
    b = NetBuilder()
    x = b.conv("input", 6, 3)
    for op in AFFINE_OPS:
        x = b.affine_const(x, op)
    b.conv(b.rsub_const(x), 4, 3, 2)
    return _finish(b)


def _auto_pad(mode: str):
    b = NetBuilder(height=24, width=24)
    x = b.conv("input", 6, 3, 2, auto_pad=mode)
    x = b.conv(x, 6, 5, 2, auto_pad=mode)
    b.avgpool(x, 3, 2, auto_pad=mode)
    return _finish(b)


for _mode in AUTO_PADS:
    _LINEAR_CASES.append((f"auto_pad_{_mode.lower()}", functools.partial(_auto_pad, _mode)))


@_case(_LINEAR_CASES, "asymmetric_pads")
def _asymmetric_pads():
    b = NetBuilder()
    x = b.conv("input", 6, 3, 1, (1, 0, 2, 1))
    x = b.avgpool(x, 3, 2, (1, 0, 2, 1))
    b.conv(x, 4, 2, 1, (0, 1, 1, 0))
    return _finish(b)


@_case(_LINEAR_CASES, "non_square")
def _non_square():
    b = NetBuilder(height=14, width=18)
    x = b.conv("input", 6, (1, 3))
    x = b.conv(x, 6, (5, 2), (1, 2))
    b.avgpool(x, (2, 1), (2, 1))
    return _finish(b)


@_case(_LINEAR_CASES, "single_channel")
def _single_channel():
    b = NetBuilder(in_channels=1)
    b.conv(b.avgpool(b.conv("input", 4, 3), 2, 2), 2, 3)
    return _finish(b)


@_case(_LINEAR_CASES, "avgpool_ceil")
def _avgpool_ceil():
    b = NetBuilder()
    x = b.conv("input", 4, 3, 1, (1, 1, 1, 1))
    x = b.avgpool(x, 3, 2, (1, 1, 1, 1), ceil_mode=1)
    x = b.avgpool(x, 2, 2, ceil_mode=1, count_include_pad=1)
    b.conv(x, 4, 3)
    return _finish(b)


@_case(_LINEAR_CASES, "channel_shuffle")
def _channel_shuffle():
    b = NetBuilder()
    x = b.conv(b.conv("input", 8, 3), 8, 3, groups=2)
    b.conv(b.channel_shuffle(x, 2), 8, 3, 2, groups=2)
    return _finish(b)


@_case(_LINEAR_CASES, "input_normalization")
def _input_normalization():
    b = NetBuilder()
    x = b.affine_const("input", "Sub", [0.485, 0.456, 0.406])
    x = b.affine_const(x, "Div", [0.229, 0.224, 0.225])
    b.conv(b.conv(x, 6, 3, 2, (1, 1, 1, 1)), 4, 3)
    return _finish(b)


@_case(_LINEAR_CASES, "pad_then_conv")
def _pad_then_conv():
    b = NetBuilder()
    x = b.conv(b.pad("input", (1, 2, 0, 1)), 6, 3)
    b.conv(b.pad(x, (2, 0, 1, 1)), 4, 3, 2)
    return _finish(b)


@_case(_LINEAR_CASES, "sum3")
def _sum3():
    b = NetBuilder()
    x = b.conv("input", 6, 3, 1, (1, 1, 1, 1))
    s = b.sum_([b.conv(x, 6, 1), b.conv(x, 6, 3, 1, (1, 1, 1, 1)),
                b.avgpool(x, 3, 1, (1, 1, 1, 1), count_include_pad=1)])
    b.conv(s, 4, 3, 2)
    return _finish(b)


@_case(_RELU_CASES, "relu_chain")
def _relu_chain():
    b = NetBuilder()
    x = b.maxpool(b.relu(b.conv("input", 8, 3, 1, (1, 1, 1, 1))), 2, 2)
    b.relu(b.conv(x, 6, 3))
    return _finish(b)


@_case(_RELU_CASES, "relu_residual")
def _relu_residual():
    b = NetBuilder()
    x = b.relu(b.conv("input", 8, 3, 1, (1, 1, 1, 1)))
    y = b.conv(b.relu(b.conv(x, 8, 3, 1, (1, 1, 1, 1))), 8, 3, 1, (1, 1, 1, 1))
    b.maxpool(b.relu(b.add(x, y)), 3, 2, (1, 1, 1, 1))
    return _finish(b)


@_case(_RELU_CASES, "maxpool_variants")
def _maxpool_variants():
    b = NetBuilder()
    x = b.relu(b.conv("input", 6, 3))
    x = b.maxpool(x, 2, 1, dilation=2)
    x = b.maxpool(x, 3, 2, (1, 0, 1, 1), ceil_mode=1)
    b.relu(b.conv(x, 4, 3, auto_pad="SAME_UPPER"))
    return _finish(b)


@_case(_RELU_CASES, "mixed_nonlinear")
def _mixed_nonlinear():
    b = NetBuilder()
    x = b.leaky_relu(b.conv("input", 6, 3))
    x = b.lrn(b.clip(b.maxpool(x, 2, 2), -1.0, 1.0))
    x = b.identity(b.dropout(b.tanh(b.conv(x, 6, 3))))
    b.global_avgpool(b.sigmoid(b.relu(x)))
    return _finish(b)


def linear_zoo() -> list[tuple[str, onnx.ModelProto]]:
    """Named linear networks (conv, AveragePool and affine ops only)."""
    return [(name, make()) for name, make in _LINEAR_CASES]


def relu_zoo() -> list[tuple[str, onnx.ModelProto]]:
    """Named networks with Relu / MaxPool and other nonlinearities."""
    return [(name, make()) for name, make in _RELU_CASES]


# ---- random linear DAGs ------------------------------------------------------------------
def _fit_kernel(n: int, pb: int, pe: int, k: int, d: int) -> tuple[int, int]:
    """Shrink (kernel, dilation) until the window fits the padded length n + pb + pe."""
    while (k - 1) * d + 1 > n + pb + pe:
        d, k = (1, k) if d > 1 else (d, k - 1)
    return k, d


def _draw_conv(draw, b: NetBuilder, x: str) -> str:
    c, h, w = b.shapes[x]
    groups = draw(st.sampled_from([g for g in range(1, c + 1) if c % g == 0]))
    out_ch = groups * draw(st.integers(1, max(1, 8 // groups)))
    pads = tuple(draw(st.lists(st.integers(0, 2), min_size=4, max_size=4)))
    fitted = [_fit_kernel(n, pads[i], pads[i + 2], draw(st.integers(1, 4)), draw(st.integers(1, 2)))
              for i, n in enumerate((h, w))]
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    return b.conv(x, out_ch, [k for k, _ in fitted], stride, pads, [d for _, d in fitted], groups)


def _draw_avgpool(draw, b: NetBuilder, x: str) -> str:
    _, h, w = b.shapes[x]
    kernel = (draw(st.integers(1, min(3, h))), draw(st.integers(1, min(3, w))))
    pads = tuple(draw(st.integers(0, kernel[i % 2] - 1)) for i in range(4))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    return b.avgpool(x, kernel, stride, pads, count_include_pad=draw(st.integers(0, 1)))


def _pairs(b: NetBuilder, names: Sequence[str], key) -> list[tuple[str, str]]:
    """Distinct pairs of tensors whose key(shape) agrees."""
    return [(p, q) for i, p in enumerate(names) for q in names[i + 1:]
            if key(b.shapes[p]) == key(b.shapes[q])]


@st.composite
def random_linear_dag(draw, min_ops: int = 2, max_ops: int = 6) -> onnx.ModelProto:
    """Random linear DAG (conv, avgpool, batchnorm, affine const, add, concat) as a model."""
    b = NetBuilder(in_channels=draw(st.integers(1, 3)), height=draw(st.integers(12, 24)),
                   width=draw(st.integers(12, 24)), seed=draw(st.integers(0, 2**16)))
    tensors = ["input"]
    for _ in range(draw(st.integers(min_ops, max_ops))):
        merges = {"add": _pairs(b, tensors, lambda s: s), "concat": _pairs(b, tensors, lambda s: s[1:])}
        kinds = ["conv", "avgpool", "batchnorm", "affine"] + [k for k, v in merges.items() if v]
        kind = draw(st.sampled_from(kinds))
        if kind in merges:
            p, q = draw(st.sampled_from(merges[kind]))
            y = b.add(p, q) if kind == "add" else b.concat([p, q])
        else:
            x = draw(st.sampled_from(tensors))
            if kind == "conv":
                y = _draw_conv(draw, b, x)
            elif kind == "avgpool":
                y = _draw_avgpool(draw, b, x)
            elif kind == "batchnorm":
                y = b.batchnorm(x)
            else:
                y = b.affine_const(x, draw(st.sampled_from(AFFINE_OPS)))
        tensors.append(y)
    return _finish(b)


# ---- self-check --------------------------------------------------------------------------
def _check_model(model: onnx.ModelProto, batch: int = 2, seed: int = 0) -> None:
    """Run every graph output and the input of `model` on random images; check shapes."""
    inp = _graph_input(model)
    c, h, w = (d.dim_value for d in inp.type.tensor_type.shape.dim[1:])
    images = np.random.default_rng(seed).standard_normal((batch, c, h, w)).astype(np.float32)
    names = [o.name for o in model.graph.output]
    result = run_ort(model, images, names + ["input"])
    for o in model.graph.output:
        want = [batch] + [d.dim_value for d in o.type.tensor_type.shape.dim[1:]]
        got = result[o.name]
        assert list(got.shape) == want, (o.name, got.shape, want)
        assert np.isfinite(got).all(), o.name
    np.testing.assert_array_equal(result["input"], images)


def _check_dynamic() -> None:
    """A dynamic-shape model runs the whole batch at once and at another spatial size."""
    b = NetBuilder(dynamic=True, positive=True)
    x = b.conv("input", 4, 3, 2, (1, 1, 1, 1))
    model = b.build([b.avgpool(b.batchnorm(x), 2, 2)])
    out = run_ort(model, np.ones((3, 3, 20, 20), np.float32), [x, b.last])
    assert out[x].shape == (3, 4, 10, 10) and out[b.last].shape == (3, 4, 5, 5)
    assert (out[b.last] > 0).all()


def _self_check() -> None:
    from hypothesis import HealthCheck, given, settings

    for name, model in linear_zoo() + relu_zoo():
        _check_model(model)
        print(f"zoo {name}: {len(model.graph.output)} outputs")
    _check_dynamic()

    @settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(random_linear_dag())
    def check_random(model):
        _check_model(model)

    check_random()
    print("OK")


if __name__ == "__main__":
    _self_check()
