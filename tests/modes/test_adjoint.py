"""The adjoint route of `weights` mode (docs/method.md, "Routes"): at interior positions it gives the bottom-up
filters; at every position, border included, it satisfies the identity against onnxruntime on the linearized
network; meeting bottom-up banks at a split tensor gives the same filters."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
from checks import assert_identity, random_images
from hypothesis import assume, given
from netgen import linear_zoo, random_linear_dag, relu_zoo, run_ort
from zoo import linearized

import fdsub_onnx as fd
from fdsub_onnx.modes.plan import _cuts


@functools.cache
def cases() -> dict:
    return dict(linear_zoo() + relu_zoo())


CASES = list(cases())


def linear_copy(proto):
    """The linearized network for onnxruntime; a dilated MaxPool needs AveragePool's dilations (opset 19)."""
    try:
        return linearized(proto, {}, {})
    except fd.FdsubError:
        newer = onnx.ModelProto()
        newer.CopyFrom(proto)
        newer.opset_import[0].version = 19
        return linearized(newer, {}, {})


def layers_of(model):
    return [layer.name for layer in fd.inspect_model(model).layers if layer.decodable]


def out_size(model, name):
    shape = model.shapes[name]
    return tuple(shape[2:]) if len(shape) == 4 else (1, 1)


def interior_positions(model, name):
    geom = fd.layer_geometry(model, name)
    return [tuple(int(v) for v in q) for q in np.argwhere(geom.interior(model.input_shape[2:], out_size(model, name)))]


