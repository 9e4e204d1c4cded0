"""Token tensors and attention (a ViT block written as exporters write it, with onnx.helper): every Conv, MatMul and
Gemm layer decodes in ``weights`` mode per token, the identity exact against onnxruntime on the linearized network
(attention matrices held at the reference input, attention scores read as their tangent plane there, layer norms'
1/std held); ``local``'s rules (Softmax's Jacobian, the product rule through Q K^T and A V, layer norm, GELU) give
the exact input gradient at an instance: the local identity holds and central differences through onnxruntime
agree."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from netgen import run_ort
from onnx import TensorProto, helper, numpy_helper

import fdsub_onnx as fd
from fdsub_onnx.evaluate.self_test import linearized
from fdsub_onnx.graph.model import as_map, grid
from fdsub_onnx.graph.patterns import Attention, Bilinear
from fdsub_onnx.modes.backward import instance_gradients
from fdsub_onnx.modes.gates import reference_gates

C, HEADS, PATCH, SIZE = 8, 2, 4, 16
TOKENS = (SIZE // PATCH) ** 2 + 1  # the patch grid and a class token


class _Graph:
    def __init__(self, seed: int):
        self.rng, self.nodes, self.inits, self.count = np.random.default_rng(seed), [], [], 0

    def const(self, value, dtype=np.float32) -> str:
        self.count += 1
        name = f"c{self.count}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def weight(self, *shape, scale=0.4) -> str:
        return self.const(self.rng.standard_normal(shape) * scale)

    def op(self, op_type: str, inputs, outputs: int = 1, **attrs):
        self.count += 1
        names = [f"{op_type.lower()}_{self.count}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=names[0], **attrs))
        return names[0] if outputs == 1 else names

    def layer_norm(self, x: str) -> str:
        return self.op("LayerNormalization", [x, self.const(1 + 0.1 * self.rng.standard_normal(C)),
                                              self.const(0.1 * self.rng.standard_normal(C))], axis=-1)

    def linear(self, x: str, n_in: int, n_out: int) -> str:
        return self.op("Add", [self.op("MatMul", [x, self.weight(n_in, n_out)]), self.weight(n_out, scale=0.1)])

    def gelu(self, x: str) -> str:
        erf = self.op("Erf", [self.op("Div", [x, self.const(np.sqrt(2.0))])])
        return self.op("Mul", [self.op("Mul", [x, self.op("Add", [erf, self.const(1.0)])]), self.const(0.5)])


def vit_block(seed: int = 0, slices: bool = False, token_major: bool = False) -> tuple[onnx.ModelProto, dict]:
    """Patch embedding, class token, position embedding, one pre-norm block (multi-head attention with the heads
    split through the batch axis as timm's export does, a GELU MLP), the class token's head. ``slices``: q, k and v
    taken off axis 0 by three Slices, as torch's dynamo exporter writes it, instead of one Split. ``token_major``:
    the heads merged and projected as torchvision's ``nn.MultiheadAttention`` exports them, tokens first and the
    batch folded into the rows of a 2-D Gemm with a bias ([T, 1, h, d] -> [T * 1, C] -> Gemm -> [T, 1, C])."""
    g = _Graph(seed)
    d = C // HEADS
    patches = g.op("Conv", ["input", g.weight(C, 3, PATCH, PATCH, scale=0.2), g.weight(C, scale=0.1)],
                   kernel_shape=[PATCH, PATCH], strides=[PATCH, PATCH])
    tokens = g.op("Transpose", [g.op("Reshape", [patches, g.const([1, C, -1], np.int64)])], perm=[0, 2, 1])
    x = g.op("Add", [g.op("Concat", [g.weight(1, 1, C), tokens], axis=1), g.weight(1, TOKENS, C, scale=0.1)])
    qkv = g.linear(g.layer_norm(x), C, 3 * C)
    heads = g.op("Transpose", [g.op("Reshape", [qkv, g.const([1, TOKENS, 3, HEADS, d], np.int64)])],
                 perm=[2, 0, 3, 1, 4])
    if token_major:  # [T, 1, 3, C] -> [3, T, 1, C], q, k and v gathered off axis 0, each to [1, h, T, d]
        rows = g.op("Reshape", [g.op("Transpose", [qkv], perm=[1, 0, 2]), g.const([TOKENS, 1, 3, C], np.int64)])
        stacked = g.op("Squeeze", [g.op("Transpose", [g.op("Unsqueeze", [rows, g.const([0], np.int64)])],
                                        perm=[3, 1, 2, 0, 4]), g.const([3], np.int64)])
        parts = [g.op("Reshape", [g.op("Transpose", [g.op("Reshape", [
            g.op("Gather", [stacked, g.const(i, np.int64)], axis=0), g.const([TOKENS, HEADS, d], np.int64)])],
            perm=[1, 0, 2]), g.const([1, HEADS, TOKENS, d], np.int64)]) for i in range(3)]
        parts = [g.op("Unsqueeze", [part, g.const([0], np.int64)]) for part in parts]
    elif slices:
        parts = [g.op("Slice", [heads, g.const([i], np.int64), g.const([i + 1], np.int64), g.const([0], np.int64)])
                 for i in range(3)]
    else:
        parts = g.op("Split", [heads, g.const([1, 1, 1], np.int64)], outputs=3, axis=0)
    q, k, v = (g.op("Squeeze", [part, g.const([0], np.int64)]) for part in parts)
    scores = g.op("MatMul", [g.op("Mul", [q, g.const(d**-0.5)]), g.op("Transpose", [k], perm=[0, 1, 3, 2])])
    mixed = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
    if token_major:
        rows = g.op("Reshape", [g.op("Transpose", [mixed], perm=[2, 0, 1, 3]), g.const([TOKENS, C], np.int64)])
        projected = g.op("Gemm", [rows, g.weight(C, C), g.weight(C, scale=0.1)], transB=1)
        merged = g.op("Transpose", [g.op("Reshape", [projected, g.const([TOKENS, 1, C], np.int64)])], perm=[1, 0, 2])
        x = g.op("Add", [x, merged])
    else:
        merged = g.op("Reshape", [g.op("Transpose", [mixed], perm=[0, 2, 1, 3]), g.const([1, TOKENS, C], np.int64)])
        x = g.op("Add", [x, g.linear(merged, C, C)])
    x = g.op("Add", [x, g.linear(g.gelu(g.linear(g.layer_norm(x), C, 2 * C)), 2 * C, C)])
    cls = g.op("Gather", [g.layer_norm(x), g.const(0, np.int64)], axis=1)
    logits = g.op("Gemm", [cls, g.weight(5, C), g.weight(5, scale=0.1)], transB=1)
    graph = helper.make_graph(g.nodes, "vit", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, SIZE,
                                                                                                          SIZE])],
                              [helper.make_tensor_value_info(logits, TensorProto.FLOAT, None)], g.inits)
    names = {"patches": patches, "scores": scores, "mixed": mixed, "logits": logits}
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), names


def _saved(tmp_path_factory, **variant):
    proto, names = vit_block(**variant)
    path = tmp_path_factory.mktemp("vit") / "vit.onnx"
    onnx.save(proto, str(path))
    return fd.load_model(str(path)), proto, names


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    return _saved(tmp_path_factory)


def _images(count, seed):
    return np.random.default_rng(seed).standard_normal((count, 3, SIZE, SIZE)).astype(np.float32)


def test_every_layer_is_listed_decodable_with_its_tokens(vit):
    model, _, names = vit
    assert isinstance(model.patterns[names["mixed"]], Attention)
    assert isinstance(model.patterns[names["scores"]], Bilinear)
    layers = fd.inspect_model(model).layers
    assert len(layers) == 8 and all(layer.decodable for layer in layers), [(lay.name, lay.reason) for lay in layers]
    tokens = [layer for layer in layers if layer.per_position and layer.op == "MatMul"]
    assert {layer.channels for layer in tokens} >= {C, 3 * C, 2 * C}  # channels on the last axis, not the tokens


@pytest.mark.parametrize("reference", [None, "images"])
def test_weights_identity_at_every_token_layer(vit, reference):
    """activation = <filter, image> + bias at the decoded token, for every layer, on images other than the
    reference, against onnxruntime on the linearized network (the held values as decoded)."""
    _assert_weights_identity(*vit[:2], reference)


def test_weights_identity_through_a_token_major_projection(tmp_path_factory):
    """The same identity through attention as torchvision's ViT exports it: q, k and v gathered off axis 0 of a
    [3, T, 1, C] stack (a Gather over a tensor whose batch axis is elsewhere: refused before), and the output
    projection a 2-D Gemm with a bias over rows that are the tokens (its bias added once per instance, not once
    per token row: every layer after it was an internal error); the projection itself is addressed at (token, 0)
    (refused before: a rank-2 tensor's batch axis held no position) and its top-N and local decode run."""
    model, proto, _ = _saved(tmp_path_factory, token_major=True)
    layers = fd.inspect_model(model).layers
    projection = next(layer for layer in layers if layer.op == "Gemm")  # its rows [T, C]: token t at (t, 0)
    assert projection.decodable and projection.per_position and grid(model, projection.name) == (TOKENS, 1)
    assert all(layer.decodable for layer in layers)
    _assert_weights_identity(model, proto, None)
    images = _images(3, seed=5)  # top-N of the projection's rows: (token, 0) of the image that holds its best value
    top = fd.capture_top(model, projection.name, fd.ArrayImages(images), top=1)
    acts = run_ort(proto, images, [projection.name])[projection.name].reshape(3, TOKENS, C)
    best = acts.reshape(-1, C).argmax(axis=0)
    np.testing.assert_array_equal(top.image_index[:, 0], best // TOKENS)
    np.testing.assert_array_equal(top.position[:, 0], np.stack([best % TOKENS, 0 * best], axis=1))
    np.testing.assert_allclose(top.values[:, 0], acts.reshape(-1, C).max(axis=0), rtol=1e-5)
    local = fd.decode(model, projection.name, mode="local", images=fd.ArrayImages(images), top=1, neurons="0-1")
    assert local.filters.shape == (2, 3, SIZE, SIZE) and np.isfinite(local.filters).all()
    for layer in layers:  # fds reads the projection's input rows position by position (an internal error before)
        decoded = fd.decode(model, layer.name, mode="fds", images=fd.ArrayImages(_images(8, seed=2)), top=2,
                            neurons="0-1")
        assert np.isfinite(decoded.filters).all() and np.abs(decoded.filters).max() > 0, layer.name


def _assert_weights_identity(model, proto, reference):
    images = _images(4, seed=1)
    gate_reference = fd.ArrayImages(_images(3, seed=9)) if reference else None
    for layer in (layer for layer in fd.inspect_model(model).layers if layer.decodable):
        rows, columns = grid(model, layer.name)
        for position in {(rows // 2, columns // 2), (rows - 1, columns - 1), (0, 0)}:
            decoded = fd.decode(model, layer.name, dtype="float64", neurons="0-1", position=position,
                                gate_reference=gate_reference)
            held = reference_gates(model, [layer.name], gate_reference)
            acts = run_ort(linearized(proto, model.patterns, held), images, [layer.name])[layer.name]
            acts = as_map(model, layer.name, acts)[:, decoded.neurons, position[0], position[1]]
            (y, x), (ry, rx) = decoded.origin, decoded.filters.shape[2:]
            if decoded.exact_at == "interior":  # a map layer: its origin is that of position (0, 0)
                y, x = y + position[0] * decoded.stride[0], x + position[1] * decoded.stride[1]
            padded = np.pad(images.astype(np.float64), ((0, 0), (0, 0), (ry, ry), (rx, rx)))
            patch = padded[:, None, :, y + ry : y + 2 * ry, x + rx : x + 2 * rx]
            got = (decoded.filters[None] * patch).sum(axis=(2, 3, 4)) + decoded.bias
            np.testing.assert_allclose(got, acts, rtol=1e-5, atol=1e-5 * np.abs(acts).max(), err_msg=layer.name)


@pytest.mark.parametrize("layer", ["scores", "mixed", "logits"])
def test_local_filters_are_exact_input_gradients(vit, layer):
    """local's instance filter is the input gradient (central differences through onnxruntime) and the local
    identity holds: activation = <filter, image> + bias, through Softmax, the attention products, layer norms,
    GELU and heads split through the batch axis."""
    model, proto, names = vit
    target = names[layer]
    images = _images(2, seed=3)
    shape = model.shapes[target]
    neurons = np.array([1, 0])
    positions = np.array([[3, 2], [TOKENS - 1, 3]]) if len(shape) == 4 else np.array([[0, 0], [0, 0]])
    grads, bias = instance_gradients(model, target, images, neurons, positions)
    acts = run_ort(proto, images, [target])[target].astype(np.float64)
    if len(shape) == 4:
        want = acts[np.arange(2), neurons, positions[:, 0], positions[:, 1]]
    else:
        want = acts[np.arange(2), neurons]
    np.testing.assert_allclose((grads * images).sum(axis=(1, 2, 3)) + bias, want, rtol=1e-4,
                               atol=1e-5 * np.abs(acts).max())
    rng, eps = np.random.default_rng(0), 1e-2
    for i in range(2):
        direction = rng.standard_normal(images.shape[1:]).astype(np.float32)
        plus, minus = (run_ort(proto, (images[i] + s * eps * direction)[None], [target])[target].astype(np.float64)
                       for s in (1, -1))
        index = (0, neurons[i], *positions[i]) if len(shape) == 4 else (0, neurons[i])
        numeric = (plus[index] - minus[index]) / (2 * eps)
        assert numeric == pytest.approx(float((grads[i] * direction).sum()), rel=2e-2, abs=1e-3 * np.abs(acts).max())


@pytest.mark.parametrize("layer", ["mixed", "logits"])
def test_top_and_local_decode_on_token_layers(vit, layer):
    """``top`` ranks (image, token) instances of a token layer, and ``local`` decodes them: every instance's field is
    the whole image, the per-instance identity holds against onnxruntime on the real network."""
    from checks import assert_instance_identity

    model, proto, names = vit
    target = {"mixed": [lay.name for lay in fd.inspect_model(model).layers if lay.channels == 2 * C][0],
              "logits": names["logits"]}[layer]
    images = _images(6, seed=4)
    decoded = fd.decode(model, target, mode="local", images=fd.ArrayImages(images), top=3, neurons="0-3",
                        per_instance=True, dtype="float64")
    acts = as_map(model, target, run_ort(proto, images, [target])[target])
    found = decoded.instances
    want = acts[found.image_index, np.asarray(decoded.neurons)[:, None], found.position[..., 0], found.position[..., 1]]
    np.testing.assert_allclose(found.values, want, rtol=1e-5, atol=1e-5 * np.abs(acts).max())  # the tokens read
    assert decoded.filters.shape[2:] == (SIZE, SIZE)  # a token's field: the whole image
    assert_instance_identity(decoded, acts, images, rtol=1e-4)


def test_neuron_feature_of_a_token_layer_is_a_weighted_mean_of_whole_images(vit):
    """The Neuron Feature of a token neuron: its instances' fields are whole images, so it is a weighted mean of the
    images holding them (within their range, finite, image-sized)."""
    from fdsub_onnx.data.topn import instance_weights
    from fdsub_onnx.runtime.capture import capture_top

    model, _, names = vit
    target = names["logits"]
    images = _images(8, seed=6)
    top = capture_top(model, target, fd.ArrayImages(images), top=3, neurons="0-2")
    nf = fd.neuron_feature(model, top, fd.ArrayImages(images))
    assert nf.filters.shape == (3, 3, SIZE, SIZE) and np.isfinite(nf.filters).all()
    weights = instance_weights(top)
    for k in range(3):
        w = weights[k] / weights[k].sum()
        want = (w[:, None, None, None] * images[top.image_index[k]]).sum(axis=0)
        np.testing.assert_allclose(nf.filters[k], want, rtol=1e-5, atol=1e-6)


def test_channels_last_windows_on_the_batch_axis(tmp_path):
    """MaxViT's block attention input: an NHWC map cut into windows on the batch axis [W, y, x, C], a pointwise
    MatMul over its channels: decoded per position (window-major rows), the identity exact against onnxruntime."""
    g = _Graph(5)
    conv = g.op("Conv", ["input", g.weight(C, 3, 3, 3, scale=0.3)], pads=[1, 1, 1, 1])  # [1, C, 8, 8]
    nhwc = g.op("Transpose", [conv], perm=[0, 2, 3, 1])  # [1, 8, 8, C]
    blocks = g.op("Reshape", [nhwc, g.const([1, 2, 4, 2, 4, C], np.int64)])
    windows = g.op("Reshape", [g.op("Transpose", [blocks], perm=[0, 1, 3, 2, 4, 5]), g.const([4, 4, 4, C], np.int64)])
    last = g.op("MatMul", [windows, g.weight(C, 6)])  # [4, 4, 4, 6]
    graph = helper.make_graph(g.nodes, "windows", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                 [1, 3, 8, 8])],
                              [helper.make_tensor_value_info(last, TensorProto.FLOAT, None)], g.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(proto, str(tmp_path / "w.onnx"))
    model = fd.load_model(str(tmp_path / "w.onnx"))
    assert grid(model, last) == (16, 4)
    layer = {lay.name: lay for lay in fd.inspect_model(model).layers}[last]
    assert layer.decodable and layer.channels == 6, layer
    images = _images(3, seed=8).reshape(3, 3, SIZE, SIZE)[:, :, :8, :8].copy()
    acts = as_map(model, last, run_ort(proto, images, [last])[last])  # [3, 6, 16, 4]
    for position in [(0, 0), (5, 2), (15, 3)]:
        decoded = fd.decode(model, last, dtype="float64", position=position)
        (y, x), (ry, rx) = decoded.origin, decoded.filters.shape[2:]
        got = (decoded.filters[None] * images[:, None, :, y : y + ry, x : x + rx]).sum(axis=(2, 3, 4)) + decoded.bias
        np.testing.assert_allclose(got, acts[:, decoded.neurons, position[0], position[1]], rtol=1e-6, atol=1e-6)
    from checks import assert_instance_identity

    local = fd.decode(model, last, mode="local", images=fd.ArrayImages(images), top=2, neurons="0-2",
                      per_instance=True, dtype="float64")
    assert_instance_identity(local, acts, images, rtol=1e-6)  # top-N and the seeds address the same windows


def test_the_default_position_is_the_patch_grid_centre(vit):
    """Tokens from a 4x4 patch grid after one class token: the default token is patch (2, 2), token 1 + 2*4 + 2."""
    from fdsub_onnx.graph.model import patch_grid

    model, _, names = vit
    target = [lay.name for lay in fd.inspect_model(model).layers if lay.channels == 2 * C][0]
    assert patch_grid(model, target) == (1, 4, 4)
    assert fd.decode(model, target, neurons=0).position == (0, 11)


def test_tokens_are_addressed_by_patch_or_as_the_class_token(vit):
    model, _, names = vit
    target = [lay.name for lay in fd.inspect_model(model).layers if lay.channels == 2 * C][0]
    assert fd.decode(model, target, neurons=0, position="cls").position == (0, 0)
    assert fd.decode(model, target, neurons=0, position="patch:3,1").position == (0, 1 + 3 * 4 + 1)
    with pytest.raises(fd.FdsubError, match="outside the 4x4 patch grid"):
        fd.decode(model, target, neurons=0, position="patch:4,0")
    with pytest.raises(fd.FdsubError, match="has none"):
        fd.decode(model, names["patches"], neurons=0, position="cls")


def test_a_detection_heads_softmax_over_bins_decodes_per_position(tmp_path):
    """YOLOv8's distribution focal loss head: a box map reshaped to [1, 4, 16, A], bins moved to the channel axis,
    Softmax over them, a fixed 1x1 conv (weights 0..15): the conv after the Softmax decodes per position (the Softmax
    read as the identity, as the linearized network reads it) and obeys the identity against onnxruntime; local
    follows the Softmax's Jacobian exactly."""
    from checks import assert_instance_identity

    g = _Graph(7)
    anchors = 8 * 8
    box = g.op("Conv", ["input", g.weight(64, 3, 3, 3, scale=0.3)], pads=[1, 1, 1, 1])
    bins = g.op("Transpose", [g.op("Reshape", [box, g.const([1, 4, 16, anchors], np.int64)])], perm=[0, 2, 1, 3])
    dfl = g.op("Conv", [g.op("Softmax", [bins], axis=1), g.const(np.arange(16.0).reshape(1, 16, 1, 1))])
    graph = helper.make_graph(g.nodes, "dfl", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info(dfl, TensorProto.FLOAT, None)], g.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(proto, str(tmp_path / "dfl.onnx"))
    model = fd.load_model(str(tmp_path / "dfl.onnx"))
    layer = {lay.name: lay for lay in fd.inspect_model(model).layers}[dfl]
    assert layer.decodable and layer.per_position, layer
    images = _images(3, seed=2)[:, :, :8, :8].copy()
    acts = run_ort(linearized(proto, model.patterns, {}), images, [dfl])[dfl]  # [3, 1, 4, 64]
    for position in [(0, 0), (2, 37)]:
        decoded = fd.decode(model, dfl, dtype="float64", position=position)
        (y, x), (ry, rx) = decoded.origin, decoded.filters.shape[2:]
        got = (decoded.filters[None] * images[:, None, :, y : y + ry, x : x + rx]).sum(axis=(2, 3, 4)) + decoded.bias
        np.testing.assert_allclose(got, acts[:, decoded.neurons, position[0], position[1]], rtol=1e-5,
                                   atol=1e-5 * np.abs(acts).max())
    local = fd.decode(model, dfl, mode="local", images=fd.ArrayImages(images), top=2, per_instance=True,
                      dtype="float64")
    assert_instance_identity(local, run_ort(proto, images, [dfl])[dfl], images, rtol=1e-5)


# ---- fds with attention: held at each neuron's top instances (docs/method.md), properties 5-7 ------------------
def gated_block(seed: int, activation: str = "relu", uniform: bool = True, positive: bool = False,
                off: int | None = None) -> tuple[onnx.ModelProto, dict]:
    """Patch embedding, class token, position embedding, single-head attention and an MLP with ``activation``
    (Relu, or Clip to [0, 6]), without layer norms. ``uniform``: the keys' weights are zero, so the attention
    matrix is uniform on every image (held anywhere, it is the same constant); ``positive``: positive weights and
    biases (with positive images every unit is on); ``off``: that hidden unit of the MLP is off on every image."""
    g = _Graph(seed)

    def weight(*shape, scale=0.4):
        w = g.rng.uniform(0.0, scale, shape) if positive else g.rng.standard_normal(shape) * scale
        return g.const(w)

    patches = g.op("Conv", ["input", weight(C, 3, PATCH, PATCH, scale=0.2), weight(C, scale=0.1)],
                   kernel_shape=[PATCH, PATCH], strides=[PATCH, PATCH])
    tokens = g.op("Transpose", [g.op("Reshape", [patches, g.const([1, C, -1], np.int64)])], perm=[0, 2, 1])
    x = g.op("Add", [g.op("Concat", [weight(1, 1, C), tokens], axis=1), weight(1, TOKENS, C, scale=0.1)])
    q, v = g.op("MatMul", [x, weight(C, C)]), g.op("MatMul", [x, weight(C, C)])
    k = g.op("MatMul", [x, g.const(np.zeros((C, C))) if uniform else weight(C, C)])
    scores = g.op("MatMul", [g.op("Mul", [q, g.const(C**-0.5)]), g.op("Transpose", [k], perm=[0, 2, 1])])
    mixed = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
    x = g.op("Add", [x, g.op("MatMul", [mixed, weight(C, C)])])
    bias = g.rng.uniform(0.0, 0.1, 2 * C) if positive else g.rng.standard_normal(2 * C) * 0.1
    if off is not None:
        bias[off] = -1e4
    hidden = g.op("Add", [g.op("MatMul", [x, weight(C, 2 * C)]), g.const(bias)])
    hidden = g.op("Relu", [hidden]) if activation == "relu" else g.op("Clip", [hidden, g.const(0.0), g.const(6.0)])
    fc2 = g.op("MatMul", [hidden, weight(2 * C, C)])
    out = g.op("Add", [x, fc2])
    graph = helper.make_graph(g.nodes, "gated", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                               [1, 3, SIZE, SIZE])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], g.inits)
    names = {"patches": patches, "mixed": mixed, "fc2": fc2, "fc2_weight": g.nodes[-2].input[1]}
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), names


def _load(proto, tmp_path, name="m.onnx"):
    path = tmp_path / name
    onnx.save(proto, str(path))
    return fd.load_model(str(path))


def _positive_images(count, seed):
    return fd.ArrayImages(np.random.default_rng(seed).uniform(0.0, 1.0, (count, 3, SIZE, SIZE)).astype(np.float32))


def test_fds_decodes_every_token_layer_and_equals_weights_at_the_first(vit):
    """fds runs on every layer of the ViT block (attention, layer norms and GELU held at each neuron's top
    instances); property 5: at the first layer (pixels are not neurons) it is the weights filter."""
    model, _, names = vit
    images = fd.ArrayImages(_images(12, seed=2))
    for layer in fd.inspect_model(model).layers:
        decoded = fd.decode(model, layer.name, mode="fds", images=images, top=4, neurons="0-1")
        assert np.isfinite(decoded.filters).all() and np.abs(decoded.filters).max() > 0, layer.name
    first = fd.decode(model, names["patches"], mode="fds", images=images, top=4, neurons="0-3")
    np.testing.assert_allclose(first.filters, fd.decode(model, names["patches"], neurons="0-3").filters, rtol=1e-6)


def test_fds_equals_weights_where_attention_is_the_same_on_every_image(tmp_path):
    """Properties 5 and 6 with attention present: a uniform attention matrix (held anywhere, the same constant) and
    every ReLU on for every image: fds (--select all) and weights give the same filters at every layer, and local's
    filter of each instance is the weights filter at the instance's token."""
    proto, names = gated_block(0, "relu", uniform=True, positive=True)
    model = _load(proto, tmp_path)
    images = _positive_images(10, seed=1)
    for layer in fd.inspect_model(model).layers:
        weights = fd.decode(model, layer.name, neurons="0-3", dtype="float64")
        fds = fd.decode(model, layer.name, mode="fds", images=images, top=4, neurons="0-3", select="all",
                        dtype="float64")
        scale = np.abs(weights.filters).max()
        np.testing.assert_allclose(fds.filters, weights.filters, atol=1e-6 * scale, err_msg=layer.name)
        np.testing.assert_allclose(fds.bias, weights.bias, rtol=1e-6, atol=1e-6 * scale, err_msg=layer.name)
    local = fd.decode(model, names["fc2"], mode="local", images=images, top=3, neurons="0-1", per_instance=True,
                      dtype="float64")
    for k, neuron in enumerate(local.neurons):
        for n in range(3):
            position = tuple(int(v) for v in local.instances.position[k, n])
            at = fd.decode(model, names["fc2"], neurons=[int(neuron)], position=position, dtype="float64")
            canvas = np.zeros((3, SIZE, SIZE))
            (y, x), (ry, rx) = at.origin, at.filters.shape[2:]
            canvas[:, y : y + ry, x : x + rx] = at.filters[0]
            np.testing.assert_allclose(local.instance_filters[k, n], canvas, atol=1e-9 * np.abs(canvas).max())


def test_fds_switching_a_unit_off_is_removing_it(tmp_path):
    """Property 6, second half, through attention: a hidden unit of the MLP off on every image changes fds exactly
    as removing it (its outgoing weights zeroed) changes weights."""
    proto, names = gated_block(1, "relu", uniform=True, positive=True, off=3)
    model = _load(proto, tmp_path)
    removed = onnx.ModelProto()
    removed.CopyFrom(proto)
    for init in removed.graph.initializer:
        if init.name == names["fc2_weight"]:
            w = numpy_helper.to_array(init).copy()
            w[3] = 0
            init.CopyFrom(numpy_helper.from_array(w, init.name))
        elif numpy_helper.to_array(init).shape == (2 * C,):  # the hidden bias: the removed unit's share of it
            b = numpy_helper.to_array(init).copy()
            b[3] = 0
            init.CopyFrom(numpy_helper.from_array(b, init.name))
    without = _load(removed, tmp_path, "removed.onnx")
    fds = fd.decode(model, names["fc2"], mode="fds", images=_positive_images(10, seed=2), top=4, neurons="0-3",
                    select="all", dtype="float64")
    weights = fd.decode(without, names["fc2"], neurons="0-3", dtype="float64")
    np.testing.assert_allclose(fds.filters, weights.filters, atol=1e-6 * np.abs(weights.filters).max())
    assert not np.allclose(fd.decode(model, names["fc2"], neurons="0-3", dtype="float64").filters, weights.filters)


def test_deconvnet_differs_from_local_through_attention(tmp_path):
    """Property 7 with attention: deconvnet takes local's rules through attention and rectifies its backward signal at
    the MLP's Clip(0, 6), so it differs from local wherever that signal is negative."""
    model = _load(gated_block(2, "clip", uniform=False)[0], tmp_path)
    images = fd.ArrayImages(_images(8, seed=5))
    target = gated_block(2, "clip", uniform=False)[1]["fc2"]
    local = fd.decode(model, target, mode="local", images=images, top=3, neurons="0-3", dtype="float64")
    deconv = fd.decode(model, target, mode="deconvnet", images=images, top=3, neurons="0-3", dtype="float64")
    assert not np.allclose(local.filters, deconv.filters, atol=1e-3 * np.abs(local.filters).max())


def test_fds_holds_attention_at_each_neurons_top_instances(vit):
    """The attention matrix fds holds for a neuron is the activation-weighted mean of its value over the neuron's
    top instances (onnxruntime on the real network), one mean per neuron."""
    from fdsub_onnx.data.topn import instance_weights
    from fdsub_onnx.modes.gates import neuron_means
    from fdsub_onnx.runtime.capture import capture_top

    model, proto, names = vit
    images = _images(10, seed=7)
    target = names["logits"]
    top = capture_top(model, target, fd.ArrayImages(images), top=4, neurons="0-2")
    means = list(neuron_means(model, target, top, fd.ArrayImages(images), batch_size=3))
    held = model.patterns[names["mixed"]].held
    values = run_ort(proto, images, [held])[held].astype(np.float64)
    values = values.reshape(len(images), *model.shapes[held])
    weights = instance_weights(top)
    for k in range(3):
        w = weights[k] / weights[k].sum()
        want = np.tensordot(w, values[top.image_index[k]], axes=(0, 0))
        np.testing.assert_allclose(means[k][names["mixed"]], want, rtol=1e-6, atol=1e-9)
    assert not np.allclose(means[0][names["mixed"]], means[1][names["mixed"]])


def test_fidelity_scores_a_token_layer_at_its_decoded_token(tmp_path):
    """A token layer's filters hold at the token they were decoded at, so fidelity scores them there: on a network
    linear in the image (uniform attention, every ReLU on), the weights filter predicts that token exactly."""
    proto, names = gated_block(0, "relu", uniform=True, positive=True)
    model = _load(proto, tmp_path)
    compared = fd.compare_modes(model, names["fc2"], _positive_images(12, seed=1), _positive_images(16, seed=2),
                                top=4, neurons="0-3")
    scores = compared.scores["decodings"]
    assert min(scores["weights"]["correlation"]) > 1 - 1e-6
    assert scores["weights"]["mean_top_share"] == 1.0


def test_report_shows_token_layers_with_their_patches(vit, tmp_path):
    """The report's default layers include token layers, with their patch grid, the token their filters were
    decoded at and each instance's token by its patch (or as the class token)."""
    model, _, _ = vit
    page = fd.report(model, fd.ArrayImages(_images(10, seed=8)), tmp_path / "report", top=4, neurons="0-1")
    html = page.read_text() if hasattr(page, "read_text") else open(page).read()
    assert "tokens of a 4&times;4 patch grid and 1 before it (a class token)" in html
    assert "the filters and fidelity are at token 11: patch (2, 2)" in html


def test_the_linearized_attention_keeps_the_batch_axis_first_and_multiplies_the_mlp(vit):
    """For a pass of many seeds side by side: the heads' split moves before its transpose (no tensor holds the batch
    elsewhere than first), and the MLP's two matrices (its GELU read as a slope) become their product; the filters
    are those of the graph as exported (the identity tests above check them against onnxruntime)."""
    from fdsub_onnx.compose.linear_model import folded, linear_model
    from fdsub_onnx.graph.model import ancestors
    from fdsub_onnx.modes.backward import batch_moves

    model, _, names = vit
    target = names["logits"]
    assert batch_moves(model, ancestors(model, [target]))  # as exported: [3, 1, heads, T, d]
    linear = folded(linear_model(model, reference_gates(model, [target])), {target}, np.float64)
    assert not batch_moves(linear, ancestors(linear, [target]))
    matmuls = [n for n in ancestors(linear, [target]) if n.op_type == "MatMul" and n.input[1] in linear.constants]
    assert len(matmuls) == 3 and any(n.input[1].endswith("::product") for n in matmuls)  # qkv, proj and fc1 fc2


def test_a_gelu_after_a_bias_is_read_as_the_identity_of_its_whole_input(tmp_path):
    """weights mode reads GELU(x W + b) as x W + b: the bias before the gate is kept (the gate's x is the last tensor
    both of its factors are functions of, not the MatMul's output), so the identity holds against onnxruntime on the
    network with the GELU removed."""
    def mlp(gelu: bool):
        g = _Graph(3)
        patches = g.op("Conv", ["input", g.weight(C, 3, PATCH, PATCH, scale=0.2), g.weight(C, scale=0.1)],
                       kernel_shape=[PATCH, PATCH], strides=[PATCH, PATCH])
        tokens = g.op("Transpose", [g.op("Reshape", [patches, g.const([1, C, -1], np.int64)])], perm=[0, 2, 1])
        hidden = g.op("Add", [g.op("MatMul", [tokens, g.weight(C, 2 * C)]), g.const(np.linspace(-1, 1, 2 * C))])
        out = g.op("MatMul", [g.gelu(hidden) if gelu else hidden, g.weight(2 * C, C)])
        graph = helper.make_graph(g.nodes, "mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                 [1, 3, SIZE, SIZE])],
                                  [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], g.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), out

    (proto, out), (plain, plain_out) = mlp(True), mlp(False)
    model = _load(proto, tmp_path)
    decoded = fd.decode(model, out, neurons="0-3", dtype="float64", position=(0, 5))
    images = _images(3, seed=4)
    want = as_map(model, out, run_ort(plain, images, [plain_out])[plain_out])[:, :4, 0, 5]
    (y, x), (ry, rx) = decoded.origin, decoded.filters.shape[2:]
    got = (decoded.filters[None] * images[:, None, :, y : y + ry, x : x + rx]).sum(axis=(2, 3, 4)) + decoded.bias
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_dynamo_slices_of_the_heads_decode_exactly(tmp_path):
    """torch's dynamo exporter takes q, k and v off axis 0 of ``[3, 1, h, T, d]`` with Slice (the batch moved to axis
    1): the weights identity holds at every token layer against onnxruntime on the linearized network (a Slice's
    backward rule that left axis 0 to the instances mixed q, k and v: 4.25 relative on ViT-S/16's dynamo export)."""
    proto, names = vit_block(slices=True)
    path = tmp_path / "dynamo_vit.onnx"
    onnx.save(proto, str(path))
    model = fd.load_model(str(path))
    from fdsub_onnx.compose.linear_model import linear_model
    from fdsub_onnx.graph.model import ancestors
    from fdsub_onnx.modes.backward import batch_moves

    linear = linear_model(model, reference_gates(model, [names["logits"]]))
    assert not batch_moves(linear, ancestors(linear, [names["logits"]]))  # the slices moved before the transpose
    images = _images(3, seed=5)
    for layer in fd.inspect_model(model).layers:
        rows, columns = grid(model, layer.name)
        position = (rows // 2, columns // 2)
        decoded = fd.decode(model, layer.name, dtype="float64", neurons="0-1", position=position)
        held = reference_gates(model, [layer.name])
        acts = run_ort(linearized(proto, model.patterns, held), images, [layer.name])[layer.name]
        acts = as_map(model, layer.name, acts)[:, decoded.neurons, position[0], position[1]]
        (y, x), (ry, rx) = decoded.origin, decoded.filters.shape[2:]
        if decoded.exact_at == "interior":
            y, x = y + position[0] * decoded.stride[0], x + position[1] * decoded.stride[1]
        padded = np.pad(images.astype(np.float64), ((0, 0), (0, 0), (ry, ry), (rx, rx)))
        patch = padded[:, None, :, y + ry : y + 2 * ry, x + rx : x + 2 * rx]
        got = (decoded.filters[None] * patch).sum(axis=(2, 3, 4)) + decoded.bias
        np.testing.assert_allclose(got, acts, rtol=1e-5, atol=1e-5 * np.abs(acts).max(), err_msg=layer.name)


def norm_block(kind: str, seed: int = 4) -> tuple[onnx.ModelProto, str]:
    """Tokens, then a normalization written out over their last axis (``rms``: ``x * 1/sqrt(mean(x^2) + eps)``;
    ``legacy``: ``(x - mean) / sqrt(var + eps)`` with Pow, as older exporters write LayerNorm), scaled, then a
    MatMul."""
    g = _Graph(seed)
    patches = g.op("Conv", ["input", g.weight(C, 3, PATCH, PATCH, scale=0.2), g.weight(C, scale=0.3)],
                   kernel_shape=[PATCH, PATCH], strides=[PATCH, PATCH])
    x = g.op("Transpose", [g.op("Reshape", [patches, g.const([1, C, -1], np.int64)])], perm=[0, 2, 1])
    if kind == "legacy":
        centred = g.op("Sub", [x, g.op("ReduceMean", [x], axes=[-1], keepdims=1)])
        var = g.op("ReduceMean", [g.op("Pow", [centred, g.const(2.0)])], axes=[-1], keepdims=1)
        x = g.op("Div", [centred, g.op("Sqrt", [g.op("Add", [var, g.const(1e-5)])])])
    else:
        mean_square = g.op("ReduceMean", [g.op("Mul", [x, x])], axes=[-1], keepdims=1)
        x = g.op("Mul", [x, g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [mean_square, g.const(1e-6)])])])])
    x = g.op("Mul", [x, g.const(1 + 0.1 * g.rng.standard_normal(C))])
    out = g.op("MatMul", [x, g.weight(C, C)])
    graph = helper.make_graph(g.nodes, kind, [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                            [1, 3, SIZE, SIZE])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], g.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), out


