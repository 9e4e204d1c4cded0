"""The op base class (every reading of an op, ``OpRule``) and the helpers its readings share."""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import numpy as np
from onnx import helper

from ...errors import FdsubError, NotDecodable, PhaseDependent
from ...graph.fold import per_channel
from ...graph.model import attributes
from ..backend import array_module
from ..values import Const, Layout, Tensor

__all__ = ["READINGS", "REGISTRY", "LinearContext", "Nonlinear", "OpRule", "attributes", "averaged_node", "batched",
           "by_slope", "constant", "data", "identity_node", "instances", "instances_of_pass", "no_bias", "on",
           "optional", "per_channel", "per_instance", "reduce_to"]


#: the readings every op class gives or refuses with a reason (``OpRule.refuses``); tests/compose/test_registry.py
READINGS = ("apply", "backward", "adjoint")
#: op type -> the op (one instance of its class), filled as each class is defined: ``compose.ops.RULES``
REGISTRY: dict[str, OpRule] = {}
#: the walker's reason for an op without a bank rule (kept word for word: ``inspect`` prints it)
NO_BANK_RULE = "no rule for this op (`fdsub inspect` lists what is decodable)"


@dataclass
class LinearContext:
    """What ``OpRule.linear_nodes`` may read: the tensors the graph uses, whether a dilated AveragePool runs here
    (opset 19), the held values (output -> [C]), the constants the linearized network adds (filled), the opset,
    each tensor's producer, the export patterns (``graph.patterns``: read by their last node's op) and the
    shapes known (an op adding a tensor adds its shape)."""

    used: set
    dilated_ok: bool
    gates: dict
    held: dict
    opset: int
    producer: dict = field(default_factory=dict)
    patterns: dict = field(default_factory=dict)
    shapes: dict = field(default_factory=dict)  # tensor -> shape, filled for the tensors the ops add
    constants: dict = field(default_factory=dict)  # the graph's constant tensors (name -> array), read only