def border_positions(model, name):
    geom = fd.layer_geometry(model, name)
    inside = geom.interior(model.input_shape[2:], out_size(model, name))
    qy, qx = inside.shape
    corners = {(0, 0), (0, qx - 1), (qy - 1, 0), (qy - 1, qx - 1), (0, qx // 2), (qy // 2, 0)}
    return sorted(q for q in corners if not inside[q])


def assert_same(a: fd.Decoded, b: fd.Decoded, rtol: float, what: str) -> float:
    assert a.filters.shape == b.filters.shape, (what, a.filters.shape, b.filters.shape)
    assert (tuple(a.origin), tuple(a.stride), tuple(a.crop)) == (tuple(b.origin), tuple(b.stride), tuple(b.crop)), what
    scale = max(np.abs(a.filters).max(), np.abs(a.bias).max(), 1e-300)
    err = max(np.abs(a.filters - b.filters).max(), np.abs(a.bias - b.bias).max()) / scale
    assert np.abs(a.filters).max() > 0, f"{what}: all-zero filters compare equal to anything"
    assert err <= rtol, f"{what}: adjoint and bottom-up differ by {err:.3e} (relative)"
    return err


@pytest.mark.parametrize("case", CASES)
def test_adjoint_equals_bottom_up_at_interior_positions(case, load):
    model = load(cases()[case])
    checked = 0
    for name in layers_of(model):
        inside = interior_positions(model, name)
        if not inside:
            continue
        q = inside[len(inside) // 2]
        up = fd.decode(model, name, dtype="float64", route="bottom-up", position=q)
        down = fd.decode(model, name, dtype="float64", route="adjoint", position=q)
        assert (up.plan.route, down.plan.route, down.exact_at) == ("bottom-up", "adjoint", "interior")
        assert_same(up, down, 1e-5, f"{case}/{name} at {q}")
        checked += 1
    assert checked, f"{case}: no layer has an interior position"


@given(random_linear_dag())
def test_adjoint_equals_bottom_up_on_random_dags(load, proto):
    model = load(proto)
    pairs = []
    for name in [o.name for o in proto.graph.output]:
        try:
            inside = interior_positions(model, name)
        except fd.FdsubError:
            continue
        if inside:
            pairs.append((name, inside[0]))
    assume(pairs)
    for name, q in pairs:
        up = fd.decode(model, name, dtype="float64", route="bottom-up", position=q)
        down = fd.decode(model, name, dtype="float64", route="adjoint", position=q)
        assert_same(up, down, 1e-5, f"{name} at {q}")


@pytest.mark.parametrize("case", CASES)
def test_adjoint_identity_at_border_positions(case, load):
    """Padding inside the network: only the adjoint holds there; checked against the linearized model."""
    proto = cases()[case]
    model = load(proto)
    linear = linear_copy(proto)
    images = random_images(model, 3, seed=5)
    layers = layers_of(model)
    acts = run_ort(linear, images, layers)
    checked = 0
    for name in layers:
        for q in border_positions(model, name)[:3]:
            decoded = fd.decode(model, name, dtype="float64", route="adjoint", position=q)
            assert decoded.exact_at == "position" and decoded.position == q
            assert_identity(decoded, acts[name], images, rtol=1e-5)
            checked += 1
    if not checked:  # nets without padding
        pytest.skip(f"{case}: every position is interior")


def test_border_filter_differs_from_the_interior_one(load):
    """A padded chain: at its corner the true filter reads zeros where bottom-up assumes data, so the two
    differ there, and only the adjoint's satisfies the identity (a check that could not fail would pass both)."""
    proto = cases()["pad_then_conv"] if "pad_then_conv" in cases() else cases()["chain3"]
    model = load(proto)
    name = layers_of(model)[-1]
    q = border_positions(model, name)[0]
    images = random_images(model, 3, seed=6)
    act = run_ort(linear_copy(proto), images, [name])[name]
    down = fd.decode(model, name, dtype="float64", route="adjoint", position=q)
    assert_identity(down, act, images, rtol=1e-5)
    up = fd.decode(model, name, dtype="float64", route="bottom-up")
    forced = fd.Decoded(up.filters, up.bias, up.neurons, up.stride, up.origin, up.layer, up.mode, up.bounds,
                        position=q, exact_at="position", crop=up.crop, field=up.field)
    with pytest.raises(AssertionError, match="weights identity broken"):
        assert_identity(forced, act, images, rtol=1e-5)


@pytest.mark.parametrize("case", ["residual_projection", "concat_receptive_fields", "chain3", "relu_residual"])
def test_meet_in_the_middle_equals_bottom_up(case, load, monkeypatch):
    """Every cut tensor with the position's reads in its interior: bottom-up banks there, the adjoint above."""
    from fdsub_onnx.modes import plan as _plan

    model = load(cases()[case])
    name = layers_of(model)[-1]
    inside = interior_positions(model, name)
    assert inside, f"{case}: {name} has no interior position"
    q = inside[len(inside) // 2]
    up = fd.decode(model, name, dtype="float64", route="bottom-up", position=q)
    cuts = [c for c in _cuts(model, fd.graph.model.ancestors(model, [name])) if c != name]
    assert cuts, f"{case}: no cut tensor below {name}"
    met = 0
    for cut in cuts:
        monkeypatch.setattr(_plan, "_cuts", lambda model, nodes, cut=cut: [cut])
        try:
            mid = fd.decode(model, name, dtype="float64", route="meet", position=q)
        except fd.FdsubError as exc:
            assert "interior" in str(exc) or "bank" in str(exc), exc
            continue
        assert mid.plan.split == cut
        assert_same(up, mid, 1e-5, f"{case}/{name} meeting at {cut}")
        met += 1
    assert met, f"{case}: no split was exact at {q}"


def test_default_position_is_the_centre_and_recorded(load, tmp_path):
    model = load(cases()["chain3"])
    name = layers_of(model)[-1]
    qy, qx = out_size(model, name)
    decoded = fd.decode(model, name)
    assert decoded.position == ((qy - 1) // 2, (qx - 1) // 2)
    fd.save_decoded(decoded, tmp_path / "out")
    saved = np.load(tmp_path / "out" / "decoded.npz")
    assert tuple(saved["position"]) == decoded.position and str(saved["exact_at"]) == decoded.exact_at
    with pytest.raises(fd.FdsubError, match="outside the"):
        fd.decode(model, name, position=(qy, 0))


def test_planner_picks_the_cheaper_route_and_says_why(load):
    model = load(cases()["chain3"])
    first, last = layers_of(model)[0], layers_of(model)[-1]
    plan = fd.decode(model, first).plan
    assert plan.route == "bottom-up" and plan.flops <= plan.estimates["adjoint"][0]
    one = fd.decode(model, last, neurons=0, position=border_positions(model, last)[0]).plan
    assert one.route == "adjoint" and isinstance(one.estimates["bottom-up"], str)
    assert "adjoint" in one.describe() and "bottom-up: not exact" in one.describe()


@pytest.mark.parametrize("case", ["relu_chain", "relu_residual", "maxpool_variants", "mixed_nonlinear"])
@pytest.mark.parametrize("select", ["all", "positive", "max"])
def test_fds_by_the_adjoint_equals_bottom_up(case, select, load):
    """fds composes a linear network with substituted weights: the adjoint over that network (MaxPool as its mean
    switch) gives the bottom-up fds filters at interior positions."""
    model = load(cases()[case])
    images = fd.ArrayImages(np.random.default_rng(3).standard_normal((12, *model.input_shape[1:])).astype("float32"))
    names = layers_of(model)
    sub = fd.gather_statistics(model, names, images, top=4, select=select)
    checked = 0
    for name in names:
        inside = interior_positions(model, name)
        if not inside:
            continue
        q = inside[len(inside) // 2]
        up = fd.decode(model, name, mode="fds", dtype="float64", substitution=sub)
        down = fd.decode(model, name, mode="fds", dtype="float64", substitution=sub, route="adjoint", position=q)
        assert up.plan is None and down.plan.route == "adjoint" and down.mode == "fds"
        assert_same(up, down, 1e-5, f"{case}/{name} fds {select} at {q}")
        checked += 1
    assert checked


def test_interior_position_asks_for_the_translation_invariant_filter(load):
    """``position="interior"``: where no position is interior (a field larger than the image) only bottom-up gives
    that filter; where one is, any route at the interior position nearest the centre."""
    from netgen import NetBuilder

    b = NetBuilder(height=9, width=9)
    x = b.conv(b.conv("input", 4, 3, 1, (1, 1, 1, 1)), 4, 5, 1, (2, 2, 2, 2))
    last = b.conv(x, 3, 5, 1, (2, 2, 2, 2))  # R = 11 > 9: no interior position
    model = load(b.build([b.last, x]))
    nowhere = fd.decode(model, last, position="interior", dtype="float64")
    assert nowhere.plan.route == "bottom-up" and nowhere.exact_at == "interior"
    assert "only bottom-up" in nowhere.plan.estimates["adjoint"]
    assert not nowhere.interior(model.input_shape[2:], out_size(model, last)).any()
    with pytest.raises(fd.FdsubError, match="only bottom-up"):
        fd.decode(model, last, position="interior", route="adjoint")
    somewhere = fd.decode(model, x, position="interior", dtype="float64", route="adjoint")
    assert somewhere.exact_at == "interior" and somewhere.position in interior_positions(model, x)
    assert_same(fd.decode(model, x, position="interior", dtype="float64", route="bottom-up"), somewhere, 1e-5, x)


def test_affine_chains_merge_into_their_batchnorm_exactly(load):
    """Caffe's Scale after BatchNormalization (DenseNet: BN -> Mul -> Add) is one affine node in the network the
    adjoint differentiates, with the same filters as bottom-up; a BN whose output is read twice is left alone."""
    from netgen import NetBuilder

    from fdsub_onnx.compose.linear_model import linear_model

    b = NetBuilder(height=12, width=12, seed=5)
    x = b.conv("input", 6, 3, pads=(1, 1, 1, 1))
    scaled = b.affine_const(b.affine_const(b.affine_const(b.affine_const(b.batchnorm(x), "Mul"), "Add"), "Sub"),
                            "Div")
    shared = b.batchnorm(b.conv(b.relu(scaled), 5, 3, pads=(1, 1, 1, 1)))
    last = b.conv(b.add(b.affine_const(shared, "Mul"), shared), 4, 3)
    model = load(b.build([last]))
    ops = [n.op_type for n in linear_model(model).nodes]
    assert ops.count("BatchNormalization") == 2 and ops.count("Div") == 0 and ops.count("Sub") == 0, ops
    assert ops.count("Mul") == 1, "the Mul after the BN read twice is not merged"
    interior = interior_positions(model, last)[0]
    assert_same(fd.decode(model, last, dtype="float64", route="adjoint", position=interior),
                fd.decode(model, last, dtype="float64", route="bottom-up", position=interior), 1e-12, "interior")
    images = random_images(model, 3, seed=1)
    acts = run_ort(linear_copy(b.build([last])), images, [last])[last]
    for q in border_positions(model, last)[:3]:
        assert_identity(fd.decode(model, last, dtype="float64", route="adjoint", position=q), acts, images, rtol=1e-5)


def test_a_constant_broadcast_over_the_width_is_not_merged_into_the_batchnorm(load):
    """A [C]-shaped constant on a [N, C, H, W] map broadcasts over W, not over the channels (here W == C): no
    per-channel scale, so the linearized network keeps it as its own node (decode refuses the layers above it)."""
    from netgen import NetBuilder

    from fdsub_onnx.compose.linear_model import linear_model

    b = NetBuilder(height=10, width=8, seed=6)
    x = b.batchnorm(b.conv("input", 8, 3, pads=(1, 1, 1, 1)))
    c, h, w = b.shapes[x]
    assert w == c
    weighted = b._node("Mul", [x, b._const("over_width", np.linspace(0.5, 2.0, w).astype(np.float32))], (c, h, w))
    model = load(b.build([b.conv(weighted, 4, 3)]))
    assert [n.op_type for n in linear_model(model).nodes] == ["Conv", "BatchNormalization", "Mul", "Conv"]


def test_batchnorms_fold_into_the_convolutions_beside_them_exactly(load):
    """For the backward pass a BatchNormalization is folded into its Conv (Conv -> BN: the Conv's filters and bias
    scaled; BN -> ReLU -> 1x1 Conv: the Conv's input channels scaled, the shift a bias): the same filters and
    biases as bottom-up, which folds nothing; a BN before a padded 3x3 Conv, one read twice and the seeded layer's
    stay."""
    from netgen import NetBuilder

    from fdsub_onnx.compose.linear_model import folded, linear_model

    b = NetBuilder(height=12, width=12, seed=7)
    first = b.conv("input", 6, 3, pads=(1, 1, 1, 1))  # -> BN: folded into it
    both = b.conv(b.relu(b.batchnorm(first)), 5, 1)
    cat = b.concat([first, both])  # read twice: by the next concat and by a BN that a 1x1 Conv reads
    pointwise = b.conv(b.relu(b.batchnorm(cat)), 4, 1)  # input-side fold
    before_padded = b.conv(b.relu(b.batchnorm(b.concat([pointwise, first]))), 4, 3, pads=(1, 1, 1, 1))  # stays
    twice = b.batchnorm(b.concat([cat, before_padded]))
    last = b.batchnorm(b.conv(b.add(b.affine_const(twice, "Mul"), twice), 3, 1))
    model = load(b.build([last]))
    linear = linear_model(model)
    conv_out = linear.producer[last].input[0]
    kept = folded(linear, {conv_out}, np.float64)
    ops = [n.op_type for n in kept.nodes]
    assert ops.count("BatchNormalization") == 2, ops  # before the padded Conv, read twice (none runs after)
    assert kept.producer[conv_out].op_type == "Conv" and last not in kept.producer  # the kept layer is not folded
    assert [n.op_type for n in folded(linear, {last}, np.float64).nodes].count("BatchNormalization") == 2
    for name in (conv_out, both, pointwise, before_padded):
        interior = interior_positions(model, name)[0]
        assert_same(fd.decode(model, name, dtype="float64", route="adjoint", position=interior),
                    fd.decode(model, name, dtype="float64", route="bottom-up", position=interior), 1e-12, name)
    images = random_images(model, 3, seed=2)
    acts = run_ort(linear_copy(b.build([conv_out])), images, [conv_out])[conv_out]
    for q in border_positions(model, conv_out)[:3]:
        assert_identity(fd.decode(model, conv_out, dtype="float64", route="adjoint", position=q), acts, images,
                        rtol=1e-5)


def test_a_float32_pass_stays_float32(load):
    """Every rule keeps the pass's dtype: the division of a global pool by its size (a NumPy integer) once turned
    the rest of a float32 pass into float64, at twice the time."""
    from netgen import NetBuilder

    from fdsub_onnx.compose.backend import get_backend
    from fdsub_onnx.compose.linear_model import linear_model
    from fdsub_onnx.modes.adjoint import gradients

    b = NetBuilder(height=12, width=12, seed=8)
    x = b.batchnorm(b.conv("input", 6, 3, pads=(1, 1, 1, 1)))
    x = b.concat([b.avgpool(x, (2, 2), (2, 2)), b.maxpool(x, (3, 3), (2, 2), pads=(1, 1, 0, 0))])
    last = b.conv(b.global_avgpool(b.conv(x, 5, 3, pads=(1, 1, 1, 1))), 4, 1)
    model = load(b.build([last]))
    for dtype in (np.float32, np.float64):
        (_, grad, bias), = gradients(linear_model(model), last, [0, 3], (0, 0), get_backend("numpy"), dtype)
        assert (grad.dtype, bias.dtype) == (dtype, dtype)


def test_gradients_add_in_place_only_where_nothing_else_sees_the_memory():
    """A backward pass sums into a gradient in place only when no other gradient shares its memory: one a rule
    handed to two inputs (Add), or a view beside another view of the same buffer (Concat's split), stays as it
    was; an exclusive one is summed into without a new array."""
    from fdsub_onnx.modes.backward import _accumulate

    shared = np.ones((2, 3))
    grads = {"a": shared, "b": shared}
    _accumulate(grads, "a", np.ones((2, 3)))
    assert (shared == 1).all() and (grads["a"] == 2).all() and grads["b"] is shared
    buffer = np.ones((4, 3))
    left, right = buffer[:2], buffer[2:]
    grads = {"left": left}
    _accumulate(grads, "left", np.ones((2, 3)))
    assert (right == 1).all() and (buffer == 1).all() and (grads["left"] == 2).all()
    del left, grads
    own = {"x": np.ones((2, 3))}
    first = id(own["x"])
    _accumulate(own, "x", np.ones((2, 3)))
    assert id(own["x"]) == first and (own["x"] == 2).all()