@pytest.mark.parametrize("kind", ["rms", "legacy"])
def test_normalizations_written_out_are_held_like_layer_norm(kind, tmp_path):
    """RMSNorm and a LayerNorm written with ReduceMean/Sub/Pow/Sqrt/Div over tokens: the layer after them decodes
    per position in weights mode with the scale held at its mean over the positions of the reference (the identity
    against onnxruntime on the linearized network), and local's instance filter is the input gradient (central
    differences through onnxruntime on the real network)."""
    proto, out = norm_block(kind)
    model = _load(proto, tmp_path)
    assert any(h["kind"] == "layer norm" for h in fd.inspect_model(model).held)
    images = _images(3, seed=6)
    decoded = fd.decode(model, out, dtype="float64", neurons="0-1", position=(0, 7))
    held = reference_gates(model, [out])
    acts = as_map(model, out, run_ort(linearized(proto, model.patterns, held), images, [out])[out])[:, :2, 0, 7]
    (y, x), (ry, rx) = decoded.origin, decoded.filters.shape[2:]
    got = (decoded.filters[None] * images[:, None, :, y : y + ry, x : x + rx]).sum(axis=(2, 3, 4)) + decoded.bias
    np.testing.assert_allclose(got, acts, rtol=1e-5, atol=1e-5 * np.abs(acts).max())
    grads, bias = instance_gradients(model, out, images[:2], np.array([1, 0]), np.array([[0, 3], [0, 9]]))
    real = as_map(model, out, run_ort(proto, images[:2], [out])[out]).astype(np.float64)
    want = real[[0, 1], [1, 0], 0, [3, 9]]
    np.testing.assert_allclose((grads * images[:2]).sum(axis=(1, 2, 3)) + bias, want, rtol=1e-4,
                               atol=1e-5 * np.abs(real).max())
    direction, eps = np.random.default_rng(1).standard_normal(images.shape[1:]).astype(np.float32), 1e-2
    plus, minus = (as_map(model, out, run_ort(proto, (images[0] + s * eps * direction)[None], [out])[out])[0, 1, 0, 3]
                   for s in (1, -1))
    assert (plus - minus) / (2 * eps) == pytest.approx(float((grads[0] * direction).sum()), rel=2e-2,
                                                       abs=1e-3 * np.abs(real).max())


