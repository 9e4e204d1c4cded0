"""Rewrites of the linearized network that leave its values as they are: per-channel affine maps merged into the
BatchNormalization before them, and BatchNormalizations folded into the convolutions beside them (a backward pass
then makes fewer sweeps over the maps); attention's head split moved before its transpose, so that the batch axis
stays first (seeds then ride side by side on it). Exact, biases included."""

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


def batch_first(nodes: list, constants: dict, shapes: dict) -> list:
    """``nodes`` with each ``Transpose -> Split -> Squeeze`` that moves the batch axis off the front (attention's
    ``[B, T, 3, h, d] -> [3, B, h, T, d]`` split into q, k, v) written as ``Split -> Squeeze -> Transpose``: the
    split on the input's axis the transpose sends to the split axis, the rest of the permutation after it. The
    same values; only the transposed tensor, which held the batch elsewhere, is gone (``shapes`` and ``constants``
    gain the new tensors'). A split output read other than by a Squeeze of the split axis is transposed as it was."""
    readers = wiring(nodes)[1]
    inserted, dropped = {}, set()
    for node in nodes:
        perm = list(attributes(node).get("perm", [])) if node.op_type == "Transpose" else []
        sliced = _slices_of(node, perm, readers, constants, shapes)
        if sliced is not None:  # dynamo's form: q, k, v sliced off the split axis one by one
            new, replaced = _sliced_first(node, perm, *sliced, readers, constants, shapes)
            inserted[id(node)] = new
            dropped |= {id(n) for n in replaced}
            continue
        split = readers[node.output[0]][0] if perm and len(readers.get(node.output[0], ())) == 1 else None
        if split is None or split.op_type != "Split" or shapes.get(node.input[0]) is None or perm.index(0) == 0:
            continue
        axis = int(attributes(split).get("axis", 0)) % len(perm)
        if perm[axis] == 0:  # the batch itself is split
            continue
        new, squeezes = _split_first(node, split, perm, axis, readers, constants, shapes)
        inserted[id(split)] = new
        dropped |= {id(node), *map(id, squeezes)}
    out = []
    for node in nodes:
        if id(node) in inserted:
            out.extend(inserted[id(node)])
        elif id(node) not in dropped:
            out.append(node)
    return out


def _split_first(transpose, split, perm: list, axis: int, readers: dict, constants: dict, shapes: dict):
    """``(nodes, squeezes)``: the nodes standing for ``transpose -> split`` and the squeezes of the split axis after
    it, and those squeezes (replaced)."""
    source, name = perm[axis], split.name or split.output[0]
    parts = [f"{o}::split_first" for o in split.output]
    attrs = {k: v for k, v in attributes(split).items() if k != "axis"}
    nodes = [helper.make_node("Split", [transpose.input[0], *split.input[1:]], parts, name=f"{name}::split_first",
                              axis=source, **attrs)]
    in_shape, replaced = list(shapes[transpose.input[0]]), []
    for part, output in zip(parts, split.output):
        out_shape = shapes.get(output)
        if out_shape is None:
            raise NotDecodable(f"the shape of {output!r} is not known")
        shapes[part] = tuple(in_shape[:source] + [out_shape[axis]] + in_shape[source + 1:])
        made, squeezes = _transposed_part(part, output, axis, perm, readers, constants, shapes, name)
        nodes.extend(made)
        replaced.extend(squeezes)
    return nodes, replaced


def _transposed_part(part: str, output: str, axis: int, perm: list, readers: dict, constants: dict, shapes: dict,
                     name: str):
    """``(nodes, squeezes)``: ``output`` (a part of the transposed tensor along ``axis``) made from ``part`` (the same
    part taken before the transpose): where Squeezes of that axis are its only readers and it has one row there,
    their outputs as the part squeezed then transposed by the rest of the permutation (the squeezes, replaced, are
    returned); else ``output`` as the part transposed."""
    source = perm[axis]
    squeezes = readers.get(output, [])
    if shapes[part][source] != 1 or not squeezes or not all(_squeezes(r, axis, constants) for r in squeezes):
        return [helper.make_node("Transpose", [part], [output], name=f"{name}::transposed", perm=perm)], []
    rest = [p - (p > source) for i, p in enumerate(perm) if i != axis]
    squeezed = f"{part}::squeezed"
    shapes[squeezed] = tuple(v for i, v in enumerate(shapes[part]) if i != source)
    constants[f"{squeezed}::shape"] = np.asarray(shapes[squeezed], np.int64)
    nodes = [helper.make_node("Reshape", [part, f"{squeezed}::shape"], [squeezed], name=f"{name}::squeeze_first")]
    nodes.extend(helper.make_node("Transpose", [squeezed], [r.output[0]], name=r.name, perm=rest)
                 for r in squeezes)  # each squeeze becomes the rest of the transpose
    return nodes, squeezes


