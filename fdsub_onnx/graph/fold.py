"""Rewrites of the linearized network that leave its values as they are: per-channel affine maps merged into the
BatchNormalization before them, and BatchNormalizations folded into the convolutions beside them (a backward pass
then makes fewer sweeps over the maps). Exact, biases included."""

from __future__ import annotations

import dataclasses

import numpy as np
from onnx import helper

from ..errors import NotDecodable
from .model import Model, ancestors, attributes, wiring


def scale_shift(node, gamma, beta, mean, var, xp=np):
    """A BatchNormalization's ``(s, t)`` of ``y = s x + t`` per channel, in the arrays' module ``xp`` and dtype
    (the bank rule here, the backward rule of ``local``, the folding of ``compose.linear_model``)."""
    scale = gamma / xp.sqrt(var + attributes(node).get("epsilon", 1e-5))
    return scale, beta - mean * scale


def per_channel(array: np.ndarray, channels: int, rank: int) -> np.ndarray:
    """A constant broadcast against [1, C, ...] as one value per channel [C]."""
    array = np.asarray(array, dtype=np.float64)
    if array.ndim > rank:
        raise NotDecodable(f"constant of shape {list(array.shape)} has more axes than the feature map")
    shape = (1,) * (rank - array.ndim) + array.shape
    flat = array.reshape(shape)
    others = [n for a, n in enumerate(shape) if a != 1]
    if any(n != 1 for n in others) or shape[1] not in (1, channels):
        raise NotDecodable(f"constant of shape {list(array.shape)} varies over space or batch, not only over channels")
    return np.broadcast_to(flat.reshape(-1), (channels,)).copy()


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


def merged_affine(nodes: list, constants: dict, held: dict, shapes: dict) -> list:
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