class OpRule:
    """One ONNX op type and every reading of it, in the spirit of onnx's reference evaluator (one class per op) and
    zennit (a mode overrides a rule, never tests the mode).

    Readings (methods): ``apply`` maps input values to the output value, over geometry (banks None) or banks
    (``weights``, ``fds``); rules do array work only through ``ctx.engine``. ``backward`` is ``local``'s exact
    linearization at an instance: (node, forward inputs, which are data, forward output, output gradient [M, ...])
    -> (input gradients, the bias [M] the node adds). ``deconvnet`` overrides it for rectifiers. ``adjoint`` is the
    rule of a pass over the linearized network from shapes alone (``linear = True``: the backward rule itself).
    ``linear_nodes`` are the nodes in the network ``weights`` mode decodes (``compose.linear_model``). ``slope`` is an
    elementwise op's derivative at its forward value (``local``'s rule and fds's gates). ``gate_inputs`` and
    ``gate_map`` say how fds's gate of a lower unit passes through the op; ``flops`` what a pass spends on it.

    Declarations (attributes) say what the passes keep of the op; ``refuses`` maps a reading of ``READINGS`` the op
    does not give to the reason, which is the NotDecodable message the reading raises.
    """

    refuses: dict[str, str] = {}
    #: a base class of a family of ops (its own body sets it), not an op: not registered
    family = True
    #: the backward rule takes the gradients of every output (a list)
    multi_output = False
    #: the backward rule is exact on a linear network without forward values (the adjoint's pass)
    linear = False
    #: a linear op whose first two inputs may both be data (a product): the adjoint's reason to refuse it then
    product_refusal: str | None = None
    #: how a cone pass (``modes.cone``) reads it: "window" (a convolution), "average_window", "max_window" (pools),
    #: "aligned" (one grid, position by position, channel mixing 1x1), "pad" (a shifted grid), None (whole maps only)
    cone: str | None = None
    #: an aligned op whose constants may have any shape (read per channel by the op itself)
    cone_any_constant = False
    #: which forward values a cone pass keeps for its rule: "all", "inputs", or "shapes" (the gradient alone)
    cone_values = "all"
    #: fds: "weight" (its weight is substituted by W * mean gate), "switch" (MaxPool: the mean switch), or None
    fds: str | None = None
    #: fds: its weight multiplies the last axis of its input (a MatMul): tokens [N, T, C] and channels-last maps are
    #: then read position by position, as a 1x1 convolution
    reads_last_axis = False
    #: fds: it passes on the gate of its first data input (elementwise ops, reshapes, per-channel affine maps)
    passes_gate = False
    #: fds: the gate it passes on is times its slope at the forward value (a nonlinearity between two units)
    gate_slope = False
    #: an activation read through it is still the same neuron's (elementwise or per-channel affine: ``check``)
    keeps_neuron = False
    #: with one constant operand, a per-channel affine map (``check`` follows a neuron through it)
    affine_by_constant = False
    #: a per-channel affine map of its first input by its constant inputs (BatchNormalization: ``diff`` compares a
    #: layer after it, so a copy with it fused into the weights compares equal)
    channel_affine = False
    #: a product of matrices (BLAS-bound: the cost model times it apart; ``diff`` pairs Gemm and MatMul layers)
    matrix_product = False
    #: ``weights`` mode holds a data-dependent factor of it at its value on a reference input (layer norms)
    held_factor = False
    #: the layers ``compare`` picks by default
    default_layer = False
    #: its output's bank is its inputs' banks held as they are (Concat: ``engine.Stacked``), no memory of its own
    stacks = False
    #: its output is its input's stack still held as its pieces (a per-channel affine: BatchNormalization)
    keeps_stack = False

    def __init_subclass__(cls, **kwargs):
        """Every op class is registered under its name (the ONNX op type) as it is defined."""
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("family", False):
            REGISTRY[cls.__name__] = cls()

    def reads_stack(self, node, model) -> bool:
        """Whether it reads a concatenation's stack without making its filters (the plan's memory)."""
        return self.stacks or self.keeps_stack

    def apply(self, node, inputs: list, ctx):
        raise NotDecodable(self.refusal("apply"))

    def backward(self, node, ins: list, is_data: list, out, grad):
        raise NotDecodable(self.refusal("backward"))

    def deconvnet(self, node, ins: list, is_data: list, out, grad):
        return self.backward(node, ins, is_data, out, grad)

    def adjoint(self, node, ins: list, is_data: list, out, grad):
        reason = self._adjoint_refusal(is_data[:2])
        if reason is not None:
            raise NotDecodable(reason)
        return self.backward(node, ins, is_data, out, grad)

    def linear_nodes(self, node, ctx: LinearContext) -> list | None:
        """The nodes standing for this one in ``weights`` mode's linearized network; None keeps it."""
        return None

    def values_read(self, node, constants: dict) -> str:
        """Which forward values a backward pass reads for ``node`` (``cone_values``; a product decides by whether a
        factor is constant): the tensors a pass fetches from onnxruntime."""
        return self.cone_values

    def substitutes(self, node, constants: dict) -> str | None:
        """How fds substitutes ``node`` (``fds``), None where it keeps it."""
        return self.fds

    def gate_inputs(self, node, data: list) -> list | None:
        """The data inputs whose fds gate this op passes on (``passes_gate``: the first); None where it starts a gate
        (a lower unit itself)."""
        return data[:1] if self.passes_gate else None

    def gate_map(self, node, gates: list, shape: tuple, constants: dict):
        """fds: the gate map of the output from those of ``gate_inputs`` (default: reshaped or broadcast)."""
        g = gates[0]
        return g.reshape(shape) if g.size == np.prod(shape) else np.broadcast_to(g, shape)

    def substituted_node(self, node, stat, model, substitution, constants: dict):
        """fds on the linearized network: the node composing with its substituted weight (``stat``: its statistic),
        the constants it adds written into ``constants``; None where the statistic has no data-free form."""
        return None

    def flops(self, model, node, size: float) -> float:
        """About the FLOPs one seed's backward pass spends here (``size``: the output's values per image)."""
        return size

    def gradient_is_product(self, model, node) -> bool:
        """Whether the backward pass here is a product over several input channels with strided adds (a dense
        convolution's, ``kernels.transposed``): the cost model times those apart (``modes.cost.CONV_GRADIENT_RATE``)."""
        return False

    def forward_product(self, model, node) -> str | None:
        """How onnxruntime's forward runs this op: ``"dense"``, one product over its input channels near the GEMM
        rate; ``"slow"``, products well below it (a grouped convolution's per-group GEMMs, a transposed
        convolution's GEMM and scatter); None, as fast as it reads and writes its tensors (elementwise, layout and
        depthwise ops): ``modes.cost.forward_seconds``."""
        return "dense" if self.matrix_product else None

    def adjoint_refusal(self, node, constants: dict) -> str | None:
        """Why the adjoint cannot run through ``node`` (known from the graph, before any pass), or None."""
        return self._adjoint_refusal([bool(name) and name not in constants for name in node.input[:2]])

    def _adjoint_refusal(self, is_data: list) -> str | None:
        """The reason the adjoint refuses the op when its first inputs are data or not (``is_data``), or None: the
        one ``adjoint_refusal`` gives before a pass and ``adjoint`` raises in it."""
        if not self.implements("adjoint"):
            return self.refusal("adjoint")
        return self.product_refusal if self.product_refusal and len(is_data) == 2 and all(is_data) else None

    def refusal(self, reading: str) -> str:
        return self.refuses.get(reading, f"{type(self).__name__} has no {reading} rule")

    def overrides(self, reading: str) -> bool:
        """Whether the op's class gives ``reading`` a method of its own."""
        return getattr(type(self), reading) is not getattr(OpRule, reading)

    def implements(self, reading: str) -> bool:
        """Whether the op gives ``reading``: a method of its own, ``adjoint`` through ``linear``, ``deconvnet``
        through ``backward``."""
        if reading == "adjoint" and self.linear:
            return True
        if reading == "deconvnet" and not self.overrides(reading):
            return self.implements("backward")
        return self.overrides(reading)

    def refuses_reading(self, reading: str) -> bool:
        """Whether the op declares ``reading`` refused, with its reason (``deconvnet``: as ``backward``)."""
        return (reading if reading != "deconvnet" else "backward") in self.refuses


