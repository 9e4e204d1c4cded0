"""Pruning a graph to the tensors a run needs: onnxruntime computes only what is asked for."""

from __future__ import annotations

import onnx


def pruned(proto: onnx.ModelProto, target, input_name: str, batch: str | None) -> onnx.ModelProto:
    """Copy of ``proto`` computing only ``target`` (a tensor name or a list: its outputs); ``batch`` names a
    dynamic batch dim."""
    produced = {out: node for node in proto.graph.node for out in node.output}
    targets = [target] if isinstance(target, str) else list(target)
    needed, stack, seen = [], list(targets), set()
    while stack:
        name = stack.pop()
        node = produced.get(name)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        needed.append(node)
        stack.extend(n for n in node.input if n)
        stack.extend(_subgraph_inputs(node))
    used = set().union(*(set(n.input) | set(_subgraph_inputs(n)) for n in needed)) if needed else set()
    result = onnx.ModelProto()
    result.CopyFrom(proto)
    graph = result.graph
    kept = [n for n in proto.graph.node if id(n) in seen]
    del graph.node[:]
    graph.node.extend(kept)
    inits = [i for i in proto.graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    inputs = [i for i in proto.graph.input if i.name == input_name or i.name in used]
    del graph.input[:]
    graph.input.extend(inputs)
    for inp in graph.input:
        if inp.name == input_name and batch is not None:
            dim = inp.type.tensor_type.shape.dim[0]
            dim.Clear()
            dim.dim_param = batch
    del graph.value_info[:]
    del graph.output[:]
    graph.output.extend(onnx.ValueInfoProto(name=t) for t in targets)
    return result


def _subgraph_inputs(node) -> list[str]:
    """Outer-scope names read by If/Loop/Scan bodies (rare in CNNs, but keep them computable)."""
    names = []
    for attr in node.attribute:
        for graph in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
            for inner in graph.node:
                names.extend(n for n in inner.input if n)
    return names
