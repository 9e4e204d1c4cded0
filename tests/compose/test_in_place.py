"""Banks written in place (``Engine.overwritable``): only those that nothing else holds, never a target's."""

import numpy as np
from checks import load_proto
from netgen import NetBuilder

import fdsub_onnx as fd
from fdsub_onnx.compose.backend import get_backend
from fdsub_onnx.compose.engine import Bank, Engine, memory_of
from fdsub_onnx.graph.geometry import Geometry

RNG = np.random.default_rng(0)


def _bank(channels=3, size=5):
    return Bank(RNG.standard_normal((channels, 3, size, size)), RNG.standard_normal(channels))


def test_affine_scales_an_overwritable_bank_in_place_and_copies_any_other():
    engine = Engine(get_backend("numpy"), "float64")
    bank, scale = _bank(), np.array([1.0, 2.0, -3.0])
    before = bank.filters.copy()
    copied = engine.affine(bank, scale, 0.5)
    assert not np.shares_memory(copied.filters, bank.filters)
    np.testing.assert_array_equal(bank.filters, before)
    engine.overwritable = frozenset({memory_of(bank.filters)})
    scaled = engine.affine(bank, scale, 0.5)
    assert np.shares_memory(scaled.filters, bank.filters)
    np.testing.assert_array_equal(scaled.filters, copied.filters)
    np.testing.assert_allclose(scaled.bias, copied.bias)


def test_sum_adds_into_an_overwritable_bank_that_covers_the_window_and_leaves_the_others():
    engine = Engine(get_backend("numpy"), "float64")
    small, large = _bank(size=3), _bank(size=5)
    geoms = [Geometry(rf=(3, 3), origin=(1, 1)), Geometry(rf=(5, 5), origin=(0, 0))]
    want = large.filters.copy()
    want[:, :, 1:4, 1:4] += small.filters
    kept = small.filters.copy()
    engine.overwritable = frozenset({memory_of(small.filters), memory_of(large.filters)})
    total = engine.sum([small, large], geoms, geoms[1])
    assert np.shares_memory(total.filters, large.filters)  # the one whose window is the sum's
    np.testing.assert_allclose(total.filters, want)
    np.testing.assert_array_equal(small.filters, kept)
    engine.overwritable = frozenset()
    again = engine.sum([small, _bank(size=5)], geoms, geoms[1])
    assert not np.shares_memory(again.filters, large.filters)


def _net(tmp_path):
    """A target aliased by a Relu and then batch-normed, a map read twice, a sum of a target and a wider
    branch, a scale after the sum, a map whose alias is batch-normed while the map is read later: every case of
    who may be overwritten."""
    b = NetBuilder(3, 12, 12, seed=3)
    a = b.conv("input", 4, (3, 3), pads=(1, 1, 1, 1))
    normed = b.batchnorm(b.relu(a))
    one = b.conv(normed, 4, (1, 1))
    three = b.conv(normed, 4, (3, 3), pads=(1, 1, 1, 1))
    scaled = b.affine_const(b.add(one, three), "Mul")
    side = b.conv("input", 4, (3, 3), pads=(1, 1, 1, 1))
    mixed = b.add(b.batchnorm(b.relu(side)), side)
    last = b.conv(b.add(scaled, mixed), 4, (3, 3), pads=(1, 1, 1, 1))
    return load_proto(b.build([a, one, last]), tmp_path), [a, one, last]


