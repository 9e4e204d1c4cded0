"""Export patterns that the op rules read as one unit, found once when a model is loaded.

- ``SelfGated``: a product ``a * b`` whose two factors are both elementwise functions of one tensor x
  (SiLU/Swish ``x * Sigmoid(x)``, HardSwish ``x * HardSigmoid(x)`` or ``x * Clip(x + 3, 0, 6) / 6``, Mish
  ``x * Tanh(Softplus(x))``, GELU ``(x * 0.5) * (1 + Erf(x / sqrt 2))``). It is an elementwise nonlinearity
  of x, which ``weights`` mode reads as its linear asymptote ``slope * x`` for large x (1 for SiLU, GELU,
  Mish, HardSwish; 6 for ``x * Clip(x + 3, 0, 6)`` before its ``/ 6``), evaluated once with onnx's
  reference evaluator; ``local`` mode follows its product and chain rules exactly.
- ``Attention``: a MatMul of an attention matrix (a Softmax's output) and values: ``weights`` mode holds the
  matrix at its value for a reference input (a constant mixing of the values), ``fds`` too for now, ``local``
  follows the product exactly.
- ``ChannelGate``: a product of a feature map [N, C, H, W] and a data-dependent per-channel gate
  [N, C, 1, 1] (squeeze-and-excitation, channel attention). Broadcast over the map, it does not change the
  map's geometry; ``weights`` mode holds it at its value for a reference input, ``fds`` at its mean over
  the images, ``local`` at each instance's own value.

An elementwise function of x is a chain of unary elementwise ops, of Add/Sub/Mul/Div with a constant, and of sums
and products of two functions of the same x. A
quantized graph's Q/DQ nodes between x and f(x) (onnxruntime's QDQ format around every op: ``x * HardSigmoid(x)``
becomes ``DQ(Q(x)) * DQ(Q(HardSigmoid(DQ(Q(x)))))``) are links of the chain too, and the slope is the float
pattern's (the chain evaluated with them read as the identity, as ``weights`` mode reads a QDQ pair).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: unary ops that keep the shape and act on each value alone
ELEMENTWISE = frozenset({
    "Abs", "Celu", "Clip", "Elu", "Erf", "Exp", "Gelu", "HardSigmoid", "HardSwish", "Identity", "LeakyRelu", "Mish",
    "Neg", "Relu", "Selu", "Sigmoid", "Softplus", "Softsign", "Tanh", *("QuantizeLinear", "DequantizeLinear"),
})
#: the links of a chain that a float pattern reads as the identity (quantization, rounding and saturation ignored)
QUANTIZATION = frozenset({"QuantizeLinear", "DequantizeLinear"})
#: binary ops that are elementwise in their data input when the other input is a constant
WITH_CONSTANT = frozenset({"Add", "Sub", "Mul", "Div", "Pow"})


@dataclass(frozen=True)
class SelfGated:
    """``output = a * b`` with a and b elementwise functions of ``x``; ``slope`` (per channel [C], or a
    scalar) is the product's slope for large x, so that it reads as ``slope * x`` in ``weights`` mode."""

    x: str
    slope: np.ndarray | float = 1.0

    def __eq__(self, other):
        return isinstance(other, SelfGated) and self.x == other.x and np.array_equal(self.slope, other.slope)

    __hash__ = None


@dataclass(frozen=True)
class Attention:
    """``output = held @ x`` (or ``x @ held``): an attention matrix ``held`` (a Softmax's output, through Dropout,
    Identity or Cast) mixing the values ``x``. ``weights`` mode holds it at its value for a reference input, so the
    product is a constant mixing of x; ``local`` follows the product exactly at each instance."""

    held: str
    x: str


@dataclass(frozen=True)
class Bilinear:
    """``output = left @ right`` of two data tensors neither of which is an attention matrix (attention's scores
    Q K^T): ``weights`` mode reads it as its tangent plane at the reference input, ``left @ R + L @ right - L @ R``
    (L, R the factors there), exact there and linear in the image; ``local`` at each instance."""

    left: str
    right: str


#: ops between a Softmax and the product that reads it (the attention matrix passes them unchanged)
PASSING = frozenset({"Identity", "Dropout", "Cast"})


@dataclass(frozen=True)
class ChannelGate:
    """``output = x * gate``: ``x`` a feature map, ``gate`` [N, C, 1, 1] computed from the data."""

    x: str
    gate: str


