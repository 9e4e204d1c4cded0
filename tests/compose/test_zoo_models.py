"""Real topologies: the onnx package's "light" zoo (AlexNet ... DenseNet121), weights re-randomized.

Each model is inspected and its deepest decodable Conv whose receptive field fits in
the image (R <= FDSUB_ZOO_MAX_RF, default 224) is decoded for neurons 0-3. The true deepest
Convs of ResNet50, Inception and ShuffleNet read 427-651 pixels and take 40-120 s and up to
12 GB each on 2 cores: FDSUB_ZOO_MAX_RF=700 decodes them. DenseNet121's last block reads
up to 2071 px and its classifier (after the global pool) 2263 px: banks of 60+ GiB, which
the memory check must refuse up front.
On linearized copies of AlexNet, ZFNet and VGG19, the weights identity is checked.
"""

from __future__ import annotations

import os
import time

import numpy as np
import onnx
import pytest
from checks import assert_identity, random_images
from netgen import run_ort
from zoo import linearized, randomized, truncated, zoo_name, zoo_paths

import fdsub_onnx as fd
from fdsub_onnx.graph.model import LAYER_OPS

MAX_RF = int(os.environ.get("FDSUB_ZOO_MAX_RF", "224"))
PATHS = {zoo_name(p): p for p in zoo_paths()}

# (stride, receptive field, origin) of a layer, worked by hand from the ONNX attributes
KNOWN = {
    # conv1 11/4, pool 3/2, conv2 5 p2, pool 3/2, conv3-5 3 p1: R = 11+8+32+16+3*32 = 163
    ("bvlc_alexnet", "r12"): (16, 163, -64),
    # 16 3x3 convs p1 and four 2x2/2 pools before conv5_4: R = 5+1+8+2+32+4+64+8+128 = 252
    ("vgg19", "r34"): (16, 252, -118),
    # stem 7/2 p3 + pool 3/2 p1 (R 11, S 4); 3x3 convs (stride on the 3x3, "v1.5"): 3 at S4, 1 at S4 + 3 at S8,
    # 1 at S8 + 5 at S16, 1 at S16 + 2 at S32: R = 11 + 24 + 8+48 + 16+160 + 32+128 = 427
    ("resnet50", "r168"): (32, 427, -213),
    ("resnet50", "r3"): (4, 11, -5),
}


@pytest.fixture(scope="module")
def zoo_file(tmp_path_factory):
    """``zoo_file(name)``: path of the randomized copy of zoo model ``name`` (made once)."""
    folder = tmp_path_factory.mktemp("zoo")
    made: dict[str, str] = {}

    def make(name: str) -> str:
        if name not in made:
            path = str(folder / f"{name}.onnx")
            onnx.save(randomized(PATHS[name], seed=0), path)
            made[name] = path
        return made[name]

    return make


def test_zoo_is_present():
    assert len(PATHS) >= 9, f"expected the 9 light zoo models, found {sorted(PATHS)}"
    assert {"bvlc_alexnet", "vgg19", "resnet50", "densenet121"} <= set(PATHS)


def test_randomized_is_deterministic_and_replaces_constant_of_shape():
    path = PATHS["squeezenet"]
    a, b, other = (randomized(path, seed=s) for s in (0, 0, 1))
    assert not any(n.op_type == "ConstantOfShape" for n in a.graph.node)
    arrays = [{t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer} for m in (a, b, other)]
    weight = arrays[0]["conv1_w_0"]
    assert weight.shape == (64, 3, 3, 3) and weight.dtype == np.float32
    assert 0.1 < weight.std() * np.sqrt(27) < 10, weight.std()
    assert set(arrays[0]) == set(arrays[1]) and all(np.array_equal(arrays[0][k], arrays[1][k]) for k in arrays[0])
    assert not np.array_equal(weight, arrays[2]["conv1_w_0"])
    onnx.checker.check_model(a)


def _chosen(convs):
    fitting = [layer for layer in convs if max(layer.receptive_field) <= MAX_RF]
    assert fitting, f"no decodable Conv with receptive field <= {MAX_RF}"
    return fitting[-1]


@pytest.mark.parametrize("name", sorted(PATHS))
def test_zoo_deepest_conv(name, zoo_file):
    path = zoo_file(name)
    start = time.perf_counter()
    model = fd.load_model(path)
    loaded = time.perf_counter()
    summary = fd.inspect_model(model)
    proto_layers = [n for n in model.nodes if n.op_type in LAYER_OPS]
    assert len(summary.layers) == len(proto_layers) > 0, (len(summary.layers), len(proto_layers))
    assert summary.input_shape == [1, 3, 224, 224]
    convs = [layer for layer in summary.layers if layer.op == "Conv" and layer.decodable]
    assert convs, f"{name}: no decodable Conv; reasons: {[layer.reason for layer in summary.layers][:3]}"
    blocked = [(layer.name, layer.reason) for layer in summary.layers if not layer.decodable]
    assert not blocked, f"{name}: layers not decodable: {blocked[:3]}"
    for layer in summary.layers:
        key = (name, layer.name)
        if key in KNOWN:
            s, r, o = KNOWN[key]
            assert (layer.stride, layer.receptive_field, layer.origin) == ([s, s], [r, r], [o, o]), (key, layer)

    layer = _chosen(convs)
    decoded = fd.decode(model, layer.name, neurons="0-3")
    done = time.perf_counter()
    print(f"\n{name}: load {loaded - start:.1f}s, decode {layer.name} (R={layer.receptive_field}, "
          f"conv {convs.index(layer) + 1} of {len(convs)}) {done - loaded:.1f}s")
    assert decoded.filters.shape == (4, 3, *layer.receptive_field), decoded.filters.shape
    assert decoded.bias.shape == (4,) and list(decoded.neurons) == [0, 1, 2, 3]
    assert (list(decoded.stride), list(decoded.origin)) == (layer.stride, layer.origin)
    assert np.isfinite(decoded.filters).all() and np.isfinite(decoded.bias).all()
    peaks = np.abs(decoded.filters).reshape(4, -1).max(axis=1)
    assert (peaks > 0).all(), f"{name}/{layer.name}: all-zero decoded filters {peaks}"