class Nonlinear(OpRule):
    """An op ``weights`` mode reads through its linearized network (so the adjoint never meets it)."""

    family = True
    refuses = {"adjoint": "it is not linear; the adjoint runs on the linearized network, where weights mode "
                          "reads it linearly"}


#: M, the instances the running backward pass carries side by side on the batch axis (``instances``)
_INSTANCES: ContextVar[int | None] = ContextVar("instances", default=None)


@contextmanager
def instances_of_pass(m: int):
    """Within: ``instances()`` is ``m`` (``modes.backward`` sets it per pass)."""
    token = _INSTANCES.set(int(m))
    try:
        yield
    finally:
        _INSTANCES.reset(token)


def instances(grad) -> int:
    """M: the instances a gradient carries. A pass over a graph whose batch axis moves (tokens split into heads,
    ``[1, T, 3, h, d] -> [3, 1, h, T, d]``) carries one at a time, each gradient in its tensor's own shape; otherwise
    M side by side on axis 0. Outside a pass: ``len(grad)``."""
    m = _INSTANCES.get()
    return len(grad) if m is None else m


def batched(x, grad) -> tuple:
    """``x``'s shape for the instances of ``grad``: forward values may be one image's, shared by its instances
    (one instance: the tensor's own shape, wherever its batch axis is)."""
    m = instances(grad)
    return tuple(x.shape) if m == 1 else (m, *x.shape[1:])


def no_bias(grad):
    """The bias [M] of a rule that adds none."""
    return array_module(grad).zeros(instances(grad), grad.dtype)


def per_instance(products):
    """The bias [M] a rule adds: its products (gradient times offset) summed per instance."""
    return products.reshape(instances(products), -1).sum(axis=1)