def _slices_of(transpose, perm: list, readers: dict, constants: dict, shapes: dict):
    """``(axis, [(slice node, start, stop)])`` where every reader of a batch-moving ``transpose`` is a Slice of one
    range of the same axis (constant bounds, step 1), not the batch's; else None."""
    found = readers.get(transpose.output[0], []) if perm and shapes.get(transpose.input[0]) is not None else []
    if not found or perm.index(0) == 0 or any(r.op_type != "Slice" or len(r.input) not in (4, 5) for r in found):
        return None
    ranges, axes = [], set()
    for r in found:
        bounds = [constants.get(name) for name in r.input[1:]]
        if any(b is None or np.size(b) != 1 for b in bounds) or (len(bounds) == 4 and int(np.ravel(bounds[3])[0]) != 1):
            return None
        start, stop, axis = (int(np.ravel(b)[0]) for b in bounds[:3])
        size = shapes[transpose.output[0]][axis % len(perm)]
        axes.add(axis % len(perm))
        ranges.append((r, max(0, start if start >= 0 else start + size), min(size, stop if stop >= 0 else stop + size)))
    if len(axes) != 1 or perm[next(iter(axes))] == 0:
        return None
    return next(iter(axes)), ranges


def _sliced_first(transpose, perm: list, axis: int, ranges: list, readers: dict, constants: dict, shapes: dict):
    """``(nodes, replaced)``: each slice taken from the transpose's input on the axis it sends there, then squeezed
    (where a Squeeze of that axis is its only reader) and transposed by the rest of the permutation."""
    source, nodes, replaced = perm[axis], [], [transpose]
    in_shape = list(shapes[transpose.input[0]])
    for r, start, stop in ranges:
        out, replaced = r.output[0], replaced + [r]
        part, bounds = f"{out}::sliced_first", f"{out}::sliced_first::bounds"
        constants[f"{bounds}::starts"], constants[f"{bounds}::ends"] = np.array([start]), np.array([stop])
        constants[f"{bounds}::axes"] = np.array([source])
        nodes.append(helper.make_node("Slice", [transpose.input[0], f"{bounds}::starts", f"{bounds}::ends",
                                                f"{bounds}::axes"], [part], name=f"{r.name or out}::sliced_first"))
        shapes[part] = tuple(in_shape[:source] + [stop - start] + in_shape[source + 1:])
        made, squeezes = _transposed_part(part, out, axis, perm, readers, constants, shapes, r.name or out)
        nodes.extend(made)
        replaced = replaced + squeezes
    return nodes, replaced


def _squeezes(node, axis: int, constants: dict) -> bool:
    """Whether ``node`` is a Squeeze of exactly ``axis``."""
    if node.op_type != "Squeeze":
        return False
    axes = attributes(node).get("axes")
    if axes is None and len(node.input) > 1:
        axes = constants.get(node.input[1])
    return axes is not None and [int(a) for a in np.ravel(axes)] == [axis]


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
    nodes = _matrices_multiplied(nodes, constants, linear.shapes, keep, dtype)
    producer, consumers = wiring(nodes)
    return dataclasses.replace(linear, nodes=nodes, constants=constants, producer=producer, consumers=consumers)


def _matrices_multiplied(nodes: list, constants: dict, shapes: dict, keep, dtype) -> list:
    """``nodes`` with each ``x @ A (+ b) (* s, Identity ...) @ B`` of constant matrices read as ``x @ (s A B)
    (+ s b B)`` where the product is the smaller matrix (a transformer's MLP, whose activation the linearized network
    reads as a slope: 384 x 384 instead of 384 x 1536 and 1536 x 384 on ViT-S). Exact in value (the product in the
    pass's ``dtype``); the tensors between must be read by the chain alone and not be in ``keep``."""
    nodes = _live(nodes, keep)
    while True:
        readers, producer = wiring(nodes)[1], {o: n for n in nodes for o in n.output}
        fusions, used = {}, set()
        for second in nodes:
            found = _chain_before(second, readers, producer, constants, keep)
            if found is None or used & {id(n) for n in found[0]}:
                continue
            chain, first, factor, bias = found
            a_matrix, b_matrix = (np.asarray(constants[n.input[1]], dtype) for n in (first, second))
            (p, q), r = a_matrix.shape, b_matrix.shape[1]
            if p * r >= q * (p + r):  # the product would cost more than the two factors
                continue
            used |= {id(n) for n in chain}
            fusions[id(second)] = _product_nodes(first, second, factor * (a_matrix @ b_matrix),
                                                 None if bias is None else factor * (bias @ b_matrix), constants,
                                                 shapes, dtype)
        if not fusions:
            return nodes
        nodes = [m for n in nodes for m in fusions.get(id(n), [] if id(n) in used else [n])]


