"""DepthToSpace, the op added as one module (``compose/ops/op_depth_to_space.py``): its backward rule is the
transpose of onnxruntime's forward, and a layer after it decodes through the adjoint route at every phase, the
identity holding against onnxruntime there."""

from __future__ import annotations

import numpy as np
import pytest
from checks import assert_identity, random_images
from netgen import NetBuilder, run_ort
from onnx import TensorProto, helper
from zoo import linearized

import fdsub_onnx as fd
from fdsub_onnx.compose.ops import RULES

CASES = [("DCR", 2), ("CRD", 2), ("DCR", 3), ("CRD", 3)]


def _depth_to_space(b: NetBuilder, x: str, mode: str, block: int) -> str:
    c, h, w = b.shapes[x]
    return b._node("DepthToSpace", [x], (c // block**2, h * block, w * block), blocksize=block, mode=mode)


@pytest.mark.parametrize("mode,block", CASES)
def test_backward_rule_is_the_transpose_of_the_forward(mode, block):
    """<DepthToSpace(x), g> == <x, backward(g)> for random x and g, the forward computed by onnxruntime."""
    rng = np.random.default_rng(block)
    c, h, w = 2 * block * block, 3, 4
    node = helper.make_node("DepthToSpace", ["x"], ["y"], blocksize=block, mode=mode)
    graph = helper.make_graph([node], "d2s", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    import onnxruntime as ort

    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
                                   .SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((1, c, h, w)).astype(np.float32)
    y = session.run(None, {"x": x})[0].astype(np.float64)
    grad = rng.standard_normal((5, *y.shape[1:]))
    (gx,), bias = RULES["DepthToSpace"].backward(node, [x], [True], y, grad)
    assert gx.shape == (5, c, h, w) and not bias.any()
    np.testing.assert_allclose((grad * y).sum(axis=(1, 2, 3)), (gx * x.astype(np.float64)).sum(axis=(1, 2, 3)),
                               rtol=1e-10)
    # a permutation: every input value is read exactly once
    assert sorted(gx[0].ravel()) == pytest.approx(sorted(grad[0].ravel()))


@pytest.mark.parametrize("mode,block", CASES)
def test_layer_after_it_decodes_at_every_phase(mode, block, load):
    """conv -> ReLU -> DepthToSpace -> conv: the last conv decodes per position (adjoint), exact at each phase."""
    b = NetBuilder(height=5, width=6, seed=block)
    x = b.relu(b.conv("input", 2 * block * block, 3, 1, (1, 1, 1, 1)))
    up = _depth_to_space(b, x, mode, block)
    last = b.conv(up, 3, 3, 1, (1, 1, 1, 1))
    proto = b.build([last])
    model = load(proto)
    layer = {lay.name: lay for lay in fd.inspect_model(model).layers}[last]
    assert layer.decodable and layer.per_position, layer
    images = random_images(model, 3, seed=4)
    acts = run_ort(linearized(proto, {}, {}), images, [last])
    qy, qx = acts[last].shape[2:]
    for q in sorted({(qy // 2 + dy, qx // 2 + dx) for dy in range(block) for dx in range(block)} | {(0, 0)}):
        decoded = fd.decode(model, last, dtype="float64", position=q)
        assert decoded.plan.route == "adjoint" and decoded.position == q
        assert_identity(decoded, acts[last], images, rtol=1e-5)