def test_the_fds_plan_counts_the_per_neuron_holding(vit):
    """``--plan`` of fds on a token layer names the pass that holds attention and layer norms per neuron; none on a
    layer below every held factor."""
    model, _, names = vit
    stages = fd.estimate_decode(model, names["logits"], "0-1", "fds", 12, top=4).stages
    held = [s for s in stages if "held per neuron" in s.what]
    assert len(held) == 1 and "1 pass(es)" in held[0].what and held[0].peak_bytes > 0
    assert not [s for s in fd.estimate_decode(model, names["patches"], "0-1", "fds", 12, top=4).stages
                if "held per neuron" in s.what]


#: the ways a GroupNorm (and an InstanceNorm) reaches an ONNX file: torch's dynamo exporter (Reshape ->
#: InstanceNormalization -> Reshape, initializers), its legacy exporter (the same with Constant nodes and the shape
#: back read by Shape), the GroupNormalization op (opset 18: scale and bias per group; 21: per channel), and an
#: InstanceNormalization on the map itself
GROUP_NORMS = ("dynamo", "legacy", "op18", "op21", "instance")


def group_norm_block(form: str = "dynamo", seed: int = 5) -> tuple[onnx.ModelProto, str]:
    """A convolution, a GroupNorm (2 groups; ``instance``: an InstanceNorm) written as ``form`` says (``GROUP_NORMS``)
    with a per-channel affine after it, a ReLU and a convolution."""
    g, groups = _Graph(seed), 2
    opset = {"op18": 18, "op21": 21}.get(form, 17)

    def const(value, dtype=np.float32):
        if form != "legacy":
            return g.const(value, dtype)
        return g.op("Constant", [], value=numpy_helper.from_array(np.asarray(value, dtype)))

    x = g.op("Conv", ["input", g.weight(C, 3, 3, 3, scale=0.3), g.weight(C, scale=0.3)], kernel_shape=[3, 3],
             pads=[1, 1, 1, 1])
    if form in ("op18", "op21"):
        n = groups if form == "op18" else C
        x = g.op("GroupNormalization", [x, g.const(1 + 0.2 * g.rng.standard_normal(n)),
                                        g.const(0.1 * g.rng.standard_normal(n))], num_groups=groups, epsilon=1e-5)
    elif form == "instance":
        x = g.op("InstanceNormalization", [x, g.const(1 + 0.2 * g.rng.standard_normal(C)),
                                           g.const(0.1 * g.rng.standard_normal(C))], epsilon=1e-5)
    else:
        grouped = g.op("Reshape", [x, const([0 if form == "legacy" else 1, groups, -1], np.int64)])
        normed = g.op("InstanceNormalization", [grouped, const(np.ones(groups)), const(np.zeros(groups))],
                      epsilon=1e-5)
        x = g.op("Reshape", [normed, g.op("Shape", [x]) if form == "legacy" else const([1, C, SIZE, SIZE], np.int64)])
        x = g.op("Add", [g.op("Mul", [x, g.const(1 + 0.2 * g.rng.standard_normal((C, 1, 1)))]),
                         g.const(0.1 * g.rng.standard_normal((C, 1, 1)))])
    out = g.op("Conv", [g.op("Relu", [x]), g.weight(4, C, 3, 3, scale=0.3)], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    graph = helper.make_graph(g.nodes, "group_norm", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                    [1, 3, SIZE, SIZE])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], g.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), out


