"""Concatenations held as their pieces (``engine.Stacked``): never copied where a 1x1 convolution or a per-channel
affine reads them, the same filters as a copied stack, and their pieces never overwritten while a stack holds them."""

import weakref

import numpy as np
import pytest
from checks import load_proto
from netgen import NetBuilder, linear_zoo, relu_zoo

import fdsub_onnx as fd
from fdsub_onnx.compose.backend import NumpyBackend, get_backend
from fdsub_onnx.compose.engine import Bank, Engine, Stacked, references
from fdsub_onnx.compose.inspect import bank_peak, inspect_model
from fdsub_onnx.compose.walker import walk
from fdsub_onnx.graph.geometry import Geometry
from fdsub_onnx.graph.model import find_layer

RNG = np.random.default_rng(0)


def _bank(channels, size):
    return Bank(RNG.standard_normal((channels, 3, size, size)), RNG.standard_normal(channels))


def _placed(banks, offsets, rf):
    """The stack's filters by hand: each bank at its place, zeros around it."""
    out = np.zeros((sum(b.channels for b in banks), 3, *rf))
    first = 0
    for bank, (y, x) in zip(banks, offsets):
        size = bank.filters.shape[2:]
        out[first : first + bank.channels, :, y : y + size[0], x : x + size[1]] = bank.filters
        first += bank.channels
    return out


def test_a_stack_is_its_pieces_until_read_and_a_1x1_convolution_composes_each_at_its_place():
    engine = Engine(get_backend("numpy"), "float64")
    small, large, middle = _bank(2, 3), _bank(3, 7), _bank(4, 5)
    window = Geometry(rf=(7, 7), origin=(0, 0))
    inner = engine.concat([small, large], [Geometry(rf=(3, 3), origin=(2, 2)), window], window)
    stack = engine.concat([inner, middle], [window, Geometry(rf=(5, 5), origin=(1, 1))], window)
    assert isinstance(stack, Stacked) and stack.made is None
    assert [p.filters for p in stack.pieces] == [small.filters, large.filters, middle.filters]  # not copied
    scale = RNG.uniform(0.5, 2.0, 9)
    scaled = engine.affine(stack, scale, 0.25)
    assert isinstance(scaled, Stacked) and scaled.made is None and stack.made is None
    weight = RNG.standard_normal((5, 9, 1, 1))
    composed = engine.conv(scaled, weight, None, 1, (1, 1), (7, 7))
    assert scaled.made is None  # composed piece by piece
    want = _placed([small, large, middle], [(2, 2), (0, 0), (1, 1)], (7, 7)) * scale[:, None, None, None]
    np.testing.assert_allclose(scaled.filters, want, rtol=0, atol=1e-13)
    np.testing.assert_allclose(composed.filters, np.einsum("kc,cimn->kimn", weight[:, :, 0, 0], want), atol=1e-12)
    bias = np.concatenate([small.bias, large.bias, middle.bias]) * scale + 0.25
    np.testing.assert_allclose(scaled.bias, bias, atol=1e-13)
    np.testing.assert_allclose(composed.bias, weight[:, :, 0, 0] @ bias, atol=1e-12)
    reference = Engine(get_backend("numpy"), "float64", kernel="reference")
    np.testing.assert_allclose(reference.conv(scaled, weight, None, 1, (1, 1), (7, 7)).filters, composed.filters,
                               atol=1e-12)


def test_a_stack_no_piece_of_which_fills_its_window_composes_into_zeros():
    engine = Engine(get_backend("numpy"), "float64")
    left, right = _bank(2, 3), _bank(3, 3)
    window = Geometry(rf=(3, 5), origin=(0, 0))
    stack = engine.concat([left, right], [Geometry(rf=(3, 3), origin=(0, 0)), Geometry(rf=(3, 3), origin=(0, 2))],
                          window)
    weight = RNG.standard_normal((4, 5, 1, 1))
    composed = engine.conv(stack, weight, None, 1, (1, 1), (3, 5))
    want = np.einsum("kc,cimn->kimn", weight[:, :, 0, 0], _placed([left, right], [(0, 0), (0, 2)], (3, 5)))
    np.testing.assert_allclose(composed.filters, want, rtol=0, atol=1e-12)


def _dense(tmp_path):
    """A dense block: each 1x1 conv reads, through a BatchNorm, the concatenation of every map before it (receptive
    fields 3, 5, 7), made as a concatenation of the last one and the new map; the first map is batch-normed on its
    own after the first concatenation took it, and nothing but the stacks reads it after that."""
    b = NetBuilder(3, 14, 14, seed=7)
    first = b.conv("input", 4, 3, 1, (1, 1, 1, 1))
    stack = b.concat([first])
    side = b.conv(b.batchnorm(first), 3, 1)
    bottlenecks = []
    for _ in range(2):
        bottlenecks.append(b.conv(b.batchnorm(stack), 6, 1))
        stack = b.concat([stack, b.conv(bottlenecks[-1], 4, 3, 1, (1, 1, 1, 1))])
    last = b.conv(b.batchnorm(stack), 5, 1)
    targets = [side, *bottlenecks, last]
    return load_proto(b.build(targets), tmp_path), targets