@dataclass(frozen=True)
class TokenScale:
    """``output = x * scale`` or ``x / scale`` (``divide``) with ``scale`` [..., 1] computed from the data, one
    number per position over the last axis: a normalization written out (RMSNorm's ``x * 1/sqrt(mean(x^2) + eps)``,
    a legacy LayerNorm's ``(x - mean) / sqrt(var + eps)``). Held like LayerNormalization's 1/std (its factor's mean
    over the positions, ``modes.gates``); ``local`` follows both factors."""

    x: str
    scale: str
    divide: bool = False


def _token_scale(node, constants: dict, shapes: dict) -> TokenScale | None:
    """The ``TokenScale`` a Mul or Div of two data tensors forms, or None."""
    if node.op_type not in ("Mul", "Div") or len(node.input) != 2 or any(n in constants for n in node.input):
        return None
    a, b = node.input
    sa, sb = shapes.get(a), shapes.get(b)
    if sa is None or sb is None or len(sa) < 3 or len(sa) != len(sb):
        return None
    for x, s, shape_x, shape_s in ((a, b, sa, sb), (b, a, sb, sa)):
        if tuple(shape_s) == (*tuple(shape_x)[:-1], 1) and shape_x[-1] > 1 and (node.op_type == "Mul" or s == b):
            return TokenScale(x, s, node.op_type == "Div")
    return None


def find_patterns(nodes, producer: dict, constants: dict, shapes: dict, opset: int = 17) -> dict:
    """Output tensor of each Mul node that forms a pattern -> its ``SelfGated``, ``ChannelGate`` or ``TokenScale``
    (a Div's too); of each MatMul of two data tensors -> its ``Attention`` or ``Bilinear``."""
    found = {}
    order = {id(node): i for i, node in enumerate(nodes)}
    for node in nodes:
        scale = _token_scale(node, constants, shapes)
        if scale is not None:
            found[node.output[0]] = scale
            continue
        if node.op_type == "MatMul" and len(node.input) == 2 and not any(n in constants for n in node.input):
            softmax = [_from_softmax(n, producer) for n in node.input]
            if softmax[0] != softmax[1]:  # one factor is an attention matrix
                held = 0 if softmax[0] else 1
                found[node.output[0]] = Attention(held=node.input[held], x=node.input[1 - held])
            elif not any(softmax):
                found[node.output[0]] = Bilinear(*node.input)
            continue
        if node.op_type != "Mul" or len(node.input) != 2 or any(n in constants for n in node.input):
            continue
        a, b = node.input
        sa, sb, so = shapes.get(a), shapes.get(b), shapes.get(node.output[0])
        if sa is not None and sa == sb == so:
            (root, chain), (other, chain_b) = (elementwise_chain(n, producer, constants, shapes) for n in (a, b))
            same = root == other
            if same:
                root, chain, chain_b = _nearest_root(a, b, chain + chain_b, producer, constants, shapes, order)
            slope = _asymptotic_slope(root, sorted({id(n): n for n in chain + chain_b + [node]}.values(),
                                                   key=lambda n: order[id(n)]), constants, sa, opset)
            if same and slope is not None:
                found[node.output[0]] = SelfGated(root, slope)
                continue
        gate = _channel_gate(sa, sb)
        if gate is not None:
            found[node.output[0]] = ChannelGate(x=(a, b)[1 - gate], gate=(a, b)[gate])
    return found


def _nearest_root(a: str, b: str, nodes: list, producer: dict, constants: dict, shapes: dict, order: dict):
    """``(x, chain_a, chain_b)`` for the last tensor x that both ``a`` and ``b`` are elementwise functions of alone:
    GELU's ``z * Phi(z)`` with ``z = x W + bias`` is a product of functions of z (read as z: the bias kept), not
    only of the MatMul's output."""
    candidates = sorted({n.output[0]: order[id(n)] for n in nodes}.items(), key=lambda item: -item[1])
    for tensor, _ in candidates:
        cut = {name: node for name, node in producer.items() if name != tensor}
        (root_a, chain_a), (root_b, chain_b) = (elementwise_chain(n, cut, constants, shapes) for n in (a, b))
        if root_a == root_b == tensor:
            return tensor, chain_a, chain_b
    root, chain_a = elementwise_chain(a, producer, constants, shapes)
    return root, chain_a, elementwise_chain(b, producer, constants, shapes)[1]