@pytest.mark.parametrize("form", GROUP_NORMS)
def test_a_group_norm_is_held_per_group(form, tmp_path):
    """A GroupNorm in each form an export writes it (``GROUP_NORMS``): its 1/std held per group in weights mode (the
    layer after it decodes per position: the identity against onnxruntime on the linearized network), local's
    instance filter the input gradient (central differences through onnxruntime on the real network), and ``check``
    passes. With the norm's constants in Constant nodes (torch's legacy export), ``check``'s linearized network
    left it unheld (identity 8.05 relative); the GroupNormalization op and an InstanceNormalization on a map were
    refused."""
    proto, out = group_norm_block(form)
    model = _load(proto, tmp_path)
    layers = fd.inspect_model(model).layers
    assert all(lay.decodable for lay in layers) and layers[-1].per_position, [(lay.name, lay.reason) for lay in layers]
    images = _images(3, seed=7)
    held = reference_gates(model, [out])
    assert any(np.size(v) == (C if form == "instance" else 2) for v in held.values())  # one 1/std per group
    for position in ((8, 8), (0, 3)):
        decoded = fd.decode(model, out, dtype="float64", neurons="0-1", position=position)
        acts = run_ort(linearized(proto, model.patterns, held), images, [out])[out][:, :2, position[0], position[1]]
        (y, x), (ry, rx) = decoded.origin, decoded.filters.shape[2:]
        got = (decoded.filters[None] * images[:, None, :, y : y + ry, x : x + rx]).sum(axis=(2, 3, 4)) + decoded.bias
        np.testing.assert_allclose(got, acts, rtol=1e-5, atol=1e-5 * np.abs(acts).max())
    grads, bias = instance_gradients(model, out, images[:2], np.array([1, 0]), np.array([[5, 6], [9, 2]]))
    real = run_ort(proto, images[:2], [out])[out].astype(np.float64)
    want = real[[0, 1], [1, 0], [5, 9], [6, 2]]
    np.testing.assert_allclose((grads * images[:2]).sum(axis=(1, 2, 3)) + bias, want, rtol=1e-4,
                               atol=1e-5 * np.abs(real).max())
    direction, eps = np.random.default_rng(2).standard_normal(images.shape[1:]).astype(np.float32), 1e-2
    plus, minus = (run_ort(proto, (images[0] + s * eps * direction)[None], [out])[out][0, 1, 5, 6] for s in (1, -1))
    assert (plus - minus) / (2 * eps) == pytest.approx(float((grads[0] * direction).sum()), rel=2e-2,
                                                       abs=1e-3 * np.abs(real).max())
    report = fd.check_model(model)
    assert report.status == "pass", [(c.name, c.summary) for c in report.checks]