def on(grad, constant):
    """A constant (NumPy, from the model) in the dtype and on the array module of ``grad``."""
    return array_module(grad).asarray(constant, dtype=grad.dtype)


def reduce_to(grad, shape):
    """Sum a broadcast gradient back to an input's shape (per instance: the batch axis is kept)."""
    shape = (1,) * (grad.ndim - len(shape)) + tuple(shape)
    axes = tuple(a for a in range(1, grad.ndim) if shape[a] == 1 and grad.shape[a] != 1)
    return grad.sum(axis=axes, keepdims=True) if axes else grad


def identity_node(node, used: set):
    """``node`` as an Identity on its first input (a used second output cannot be linearized)."""
    unused_only(node, used)
    return helper.make_node("Identity", [node.input[0]], [node.output[0]], name=node.name)


def unused_only(node, used: set) -> None:
    extra = [o for o in node.output[1:] if o in used]
    if extra:
        raise FdsubError(f"{node.op_type} node {node.name or node.output[0]!r}: its output(s) {extra} are used; "
                         "it cannot be linearized")


def constant(value, what: str) -> np.ndarray:
    """The array of a constant input; data-dependent inputs are not decodable here."""
    if not isinstance(value, Const):
        raise NotDecodable(f"its {what} is computed from the image, not a constant")
    return value.value


def data(value) -> Tensor:
    """A data input as a Tensor; a pending layout (tokens, windows, heads) sends the layers after it to the
    per-position route, a constant is refused."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, Layout):  # tokens, windows, heads: linear, but no longer a map with one filter per channel
        raise PhaseDependent("its input is a reshaped tensor (tokens, windows or heads), not a feature map: the layers "
                             "after it decode per position")
    raise NotDecodable("expected a feature map input, got a constant")


def known_shape(ctx, name: str) -> tuple:
    """The shape of tensor ``name``; a rule that needs it cannot go on without it."""
    shape = ctx.shape(name)
    if shape is None:
        raise NotDecodable("the shape of its input is unknown")
    return shape


def constant_weight(model, node):
    """The constant second input (a weight) of ``node``, or None where it has none or it is computed: what the cost
    readings (``OpRule.flops``, ``gradient_is_product``) size an op by."""
    return model.constants.get(node.input[1]) if len(node.input) > 1 else None


def optional(inputs: list, i: int):
    """Input i, or None when it is absent or empty."""
    return inputs[i] if len(inputs) > i else None


def averaged_node(node, op_type: str, used: set, dilated_ok: bool):
    """A max read as an average over the same window (``weights`` mode): an ``op_type`` node in its place;
    ``dilated_ok``: a dilated AveragePool (which onnxruntime runs from opset 19) may stand for a dilated max."""
    unused_only(node, used)
    attrs = attributes(node)
    dilations = attrs.pop("dilations", None)
    if dilations is not None and any(d != 1 for d in dilations) and dilated_ok:
        attrs["dilations"] = dilations
    elif dilations is not None and any(d != 1 for d in dilations):
        raise FdsubError(f"{node.op_type} node {node.name or node.output[0]!r} is dilated; AveragePool has no "
                         "dilations before opset 19: it cannot be linearized")
    attrs.pop("storage_order", None)
    inputs = list(node.input) if len(node.input) > 1 and op_type.startswith("Reduce") else [node.input[0]]
    return helper.make_node(op_type, inputs, [node.output[0]], name=node.name, **attrs)


def by_slope(rule, node, ins, out, grad):
    """The local linearization of an elementwise op from its slope at the forward value (``rule.slope``): the
    gradient times the slope, the offset ``f(x) - slope * x`` as the bias it adds."""
    xp = array_module(grad)
    d = xp.broadcast_to(xp.asarray(rule.slope(xp, node, ins, out), grad.dtype), out.shape)  # a float32 pass stays
    offset = out - d * ins[0]  # f(x) = d*x + offset around the instance
    return [grad * d] + [None] * (len(ins) - 1), per_instance(grad * offset)