def _matrix(node, constants: dict) -> bool:
    """Whether ``node`` multiplies a data tensor by a constant matrix on its right."""
    return (node is not None and node.op_type == "MatMul" and len(node.input) == 2 and node.input[0] not in constants
            and np.ndim(constants.get(node.input[1])) == 2)


def _chain_before(second, readers: dict, producer: dict, constants: dict, keep):
    """``(chain, first, factor, bias)`` of ``first -> chain -> second`` (chain: the nodes from ``first`` to
    ``second`` included), or None where ``second``'s input does not come from such a product."""
    if not _matrix(second, constants) or second.output[0] in keep:  # the layer's own node stays as exported
        return None

    def single(name):
        return len(readers.get(name, [])) == 1 and name not in keep

    chain, tensor, factor, bias = [second], second.input[0], 1.0, None
    node = producer.get(tensor)
    while node is not None and single(tensor) and (node.op_type == "Identity" or _scalar(node, constants)):
        factor *= _scalar(node, constants) or 1.0  # a nonlinearity's slope, GELU's 0.5
        chain.append(node)
        tensor = next(i for i in node.input if i not in constants)
        node = producer.get(tensor)
    if node is not None and node.op_type == "Add" and single(tensor) and len(node.input) == 2:
        c = next((constants.get(i) for i in node.input if i in constants), None)
        data = [i for i in node.input if i not in constants]
        size = np.shape(constants[second.input[1]])[0]
        if c is not None and len(data) == 1 and np.size(c) == size and np.shape(c)[-1] == size:
            chain.append(node)
            bias, tensor = np.asarray(c, np.float64).reshape(-1), data[0]
            node = producer.get(tensor)
    if not (_matrix(node, constants) and single(tensor)):
        return None
    chain.append(node)
    return chain, node, factor, bias


def _product_nodes(first, second, product, bias, constants: dict, shapes: dict, dtype) -> list:
    """The nodes computing ``second``'s output as ``first``'s input times ``product`` (plus ``bias``)."""
    out = second.output[0]
    names = (f"{out}::product", f"{out}::product_bias", f"{out}::product_out")
    constants[names[0]] = product.astype(dtype)
    if bias is None:
        return [helper.make_node("MatMul", [first.input[0], names[0]], [out], name=second.name)]
    constants[names[1]] = bias.astype(dtype)
    shapes[names[2]] = shapes.get(out)
    return [helper.make_node("MatMul", [first.input[0], names[0]], [names[2]], name=f"{second.name}::product"),
            helper.make_node("Add", [names[2], names[1]], [out], name=second.name)]


def _live(nodes: list, keep) -> list:
    """The nodes ``keep`` (tensor names) depend on, in order: a pass runs no other (the linearized network keeps
    nodes that only a held factor read, such as a GELU's erf branch)."""
    producer, needed, stack = {o: n for n in nodes for o in n.output}, set(), [k for k in keep if k]
    while stack:
        node = producer.get(stack.pop())
        if node is not None and id(node) not in needed:
            needed.add(id(node))
            stack.extend(i for i in node.input if i)
    return [n for n in nodes if id(n) in needed]


def _scalar(node, constants: dict) -> float | None:
    """The factor of a Mul or Div of one data tensor by one constant scalar, else None."""
    if node.op_type not in ("Mul", "Div") or len(node.input) != 2:
        return None
    const = [constants.get(i) for i in node.input if i in constants]
    if len(const) != 1 or np.size(const[0]) != 1 or (node.op_type == "Div" and node.input[1] not in constants):
        return None
    value = float(np.asarray(const[0]).reshape(-1)[0])
    return None if value == 0 else (1 / value if node.op_type == "Div" else value)
