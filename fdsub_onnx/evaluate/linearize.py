"""The `weights` identity of docs/method.md as a self-test: a linearized copy of a model, and the identity's error.

``weights`` mode reads every elementwise nonlinearity as the identity and MaxPool as an average
over its window. ``linearized`` builds the ONNX model that reading describes (the same rules, taken
from the op registry), so onnxruntime can compute the activations the decoded filters must predict
exactly: for a neuron at output position q whose receptive field lies in the image,
``activation == sum(filters[k] * patch(q)) + bias[k]`` (``identity_error``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from ..compose.ops import RULES
from ..compose.ops.op_elementwise import Identity
from ..errors import FdsubError
from ..graph.patterns import ChannelGate, SelfGated
from .predict import predict

#: ops that ``weights`` mode reads as the identity (the registry's elementwise rules), and Softmax
IDENTITY_OPS = tuple(sorted({name for name, rule in RULES.items() if isinstance(rule, Identity)} | {"Softmax"}))
#: pooling ops that ``weights`` mode reads as an average over the same window
AVERAGED = {"MaxPool": "AveragePool", "GlobalMaxPool": "GlobalAveragePool"}


def linearized(model: onnx.ModelProto, patterns: dict | None = None, gates: dict | None = None) -> onnx.ModelProto:
    """A linear copy of ``model``: the network ``weights`` mode decodes.

    Elementwise nonlinearities (Relu, LRN, Dropout, Sigmoid, ... and Softmax) become Identity on
    their first input; a self-gated product x * f(x) (SiLU, GELU, ...; ``patterns``, the loaded model's
    ``Model.patterns``) becomes x; a channel gate becomes a product with the constant it is held at
    (``gates``: Mul output -> [C], as ``modes.gates.reference_gates`` gives); MaxPool becomes AveragePool
    over the same window, GlobalMaxPool GlobalAveragePool. Nodes keep their names and output names. A
    FdsubError when an op cannot be replaced (a used second output, a dilated MaxPool).
    """
    patterns, gates = patterns or {}, gates or {}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    nodes, held = [], []
    producer = {o: node for node in graph.node for o in node.output}
    for node in graph.node:
        label = f"{node.op_type} node {node.name or node.output[0]!r}"
        extra = [o for o in node.output[1:] if o in used]
        if extra and (node.op_type in IDENTITY_OPS or node.op_type in AVERAGED):
            raise FdsubError(f"{label}: its output(s) {extra} are used; it cannot be linearized")
        if node.op_type in IDENTITY_OPS:
            nodes.append(helper.make_node("Identity", [node.input[0]], [node.output[0]], name=node.name))
        elif node.op_type in AVERAGED:
            nodes.append(_averaged(node, label))
        elif node.op_type == "LayerNormalization" and node.output[0] in gates:
            nodes.extend(_held_layer_norm(node, float(np.asarray(gates[node.output[0]]).reshape(-1)[0]), held, opset))
        elif _dequantizes_its_quantize(node, producer):  # a QDQ pair: x, as weights mode reads it (no rounding)
            x = producer[node.input[0]].input[0]
            nodes.append(helper.make_node("Identity", [x], [node.output[0]], name=node.name))
        elif isinstance(patterns.get(node.output[0]), SelfGated):
            pattern = patterns[node.output[0]]
            if np.all(np.asarray(pattern.slope) == 1.0):
                nodes.append(helper.make_node("Identity", [pattern.x], [node.output[0]], name=node.name))
            else:
                const = f"{node.output[0]}::slope"
                slope = np.asarray(pattern.slope, np.float32).reshape(-1)
                slope = slope.reshape(1, -1, 1, 1) if slope.size > 1 else slope.reshape(())
                held.append(onnx.numpy_helper.from_array(slope, const))
                nodes.append(helper.make_node("Mul", [pattern.x, const], [node.output[0]], name=node.name))
        elif isinstance(patterns.get(node.output[0]), ChannelGate) and node.output[0] in gates:
            pattern, value = patterns[node.output[0]], np.asarray(gates[node.output[0]], np.float32).reshape(-1)
            const = f"{node.output[0]}::held_gate"
            held.append(onnx.numpy_helper.from_array(value.reshape(1, -1, 1, 1), const))
            nodes.append(helper.make_node("Mul", [pattern.x, const], [node.output[0]], name=node.name))
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(held)
    return out


def _held_layer_norm(node, inverse_std: float, held: list, opset: int) -> list:
    """LayerNormalization over the last axis with its 1/std held: ``(x - mean(x)) * (r * scale) + bias``."""
    x, out, name = node.input[0], node.output[0], node.name or node.output[0]
    mean, centred, scaled = f"{out}::mean", f"{out}::centred", f"{out}::scaled"
    factor = f"{out}::factor"
    held.append(onnx.numpy_helper.from_array(np.asarray(inverse_std, np.float32), factor))
    if opset >= 18:
        axes = f"{out}::axes"
        held.append(onnx.numpy_helper.from_array(np.asarray([-1], np.int64), axes))
        reduce = helper.make_node("ReduceMean", [x, axes], [mean], name=f"{name}::mean", keepdims=1)
    else:
        reduce = helper.make_node("ReduceMean", [x], [mean], name=f"{name}::mean", axes=[-1], keepdims=1)
    nodes = [reduce, helper.make_node("Sub", [x, mean], [centred], name=f"{name}::centre"),
             helper.make_node("Mul", [centred, factor], [scaled], name=f"{name}::held"),
             helper.make_node("Mul", [scaled, node.input[1]], [out + ("::gamma" if len(node.input) > 2 else "")],
                              name=f"{name}::scale")]
    if len(node.input) > 2 and node.input[2]:
        nodes.append(helper.make_node("Add", [out + "::gamma", node.input[2]], [out], name=name))
    return nodes


def _dequantizes_its_quantize(node, producer) -> bool:
    """A DequantizeLinear of a QuantizeLinear with the same scale and zero point (QDQ format around data)."""
    quantize = producer.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
    return (quantize is not None and quantize.op_type == "QuantizeLinear"
            and list(quantize.input[1:]) == list(node.input[1:]))


def _averaged(node, label: str):
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    dilations = attrs.pop("dilations", None)
    if dilations is not None and any(d != 1 for d in dilations):
        raise FdsubError(f"{label} is dilated; AveragePool has no dilations before opset 19: it cannot be linearized")
    attrs.pop("storage_order", None)
    return helper.make_node(AVERAGED[node.op_type], [node.input[0]], [node.output[0]], name=node.name, **attrs)



@dataclass
class IdentityError:
    """How far ``sum(filters * patch) + bias`` is from the activation on the interior positions of a layer.

    ``relative`` is ``max_abs / scale`` (``max_abs`` when ``scale`` is 0, NaN when a value is not finite);
    ``worst`` is (image, neuron, predicted, actual) at the largest error.
    """

    layer: str
    relative: float
    max_abs: float
    scale: float
    positions: int
    worst: tuple[int, int, float, float] | None

    def within(self, rtol: float, atol: float = 0.0) -> bool:
        """Whether the error is at most ``rtol * scale + atol`` (False for non-finite values or no position)."""
        return self.positions > 0 and np.isfinite(self.max_abs) and self.max_abs <= rtol * self.scale + atol


def identity_error(decoded, activation: np.ndarray, images: np.ndarray) -> IdentityError:
    """Compare ``decoded`` (filters of some neurons of a layer) with the layer's ``activation``.

    ``activation`` is the whole layer's output [N, C, H, W] (or [N, C] for a fully connected layer) on
    ``images`` [N, C_image, H, W]; its channels ``decoded.neurons`` are compared, in float64, on every
    output position whose receptive field lies in the image (``positions`` of them; 0 compares nothing).
    """
    act = np.asarray(activation, dtype=np.float64)
    if act.ndim == 2:
        act = act[:, :, None, None]
    if act.ndim != 4 or act.shape[0] != len(images):
        raise FdsubError(f"{decoded.layer}: activation of shape {list(act.shape)} for {len(images)} images")
    if not (len(decoded.neurons) == decoded.filters.shape[0] == len(decoded.bias)):
        raise FdsubError(f"{decoded.layer}: {len(decoded.neurons)} neurons, filters {list(decoded.filters.shape)}, "
                         f"bias {list(np.shape(decoded.bias))}")
    act = act[:, np.asarray(decoded.neurons)]
    mask = decoded.interior(images.shape[2:], act.shape[2:])
    if not mask.any() or len(decoded.neurons) == 0:
        return IdentityError(decoded.layer, float("nan"), float("nan"), 0.0, 0, None)
    got, want = predict(decoded, images, act.shape[2:], mask), act[:, :, mask]
    err = np.abs(got - want)
    scale = float(np.abs(want).max())
    if not np.isfinite(err).all():
        return IdentityError(decoded.layer, float("nan"), float("nan"), scale, int(mask.sum()), None)
    i, k, p = np.unravel_index(int(np.argmax(err)), err.shape)
    max_abs = float(err[i, k, p])
    return IdentityError(decoded.layer, max_abs / scale if scale else max_abs, max_abs, scale, int(mask.sum()),
                         (int(i), int(decoded.neurons[k]), float(got[i, k, p]), float(want[i, k, p])))

