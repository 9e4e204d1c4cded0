"""The ONNX backend-test "light" model zoo, with weights re-randomized for decoding tests.

The light models (AlexNet, VGG19, ResNet50, DenseNet121, ...) ship without weights:
every parameter is a ``ConstantOfShape`` filled with 0.02. `randomized` replaces each
float parameter (ConstantOfShape output or float initializer) by seeded random values
whose distribution suits the input it feeds (conv weights of variance 1/fan_in, BN
variances positive, ...). `linearized` turns a model into the linear one `weights` mode
decodes (Relu, LRN, Dropout, Softmax... -> Identity, MaxPool -> AveragePool).
Both live in the library (`fdsub check` and `fdsub zoo` use them); this module names them
for the tests and adds `truncated`.
"""

from __future__ import annotations

import onnx
from onnx import helper

from fdsub_onnx.evaluate.self_test import linearized
from fdsub_onnx.evaluate.zoo import LIGHT_DIR as ZOO_DIR
from fdsub_onnx.evaluate.zoo import light_name as zoo_name
from fdsub_onnx.evaluate.zoo import light_paths as zoo_paths
from fdsub_onnx.evaluate.zoo import randomized

__all__ = ["ZOO_DIR", "linearized", "randomized", "truncated", "zoo_name", "zoo_paths"]


def truncated(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """A copy that computes only ``outputs`` (float tensors): unused nodes, initializers and inputs dropped."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    wanted, stack = set(), list(outputs)
    while stack:
        node = producer.get(stack.pop())
        if node is not None and id(node) not in wanted:
            wanted.add(id(node))
            stack.extend(node.input)
    nodes = [n for n in graph.node if id(n) in wanted]
    used = {name for n in nodes for name in n.input}
    initializers = [t for t in graph.initializer if t.name in used]
    inits = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name in used and (i.name not in inits or model.ir_version < 4)]
    outs = [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in outputs]
    new_graph = helper.make_graph(nodes, graph.name, inputs, outs, initializers)
    return helper.make_model(new_graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