def gated_nodes(node, x: str, producer: dict, constants: dict, shapes: dict) -> list:
    """The nodes of a self-gated product ``node`` (``a * b``, both elementwise functions of ``x``) from ``x`` on:
    both chains and the Mul (unordered)."""
    cut = {name: n for name, n in producer.items() if name != x}
    chains = [elementwise_chain(n, cut, constants, shapes)[1] for n in node.input]
    return list({id(n): n for n in chains[0] + chains[1] + [node]}.values())


def _from_softmax(name: str, producer: dict) -> bool:
    """Whether tensor ``name`` is a Softmax's output (through ops that pass it unchanged)."""
    node = producer.get(name)
    while node is not None and node.op_type in PASSING:
        node = producer.get(node.input[0])
    return node is not None and node.op_type == "Softmax"


def elementwise_chain(name: str, producer: dict, constants: dict, shapes: dict) -> tuple[str, list]:
    """(x, nodes): the tensor that ``name`` is an elementwise function of, following it back as far as it goes, and
    the nodes between. A sum or product of two data tensors is a link when both are functions of the same x (GELU's
    tanh form ``x + 0.044715 * x * x * x``)."""
    node = producer.get(name)
    if node is None or shapes.get(node.output[0]) is None:
        return name, []
    if node.op_type in ELEMENTWISE and node.input:
        data = [node.input[0]]
    elif node.op_type in WITH_CONSTANT and len(node.input) == 2:
        data = [n for n in node.input if n not in constants]
        if node.op_type == "Pow" and data != [node.input[0]]:
            return name, []
    else:
        return name, []
    if not data or any(shapes.get(d) != shapes.get(node.output[0]) for d in data):
        return name, []
    found = [elementwise_chain(d, producer, constants, shapes) for d in data]
    if len({root for root, _ in found}) != 1:
        return name, []
    nodes = {id(n): n for _, chain in found for n in chain}
    return found[0][0], [*nodes.values(), node]


LARGE = 1000.0  # "large x" for the asymptote: every saturating gate of real exports is flat there


def _asymptotic_slope(x: str, nodes: list, constants: dict, shape, opset: int) -> np.ndarray | float | None:
    """The slope per channel of the elementwise function ``nodes`` compute from ``x``, for large x (None when it
    is not asymptotically linear, e.g. x * x): f(2L) - f(L) over L, checked against f(4L) - f(2L)."""
    from onnx import TensorProto, helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    shape = (1, *tuple(shape)[1:])
    nodes = [helper.make_node("Identity", node.input[:1], node.output[:1]) if node.op_type in QUANTIZATION else node
             for node in nodes]  # the float pattern
    inits = {n: constants[n] for node in nodes for n in node.input if n in constants}
    graph = helper.make_graph(nodes, "asymptote", [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.asarray(v), n) for n, v in inits.items()])
    try:
        run = ReferenceEvaluator(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))
        with np.errstate(all="ignore"):  # both branches of the reference's Sigmoid overflow at large x
            ys = [np.asarray(run.run(None, {x: np.full(shape, t * LARGE, np.float32)})[0], np.float64)
                  for t in (1, 2, 4)]
    except Exception:
        return None
    if any(y.shape != shape for y in ys):
        return None
    near, far = (ys[1] - ys[0]) / LARGE, (ys[2] - ys[1]) / (2 * LARGE)
    if not (np.isfinite(near).all() and np.allclose(near, far, rtol=1e-3, atol=1e-6)):
        return None
    slope = np.round(far, 6)
    if np.all(slope == slope.flat[0]):
        return float(slope.flat[0])
    per_channel = slope.reshape(shape[0], shape[1], -1)[0, :, 0] if len(shape) > 2 else slope.reshape(-1)
    if len(shape) == 4 and np.array_equal(slope, np.broadcast_to(per_channel[None, :, None, None], shape)):
        return per_channel
    return None  # a slope varying over space: not one elementwise nonlinearity of a map


def _channel_gate(sa, sb) -> int | None:
    """Which input (0 or 1) is a per-channel gate over the other, a map; None when neither is."""
    if sa is None or sb is None or len(sa) != 4 or len(sb) != 4:
        return None
    small = [int(np.prod(s[2:])) == 1 for s in (sa, sb)]
    if small[0] == small[1] or sa[1] != sb[1]:
        return None
    return 0 if small[0] else 1