# linearized zoo models: (layers checked with the weights identity, in graph order)
LINEAR_CHECKS = {
    "bvlc_alexnet": ["r0", "r4", "r8"],  # conv1 (11/4), conv2 (grouped, after LRN and pool), conv3
    "zfnet512": ["r0", "r4"],
    "vgg19": ["r0", "r2", "r5", "r7"],  # conv1_1 .. conv2_2 (through a 2x2 pool)
}


@pytest.mark.parametrize("name", sorted(LINEAR_CHECKS))
def test_zoo_linearized_identity(name, zoo_file, load):
    layers = LINEAR_CHECKS[name]
    proto = truncated(linearized(onnx.load(zoo_file(name))), layers)
    assert not {n.op_type for n in proto.graph.node} & {"Relu", "MaxPool", "LRN", "Dropout", "Softmax"}
    model = load(proto)
    ops = {layer.name: layer.op for layer in fd.inspect_model(model).layers}
    assert all(ops.get(layer) == "Conv" for layer in layers), ops
    images = random_images(model, 1, seed=8)
    acts = run_ort(proto, images, layers)
    decoded = list(fd.iter_decode(model, layers, dtype="float64"))
    assert [d.layer for d in decoded] == layers
    for d in decoded:
        assert_identity(d, acts[d.layer], images, rtol=1e-4, atol=1e-6)


def test_zoo_densenet_classifier_decodes_by_the_adjoint(zoo_file, monkeypatch):
    """fc6_1 follows the global pool: R = 2263 px, bottom-up banks of ~170 GiB. No position is interior, so the
    planner takes the adjoint (a few hundred MB here), and the filters are cut to the 224 px image."""
    from fdsub_onnx.compose import backend as _backend

    model = fd.load_model(zoo_file("densenet121"))
    layer = next(layer for layer in fd.inspect_model(model).layers if layer.name == "fc6_1")
    assert layer.decodable and layer.receptive_field == [2263, 2263], layer
    monkeypatch.setattr(_backend.NumpyBackend, "free_bytes", lambda self: 16 << 30)
    decoded = fd.decode(model, "fc6_1", neurons="0-1")
    assert decoded.plan.route == "adjoint" and decoded.plan.peak_bytes < 1 << 30, decoded.plan.describe()
    assert decoded.filters.shape == (2, 3, 224, 224) and tuple(decoded.field) == (2263, 2263)
    assert tuple(decoded.origin) == (0, 0) and decoded.exact_at == "position"
    assert np.isfinite(decoded.filters).all() and (np.abs(decoded.filters).reshape(2, -1).max(axis=1) > 0).all()


def _mid_layer(model, limit: int = 100):
    """The deepest Conv whose receptive field is at most ``limit`` px and whose centre position is interior."""
    from fdsub_onnx.modes.decode import centre

    chosen = None
    for layer in fd.inspect_model(model).layers:
        if layer.op != "Conv" or not layer.decodable or max(layer.receptive_field) > limit:
            continue
        shape = model.shapes[layer.name]
        if fd.layer_geometry(model, layer.name).interior((224, 224), shape[2:])[centre(model, layer.name)]:
            chosen = layer.name
    assert chosen is not None
    return chosen


@pytest.mark.parametrize("name", sorted(PATHS))
def test_zoo_adjoint_equals_bottom_up_and_holds_at_the_border(name, zoo_file):
    """On every zoo topology (linearized by weights mode itself): at an interior position the adjoint gives the
    bottom-up filters (float64, 1e-5); at the corner of the deepest Conv, whose field reads padding, it
    satisfies the identity against onnxruntime on the linearized model."""
    model = fd.load_model(zoo_file(name))
    mid = _mid_layer(model)
    up = fd.decode(model, mid, neurons="0-1", dtype="float64", route="bottom-up")
    down = fd.decode(model, mid, neurons="0-1", dtype="float64", route="adjoint")
    assert up.filters.shape == down.filters.shape and tuple(up.origin) == tuple(down.origin)
    scale = np.abs(up.filters).max()
    assert scale > 0
    assert np.abs(up.filters - down.filters).max() <= 1e-5 * scale, name
    assert np.abs(up.bias - down.bias).max() <= 1e-5 * max(scale, np.abs(up.bias).max()), name
    deepest = [layer.name for layer in fd.inspect_model(model).layers if layer.op == "Conv" and layer.decodable][-1]
    corner = fd.decode(model, deepest, neurons=0, dtype="float64", position=(0, 0))
    assert corner.exact_at == "position" and corner.plan.route in ("adjoint", "meet"), corner.plan.describe()
    proto = truncated(linearized(model.proto, model.patterns, {}), [deepest])
    images = random_images(model, 2, seed=9)
    assert_identity(corner, run_ort(proto, images, [deepest])[deepest], images, rtol=1e-5, atol=1e-9)