def test_held_attention_is_saved_as_arrays_not_json(vit, tmp_path):
    """decoded.npz keeps each held vector (a channel gate, a layer norm's 1/std) in its ``gates`` JSON and each
    held matrix (an attention matrix) as a float32 array in its own shape (``held_names``, ``held_0``...): in
    the JSON, ViT-S/16's held attention made a 412 MB decoded.npz of a 9.6 MB decoding (a NumPy str array stores
    4 bytes a character) and its writing peaked 660 MB above the decoding."""
    model, _, names = vit
    decoded = fd.decode(model, names["logits"], neurons="0-1")
    big = {name: np.asarray(v) for name, v in decoded.gates.items() if sum(d > 1 for d in np.shape(v)) > 1}
    assert big, "the block holds an attention matrix"
    fd.save_decoded(decoded, tmp_path / "out")
    with np.load(tmp_path / "out" / "decoded.npz", allow_pickle=False) as saved:
        small = json.loads(str(saved["gates"]))
        assert set(small) == {n for n in decoded.gates if n not in big} and small
        held = json.loads(str(saved["held_names"]))
        assert set(held) == set(big)
        for i, name in enumerate(held):
            assert saved[f"held_{i}"].dtype == np.float32
            np.testing.assert_allclose(saved[f"held_{i}"], big[name], rtol=1e-6)
        assert saved["gates"].nbytes < 4 * 64 * len(small)