def test_a_walk_over_several_targets_gives_each_the_filters_of_a_walk_that_copies(tmp_path, monkeypatch):
    model, targets = _net(tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(Engine, "_may_overwrite", lambda self, bank: False)
        copied = {d.layer: d for d in fd.iter_decode(model, layers=targets, dtype="float64")}
        alone = {t: fd.decode(model, t, dtype="float64") for t in targets}
    overwritten = []
    may = Engine._may_overwrite
    monkeypatch.setattr(Engine, "_may_overwrite", lambda self, bank: overwritten.append(may(self, bank))
                        or overwritten[-1])
    together = {d.layer: d for d in fd.iter_decode(model, layers=targets, dtype="float64")}
    assert any(overwritten)  # the sum, its scale: written in place
    for target in targets:
        for truth in (copied[target], alone[target]):
            np.testing.assert_allclose(together[target].filters, truth.filters, rtol=0, atol=1e-12)
            np.testing.assert_allclose(together[target].bias, truth.bias, rtol=0, atol=1e-12)
        alone_in_place = fd.decode(model, target, dtype="float64")
        np.testing.assert_allclose(alone_in_place.filters, copied[target].filters, rtol=0, atol=1e-12)


def test_a_target_handed_over_as_a_copy_may_be_overwritten_and_one_handed_as_is_may_not(tmp_path, monkeypatch):
    model, targets = _net(tmp_path)
    picked = {targets[0]: [0, 2]}  # a selection: the result is a copy of two rows of the bank
    with monkeypatch.context() as patch:
        patch.setattr(Engine, "_may_overwrite", lambda self, bank: False)
        truth = {d.layer: d for d in fd.iter_decode(model, layers=targets, dtype="float64", neurons=picked)}
    counts = {}
    may = Engine._may_overwrite
    for name, neurons in (("whole", None), ("picked", picked)):
        overwritten = []
        monkeypatch.setattr(Engine, "_may_overwrite", lambda self, bank, seen=overwritten: seen.append(
            may(self, bank)) or seen[-1])
        got = {d.layer: d for d in fd.iter_decode(model, layers=targets, dtype="float64", neurons=neurons)}
        counts[name] = sum(overwritten)
    assert counts["picked"] > counts["whole"]  # the batch norm after the picked target scales its bank in place
    for target in targets:
        np.testing.assert_allclose(got[target].filters, truth[target].filters, rtol=0, atol=1e-12)


def test_targets_the_caller_drops_are_written_in_place_and_what_it_keeps_is_not(tmp_path, monkeypatch):
    """A caller that streams decodes (keeps a copy, drops the result) leaves each target's bank to the walk, so
    the batch norm after target ``a`` scales its bank in place; what a caller keeps, the results or only a view of
    their filters, stays as decoded."""
    model, targets = _net(tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(Engine, "_may_overwrite", lambda self, bank: False)
        truth = {d.layer: d.filters.copy() for d in fd.iter_decode(model, layers=targets, dtype="float64")}
    may = Engine._may_overwrite
    counts = {}
    for keep in ("a copy", "the results", "a view"):
        overwritten, kept = [], {}
        monkeypatch.setattr(Engine, "_may_overwrite", lambda self, bank, seen=overwritten: seen.append(
            may(self, bank)) or seen[-1])
        for d in fd.iter_decode(model, layers=targets, dtype="float64"):
            kept[d.layer] = d.filters.copy() if keep == "a copy" else d if keep == "the results" else d.filters[1:3]
            del d
        counts[keep] = sum(overwritten)
        for target in targets:
            got = kept[target].filters if keep == "the results" else kept[target]
            np.testing.assert_allclose(got, truth[target][1:3] if keep == "a view" else truth[target], rtol=0,
                                       atol=1e-12)
    assert counts["a copy"] > counts["the results"] == counts["a view"]


def test_a_target_is_released_only_when_nothing_but_the_walk_refers_to_its_memory():
    """``Held.ids`` given the walk's values: a target's bank that only the walk's values hold is released; one
    the caller still holds, whole or by a view, is not; nor one that a value holds through a view (whose holders a
    count on the memory's owner cannot see)."""
    from fdsub_onnx.compose.values import Tensor
    from fdsub_onnx.compose.walker import Held

    def case(hold):
        bank = _bank(channels=4)
        values = {"t": Tensor(Geometry(), 4, (5, 5), bank), "alias": Tensor(Geometry(), 4, (5, 5), bank),
                  "other": Tensor(Geometry(), 4, (5, 5), Bank(bank.filters, bank.bias))}
        held = Held()
        held.add([values["t"]])
        caller = hold(bank, values)
        key = memory_of(bank.filters)
        return key in held.ids(values, among={key}), key in held.ids(values, among=set()), caller

    assert case(lambda bank, values: None)[:2] == (False, True)  # only asked about what a node reads last
    assert case(lambda bank, values: bank.filters)[0]
    assert case(lambda bank, values: bank.filters[1:3])[0]
    assert case(lambda bank, values: values.update(view=Tensor(Geometry(), 2, (5, 5), Bank(bank.filters[:2],
                                                                                           bank.bias[:2]))))[0]
