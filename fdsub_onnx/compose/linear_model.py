"""The network ``weights`` mode decodes, as ONNX: every nonlinearity read as ``weights`` reads it.

``weights`` mode reads every elementwise nonlinearity as the identity, MaxPool as an average over its
window and a held gate as a constant (docs/method.md). ``linearized`` writes that network as an ONNX model
(onnxruntime runs it in the ``check`` identity); ``linear_model`` gives it as a loaded ``Model`` over the
same tensors, without copying the weights (the adjoint route differentiates it).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import helper

from ..errors import FdsubError, NotDecodable
from ..graph.model import Model, ancestors, attributes, wiring
from ..graph.patterns import ChannelGate, SelfGated
from .ops import RULES
from .ops._rule import per_channel
from .ops.op_batchnorm import scale_shift
from .ops.op_elementwise import Identity

#: ops that ``weights`` mode reads as the identity (the registry's elementwise rules), and Softmax
IDENTITY_OPS = tuple(sorted({name for name, rule in RULES.items() if isinstance(rule, Identity)} | {"Softmax"}))
#: pooling ops that ``weights`` mode reads as an average over the same window
AVERAGED = {"MaxPool": "AveragePool", "GlobalMaxPool": "GlobalAveragePool", "ReduceMax": "ReduceMean"}


def linearized(model: onnx.ModelProto, patterns: dict | None = None, gates: dict | None = None) -> onnx.ModelProto:
    """A linear copy of ``model``: the network ``weights`` mode decodes.

    Elementwise nonlinearities (Relu, LRN, Dropout, Sigmoid, ... and Softmax) become Identity on
    their first input; a self-gated product x * f(x) (SiLU, GELU, ...; ``patterns``, the loaded model's
    ``Model.patterns``) becomes x; a channel gate becomes a product with the constant it is held at
    (``gates``: Mul output -> [C], as ``modes.gates.reference_gates`` gives); MaxPool becomes AveragePool
    over the same window (its padding not counted: the max is never a padded value), GlobalMaxPool
    GlobalAveragePool, ReduceMax ReduceMean. Nodes keep their names and output names. A FdsubError when
    an op cannot be replaced (a used second output, a dilated MaxPool before opset 19).
    """
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    nodes, held = _linear_nodes(list(graph.node), patterns or {}, gates or {}, opset,
                                {o.name for o in graph.output}, dilated_ok=opset >= 19)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(onnx.numpy_helper.from_array(v, n) for n, v in held.items())
    return out


def linear_model(model: Model, gates: dict | None = None) -> Model:
    """``model``'s linearized network (as ``linearized``) as a ``Model`` over the same tensors and constants.

    Built from the loaded node list, so the weights are shared, not copied; the few tensors a held layer
    norm adds get their shapes here.
    """
    nodes, held = _linear_nodes(model.nodes, model.patterns, gates or {}, model.opset, set(), dilated_ok=True)
    nodes = _merged_affine(nodes, dict(model.constants) | held, held, model.shapes)
    shapes, constants = dict(model.shapes), dict(model.constants) | held
    for node in nodes:
        for name in node.output:
            if name and name not in shapes and node.input[0] in shapes:
                shape = shapes[node.input[0]]
                shapes[name] = (*shape[:-1], 1) if node.op_type == "ReduceMean" else shape
    producer, consumers = wiring(nodes)
    return dataclasses.replace(model, nodes=nodes, shapes=shapes, constants=constants, producer=producer,
                               consumers=consumers, patterns={})


def _linear_nodes(nodes: list, patterns: dict, gates: dict, opset: int, outputs: set,
                  dilated_ok: bool = False) -> tuple[list, dict]:
    """The linearized node list and the constants it adds (name -> array); ``dilated_ok``: a dilated MaxPool
    becomes a dilated AveragePool (which onnxruntime runs from opset 19)."""
    used = {name for node in nodes for name in node.input} | outputs
    producer = {o: node for node in nodes for o in node.output}
    linear, held = [], {}
    for node in nodes:
        label = f"{node.op_type} node {node.name or node.output[0]!r}"
        extra = [o for o in node.output[1:] if o in used]
        if extra and (node.op_type in IDENTITY_OPS or node.op_type in AVERAGED):
            raise FdsubError(f"{label}: its output(s) {extra} are used; it cannot be linearized")
        if node.op_type in IDENTITY_OPS:
            linear.append(helper.make_node("Identity", [node.input[0]], [node.output[0]], name=node.name))
        elif node.op_type in AVERAGED:
            linear.append(_averaged(node, label, dilated_ok))
        elif node.op_type == "LayerNormalization" and node.output[0] in gates:
            linear.extend(_held_layer_norm(node, float(np.asarray(gates[node.output[0]]).reshape(-1)[0]), held,
                                           opset))
        elif _dequantizes_its_quantize(node, producer):  # a QDQ pair: x, as weights mode reads it (no rounding)
            x = producer[node.input[0]].input[0]
            linear.append(helper.make_node("Identity", [x], [node.output[0]], name=node.name))
        elif isinstance(patterns.get(node.output[0]), SelfGated):
            pattern = patterns[node.output[0]]
            if np.all(np.asarray(pattern.slope) == 1.0):
                linear.append(helper.make_node("Identity", [pattern.x], [node.output[0]], name=node.name))
            else:
                const = f"{node.output[0]}::slope"
                slope = np.asarray(pattern.slope, np.float32).reshape(-1)
                held[const] = slope.reshape(1, -1, 1, 1) if slope.size > 1 else slope.reshape(())
                linear.append(helper.make_node("Mul", [pattern.x, const], [node.output[0]], name=node.name))
        elif isinstance(patterns.get(node.output[0]), ChannelGate) and node.output[0] in gates:
            pattern, value = patterns[node.output[0]], np.asarray(gates[node.output[0]], np.float32).reshape(-1)
            const = f"{node.output[0]}::held_gate"
            held[const] = value.reshape(1, -1, 1, 1)
            linear.append(helper.make_node("Mul", [pattern.x, const], [node.output[0]], name=node.name))
        else:
            linear.append(node)
    return linear, held


#: per-channel affine ops by a constant that a BatchNormalization in front of them absorbs: (scale, shift) of y = x op c
_ABSORBED = {"Mul": lambda c: (c, 0.0), "Div": lambda c: (1.0 / c, 0.0), "Add": lambda c: (1.0, c),
             "Sub": lambda c: (1.0, -c)}


def _per_channel(const, channels: int, rank: int) -> np.ndarray | None:
    """A constant as one value per channel [C] (``ops._rule.per_channel``) when it broadcasts over a rank-``rank``
    map [N, C, ...] as such; else None."""
    if const is None or rank < 2:
        return None
    try:
        return per_channel(const, channels, rank)
    except NotDecodable:
        return None


def _merged_affine(nodes: list, constants: dict, held: dict, shapes: dict) -> list:
    """``nodes`` with each Mul/Div/Add/Sub by a per-channel constant that alone reads a BatchNormalization's output
    merged into that BatchNormalization (Caffe's Scale layer, DenseNet's BN -> Mul -> Add): the same affine map in
    one node, so a backward pass makes one sweep over the map instead of three. Exact; the merged parameters go
    into ``held``. The ONNX copy (``linearized``) keeps the original nodes."""
    readers = wiring(nodes)[1]
    merged, by_output = [], {}  # BatchNormalization output -> its index in ``merged``
    for node in nodes:
        at = by_output.get(node.input[0]) if node.op_type in _ABSORBED and len(node.input) == 2 else None
        bn = None if at is None else merged[at]
        c = None if bn is None or len(readers[node.input[0]]) != 1 else _per_channel(
            constants.get(node.input[1]), np.asarray(constants[bn.input[1]]).size, len(shapes.get(node.input[0], ())))
        if c is None:
            if node.op_type == "BatchNormalization" and not any(node.output[1:]):
                by_output[node.output[0]] = len(merged)
            merged.append(node)
            continue
        scale, shift = _ABSORBED[node.op_type](c)  # [C] or a scalar each
        gamma, beta = (np.asarray(constants[name], np.float64) for name in bn.input[1:3])
        names = (f"{node.output[0]}::gamma", f"{node.output[0]}::beta")
        held[names[0]] = gamma * scale  # float64: the float64 pass stays exact; float32 passes cast it
        held[names[1]] = beta * scale + shift
        constants.update(zip(names, (held[names[0]], held[names[1]])))
        attrs = attributes(bn)
        fused = helper.make_node("BatchNormalization", [bn.input[0], *names, *bn.input[3:5]], [node.output[0]],
                                 name=node.name or bn.name, **{k: v for k, v in attrs.items() if k == "epsilon"})
        merged[at] = fused
        del by_output[bn.output[0]]
        by_output[node.output[0]] = at
    return merged


def folded(linear: Model, keep, dtype) -> Model:
    """``linear`` (``linear_model``'s network) with each BatchNormalization folded into the convolution beside it,
    for a backward pass: no sweep over the map for its per-channel scale. Exact in value, biases included.

    A BatchNormalization that alone reads a Conv's output scales that Conv's filters and bias; one read alone
    (through Identity nodes) by a 1x1 Conv without padding scales that Conv's input channels, its shift becoming
    bias. Only the nodes below ``keep`` (the seeded layer, a tensor a pass stops at) are folded, and those tensors
    stay; the folded weights are ``dtype``.
    """
    readers, constants = wiring(linear.nodes)[1], dict(linear.constants)

    def only_reader(name):
        found = readers.get(name, [])
        return found[0] if len(found) == 1 and name not in keep else None

    def affine(bn):  # (s, t) of y = s x + t per channel, or None
        if (bn is None or bn.op_type != "BatchNormalization" or len(bn.input) < 5 or any(bn.output[1:])
                or not all(name in constants for name in bn.input[1:5])):
            return None
        return scale_shift(bn, *(np.asarray(constants[name], np.float64).reshape(-1) for name in bn.input[1:5]))

    replaced, dropped = {}, set()  # id(Conv) -> its folded copy; ids of the nodes folded away
    for conv in ancestors(linear, [name for name in keep if name]):  # the pass's nodes: a report folds per layer
        if conv.op_type != "Conv" or conv.input[1] not in constants:
            continue
        attrs = attributes(conv)
        w = np.asarray(constants[conv.input[1]], np.float64)
        b = np.asarray(constants[conv.input[2]], np.float64) if len(conv.input) > 2 and conv.input[2] else 0.0
        x, out = conv.input[0], conv.output[0]
        before, chain = linear.producer.get(x), []  # BN -> Identity* -> a 1x1 Conv
        while before is not None and before.op_type == "Identity" and only_reader(before.output[0]) is not None:
            chain.append(before)
            before = linear.producer.get(before.input[0])
        st = affine(before) if before is not None and only_reader(before.output[0]) is not None else None
        if (st is not None and id(before) not in dropped and st[0].size == w.shape[1] and w.shape[2:] == (1, 1)
                and int(attrs.get("group", 1)) == 1 and not any(attrs.get("pads", ()))):
            s, t = st
            w, b, x = w * s[None, :, None, None], b + w[:, :, 0, 0] @ t, before.input[0]
            dropped |= {id(before)} | {id(n) for n in chain}
        after = only_reader(out)  # Conv -> BN
        st = affine(after)
        if st is not None and st[0].size == w.shape[0]:
            s, t = st
            w, b, out = w * s[:, None, None, None], b * s + t, after.output[0]
            dropped.add(id(after))
        if x == conv.input[0] and out == conv.output[0]:
            continue
        names = (f"{out}::folded_w", f"{out}::folded_b")
        constants[names[0]], constants[names[1]] = w.astype(dtype), np.broadcast_to(b, w.shape[:1]).astype(dtype)
        replaced[id(conv)] = helper.make_node("Conv", [x, *names], [out], name=conv.name, **attrs)
    nodes = [replaced.get(id(n), n) for n in linear.nodes if id(n) not in dropped]
    producer, consumers = wiring(nodes)
    return dataclasses.replace(linear, nodes=nodes, constants=constants, producer=producer, consumers=consumers)


def _held_layer_norm(node, inverse_std: float, held: dict, opset: int) -> list:
    """LayerNormalization over the last axis with its 1/std held: ``(x - mean(x)) * (r * scale) + bias``."""
    x, out, name = node.input[0], node.output[0], node.name or node.output[0]
    mean, centred, scaled = f"{out}::mean", f"{out}::centred", f"{out}::scaled"
    factor = f"{out}::factor"
    held[factor] = np.asarray(inverse_std, np.float32)
    if opset >= 18:
        axes = f"{out}::axes"
        held[axes] = np.asarray([-1], np.int64)
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


def _averaged(node, label: str, dilated_ok: bool):
    attrs = attributes(node)
    dilations = attrs.pop("dilations", None)
    if dilations is not None and any(d != 1 for d in dilations) and dilated_ok:
        attrs["dilations"] = dilations
    elif dilations is not None and any(d != 1 for d in dilations):
        raise FdsubError(f"{label} is dilated; AveragePool has no dilations before opset 19: it cannot be linearized")
    attrs.pop("storage_order", None)
    inputs = list(node.input) if node.op_type.startswith("Reduce") else [node.input[0]]  # a Reduce's axes input
    return helper.make_node(AVERAGED[node.op_type], inputs, [node.output[0]], name=node.name, **attrs)
