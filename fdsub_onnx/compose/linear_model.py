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

from ..graph.fold import batch_first, folded, merged_affine
from ..graph.model import Model, ancestors, wiring
from ..graph.patterns import Attention, Bilinear, ChannelGate, TokenScale
from ..graph.prepare import inferred_shapes, stored_constants
from .ops import RULES
from .ops._rule import LinearContext

__all__ = ["adjoint_problem", "folded", "linear_model", "linearized"]


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
                                {o.name for o in graph.output}, dilated_ok=opset >= 19,
                                constants=stored_constants(graph), shapes=inferred_shapes(model))
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(onnx.numpy_helper.from_array(v, n) for n, v in held.items())
    return out


def linear_model(model: Model, gates: dict | None = None) -> Model:
    """``model``'s linearized network (as ``linearized``) as a ``Model`` over the same tensors and constants.

    Built from the loaded node list, so the weights are shared, not copied; the few tensors a held layer
    norm adds get their shapes from its op (``LinearContext.shapes``).
    """
    shapes = dict(model.shapes)
    nodes, held = _linear_nodes(model.nodes, model.patterns, gates or {}, model.opset, set(), dilated_ok=True,
                                shapes=shapes, constants=model.constants)
    nodes = merged_affine(nodes, dict(model.constants) | held, held, model.shapes)
    constants = dict(model.constants) | held
    nodes = batch_first(nodes, constants, shapes)
    producer, consumers = wiring(nodes)
    return dataclasses.replace(model, nodes=nodes, shapes=shapes, constants=constants, producer=producer,
                               consumers=consumers, patterns={})


def _linear_nodes(nodes: list, patterns: dict, gates: dict, opset: int, outputs: set,
                  dilated_ok: bool = False, shapes: dict | None = None, constants: dict | None = None
                  ) -> tuple[list, dict]:
    """The linearized node list and the constants it adds (name -> array): each op's ``linear_nodes`` reading
    (``compose/ops``), the node itself where it has none; ``dilated_ok``: a dilated MaxPool becomes a dilated
    AveragePool (which onnxruntime runs from opset 19)."""
    ctx = LinearContext(used={name for node in nodes for name in node.input} | outputs, dilated_ok=dilated_ok,
                        gates=gates, held={}, opset=opset, producer={o: node for node in nodes for o in node.output},
                        patterns=patterns, shapes={} if shapes is None else shapes, constants=constants or {})
    linear = []
    for node in nodes:
        op = RULES.get(node.op_type)
        replaced = None if op is None else op.linear_nodes(node, ctx)
        linear.extend([node] if replaced is None else replaced)
    return linear, ctx.held


def adjoint_problem(linear: Model, target: str) -> str | None:
    """Why the adjoint route cannot run below ``target`` on the linearized network ``linear``, or None: an op
    without an ``adjoint`` reading (``OpRule.implements``), or a target whose batch axis holds windows in a layout
    not addressed (``graph.model.grid``)."""
    shape = linear.shapes.get(target)
    if shape is not None and shape[0] != linear.input_shape[0] and len(shape) not in (2, 3, 4):
        return (f"its batch axis holds {shape[0]} windows, patches or heads of a rank-{len(shape)} tensor; only "
                "[T, C], [windows, T, C] and [windows, C, Y, X] are addressed there")
    for node in ancestors(linear, [target]):
        op = RULES.get(node.op_type)
        if op is None:
            return f"no data-free backward rule for {node.op_type} node {linear.node_name(node)!r}"
        reason = op.adjoint_refusal(node, linear.constants)
        if reason is not None:
            return f"no data-free backward rule for {node.op_type} node {linear.node_name(node)!r}: {reason}"
    return None


def structure(model: Model) -> Model:
    """``model``'s linearized network with every held factor at a placeholder value: its structure (which ops the
    adjoint meets), without the reference input's forward pass."""
    held = {n.output[0]: np.ones(1) for n in model.nodes if n.op_type in RULES and RULES[n.op_type].held_factor}
    held |= {name: np.ones(1) for name, pattern in model.patterns.items()
             if isinstance(pattern, ChannelGate | Attention | TokenScale)}
    held |= {f"{name}::{side}": np.ones(1) for name, pattern in model.patterns.items()
             if isinstance(pattern, Bilinear) for side in ("left", "right")}
    return linear_model(model, held)