@pytest.mark.parametrize("piece_bytes", [NumpyBackend.piece_bytes, 1])  # 1: each piece's products row by row
def test_a_dense_blocks_1x1_convolutions_never_copy_a_stack_and_match_the_definition(tmp_path, monkeypatch,
                                                                                    piece_bytes):
    monkeypatch.setattr(NumpyBackend, "piece_bytes", piece_bytes)
    model, targets = _dense(tmp_path)
    want = {t: fd.decode(model, t, dtype="float64", kernel="reference") for t in targets}

    def copied(self, stack):
        raise AssertionError("a stack was copied")

    monkeypatch.setattr(Engine, "stacked_filters", copied)
    for decoded in fd.iter_decode(model, layers=targets, dtype="float64"):
        np.testing.assert_allclose(decoded.filters, want[decoded.layer].filters, rtol=0, atol=1e-12)
        np.testing.assert_allclose(decoded.bias, want[decoded.layer].bias, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_a_piece_a_stack_holds_is_not_scaled_in_place(tmp_path, dtype):
    """The first map's own BatchNorm reads it last while a later stack still holds it: a walk that scaled it in place
    would change that stack's filters (the last two targets)."""
    model, targets = _dense(tmp_path)
    together = {d.layer: d for d in fd.iter_decode(model, layers=targets, dtype=dtype)}
    for target in targets:
        alone = fd.decode(model, target, dtype=dtype)
        np.testing.assert_allclose(together[target].filters, alone.filters, rtol=0,
                                   atol=1e-12 if dtype == "float64" else 1e-5)


def test_a_stack_whose_filters_are_made_lets_its_pieces_go_and_is_read_as_any_bank():
    engine = Engine(get_backend("numpy"), "float64")
    small, large = _bank(2, 3), _bank(3, 5)
    window = Geometry(rf=(5, 5), origin=(0, 0))
    stack = engine.affine(engine.concat([small, large], [Geometry(rf=(3, 3), origin=(1, 1)), window], window),
                          np.full(5, 2.0), 0.0)
    made = stack.filters
    assert [array for _, array in references(stack)] == [made]  # the pieces may be freed with their maps
    np.testing.assert_allclose(made, 2 * _placed([small, large], [(1, 1), (0, 0)], (5, 5)), atol=1e-13)
    again = engine.concat([stack, small], [window, Geometry(rf=(3, 3), origin=(1, 1))], window)
    assert again.pieces[0].filters is made and again.scale is None
    weight = RNG.standard_normal((4, 7, 1, 1))
    composed = engine.conv(again, weight, None, 1, (1, 1), (5, 5))
    want = np.einsum("kc,cimn->kimn", weight[:, :, 0, 0],
                     np.concatenate([made, _placed([small], [(1, 1)], (5, 5))]))
    np.testing.assert_allclose(composed.filters, want, rtol=0, atol=1e-12)


class _Counting(NumpyBackend):
    """NumPy, keeping a weak reference to every array it makes but the workspace's (flat bytes), so that a test can
    add up the banks alive."""

    def __init__(self):
        self.alive = weakref.WeakValueDictionary()

    def _kept(self, array):
        if array.dtype != np.uint8:
            self.alive[id(array)] = array
        return array

    def zeros(self, shape, dtype):
        return self._kept(super().zeros(shape, dtype))

    def empty(self, shape, dtype):
        return self._kept(super().empty(shape, dtype))

    def copy(self, array):
        return self._kept(super().copy(array))

    def live(self) -> int:
        return sum(array.nbytes for array in list(self.alive.values()))


def _held_and_planned(model, targets) -> tuple[int, int]:
    """The most bytes of banks a walk over ``targets`` held at once, and what the plan says it holds."""
    backend, held = _Counting(), 0
    for _ in walk(model, Engine(backend, "float64"), targets=targets, compose=True):
        held = max(held, backend.live())
    return held, bank_peak(model, Engine(NumpyBackend(), "float64"), targets)


def test_the_planned_peak_of_a_dense_block_counts_each_map_once(tmp_path):
    """Its stacks hold the maps before them, so the plan is the maps and the bottlenecks alive (it counted every
    concatenation as a copy: 1.5x on this block)."""
    b = NetBuilder(3, 48, 48, seed=7)
    maps, targets = [b.conv("input", 32, 7, 4, (3, 3, 3, 3))], []
    for _ in range(5):
        targets.append(b.conv(b.batchnorm(b.concat(maps)), 32, 1))
        maps.append(b.conv(targets[-1], 16, 3, 1, (1, 1, 1, 1)))
        targets.append(maps[-1])
    targets.append(b.conv(b.batchnorm(b.concat(maps)), 8, 1))
    held, planned = _held_and_planned(load_proto(b.build(targets), tmp_path), targets)
    assert held <= planned <= 1.05 * held, (held, planned)


@pytest.mark.parametrize("case", [name for name, _ in linear_zoo() + relu_zoo()])
def test_no_plan_is_under_the_banks_its_walk_holds(case, tmp_path):
    model = load_proto(dict(linear_zoo() + relu_zoo())[case], tmp_path)
    targets = [find_layer(model, layer.name).output[0] for layer in inspect_model(model).layers
               if layer.decodable]
    held, planned = _held_and_planned(model, targets)
    assert held <= planned, (held, planned)


def test_the_plans_memory_ignores_a_drop_of_a_value_it_never_held():
    """The walk drops every value a node read last, Blocked ones it made itself included: such a drop must not
    leave a count that a later value with the same id would inherit."""
    from fdsub_onnx.compose.values import Tensor
    from fdsub_onnx.compose.walker import _Memory

    memory = _Memory(Engine(NumpyBackend(), "float32"))
    value = Tensor(Geometry(rf=(3, 3), origin=(0, 0)), 2, (4, 4))
    memory.drop(value)
    memory.hold(value, [], None)
    assert memory.bytes == memory.peak == 2 * 3 * 3 * 3 * 4
    memory.drop(value)
    assert memory.bytes == 0
