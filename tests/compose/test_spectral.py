"""The spectral (polyphase + DFT) composition route: the same filters as the direct kn2row route and the
definition, on every shape the engine meets, and the planner's cost model following the route the engine takes."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from checks import assert_identity, interior, random_images
from hypothesis import given, settings
from hypothesis import strategies as st
from netgen import linear_zoo, relu_zoo, run_ort

import fdsub_onnx as fd
from fdsub_onnx.compose import engine, spectral
from fdsub_onnx.compose.backend import COMPOSITION, NumpyBackend, Workspace, get_backend
from fdsub_onnx.compose.engine import BAND_PIECES, _conv_fast, _conv_reference
from fdsub_onnx.modes.plan import Costs

NUMPY = get_backend("numpy")


def composed(kernel, d_in, weight, rows, groups, step, dtype, extra=(0, 0)):
    """The bank ``weight``'s ``rows`` compose from ``d_in`` by ``kernel`` (the engine's grouping of rows)."""
    k, cig, ky, kx = weight.shape
    group_of_row = rows // (k // groups)
    out_rf = tuple(r + (t - 1) * s + e for r, t, s, e in zip(d_in.shape[2:], (ky, kx), step, extra))
    d_in, weight = d_in.astype(dtype), weight[rows].astype(dtype)
    if kernel == "reference":
        return _conv_reference(NUMPY, d_in, weight, group_of_row, groups, step, out_rf, dtype)
    return _conv_fast(NUMPY, d_in, weight, group_of_row, groups, step, out_rf, dtype, kernel)


def relative(a, b) -> float:
    assert np.abs(b).max() > 0, "all-zero filters compare equal to anything"
    return float(np.abs(a - b).max() / np.abs(b).max())


SHAPES = [  # (K, C_in, groups, image channels, R_y, R_x, k_y, k_x, step)
    (6, 5, 1, 3, 7, 7, 3, 3, (1, 1)),  # stride 1, odd sizes
    (4, 4, 1, 3, 8, 6, 3, 3, (2, 2)),  # even sizes
    (5, 3, 1, 1, 9, 10, 2, 2, (4, 4)),  # 2x2 kernel, one image channel
    (4, 6, 1, 3, 17, 13, 3, 3, (8, 8)),  # sizes not a multiple of the step
    (3, 4, 1, 3, 33, 35, 3, 3, (16, 16)),
    (2, 3, 1, 3, 64, 65, 3, 3, (32, 32)),
    (4, 3, 1, 3, 11, 9, 5, 5, (2, 4)),  # unequal steps, 5x5
    (4, 3, 1, 3, 10, 10, 1, 3, (3, 1)),  # 1x3 kernel
    (4, 3, 1, 3, 12, 12, 3, 3, (4, 4)),  # a dilated conv: taps d * S apart (here d = 2 over S = 2)
    (6, 6, 3, 3, 9, 9, 3, 3, (2, 2)),  # groups
    (4, 4, 4, 3, 9, 9, 3, 3, (2, 2)),  # depthwise: its own path whichever route is asked
]


@pytest.mark.parametrize("dtype, tol", [("float64", 1e-10), ("float32", 1e-5)])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "K{}C{}g{}i{}R{}x{}k{}x{}s{}".format(*s[:8], s[8][0]))
def test_spectral_route_equals_the_definition(shape, dtype, tol):
    k, c_in, groups, image, ry, rx, ky, kx, step = shape
    rng = np.random.default_rng(sum(shape[:8]))
    d_in = rng.standard_normal((c_in, image, ry, rx))
    weight = rng.standard_normal((k, c_in // groups, ky, kx))
    rows = np.arange(k)
    ref = composed("reference", d_in, weight, rows, groups, step, "float64")
    for kernel in ("spectral", "kn2row", "fast"):
        got = composed(kernel, d_in, weight, rows, groups, step, dtype)
        assert got.dtype == np.dtype(dtype)
        assert relative(got, ref) <= tol, f"{kernel}: {relative(got, ref):.2e}"


def test_spectral_route_on_a_subset_of_rows_and_a_larger_output():
    """Rows not contiguous (written back through a gathered copy) and an output wider than the composition."""
    rng = np.random.default_rng(3)
    d_in, weight = rng.standard_normal((4, 3, 13, 11)), rng.standard_normal((8, 2, 3, 3))
    rows = np.array([0, 3, 5, 6])
    ref = composed("reference", d_in, weight, rows, 2, (4, 4), "float64", extra=(3, 1))
    got = composed("spectral", d_in, weight, rows, 2, (4, 4), "float64", extra=(3, 1))
    assert relative(got, ref) <= 1e-10


@pytest.mark.parametrize("piece_bytes", [1, 700, 9000])  # a row of one output channel's products a band; a few
@pytest.mark.parametrize("shape", SHAPES[:-1], ids=lambda s: "K{}C{}g{}i{}R{}x{}k{}x{}s{}".format(*s[:8], s[8][0]))
def test_kn2row_in_bands_equals_the_definition_and_holds_a_band_of_products(shape, piece_bytes, monkeypatch):
    """Where a chunk's products for whole images would not stay in cache (``CACHED_PRODUCTS``, here none), kn2row
    makes them a band of ``BAND_PIECES * piece_bytes`` of the bank's rows at a time (rows not contiguous go through
    a gathered copy): the same filters, and a products buffer of a band, not of whole images (but for a grouped
    convolution, ``CACHED_PRODUCTS``)."""
    monkeypatch.setattr(NumpyBackend, "piece_bytes", piece_bytes)
    monkeypatch.setattr(engine, "CACHED_PRODUCTS", 0)
    k, c_in, groups, image, ry, rx, ky, kx, step = shape
    rng = np.random.default_rng(sum(shape[:8]))
    d_in, weight = rng.standard_normal((c_in, image, ry, rx)), rng.standard_normal((k, c_in // groups, ky, kx))
    rows = np.arange(k)[::-1][::2][::-1] if groups == 1 else np.arange(k)
    group_of_row = rows // (k // groups)
    out_rf = tuple(r + (t - 1) * s + 2 for r, t, s in zip((ry, rx), (ky, kx), step))
    want = _conv_reference(NUMPY, d_in, weight[rows], group_of_row, groups, step, out_rf, "float64")
    workspace = Workspace(NUMPY)
    got = _conv_fast(NUMPY, d_in, weight[rows], group_of_row, groups, step, out_rf, "float64", "kn2row", workspace)
    assert relative(got, want) <= 1e-12
    if groups > 1:  # a grouped convolution's products are made for whole images, a group at a time
        assert workspace.nbytes == ky * kx * (k // groups) * image * ry * rx * 8
    else:
        one_row = ky * kx * rx * 8  # a band holds at least one row of one output channel's products
        assert workspace.nbytes <= max(BAND_PIECES * piece_bytes, one_row)


def test_kn2row_makes_products_that_stay_in_cache_for_whole_images_at_once():
    rng = np.random.default_rng(4)
    d_in, weight = rng.standard_normal((6, 3, 40, 40)), rng.standard_normal((8, 6, 3, 3))
    workspace = Workspace(NUMPY)
    got = _conv_fast(NUMPY, d_in, weight, np.zeros(8, int), 1, (2, 2), (44, 44), "float64", "kn2row", workspace)
    assert workspace.nbytes == 9 * 8 * 3 * 40 * 40 * 8  # one product for every tap, row and image channel
    want = _conv_reference(NUMPY, d_in, weight, np.zeros(8, int), 1, (2, 2), (44, 44), "float64")
    assert relative(got, want) <= 1e-12


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 5), st.integers(1, 3), st.integers(1, 20), st.integers(1, 20),
       st.integers(1, 4), st.integers(1, 4), st.integers(1, 9), st.integers(1, 9), st.integers(0, 2**16))
def test_spectral_route_equals_kn2row_on_random_shapes(k, c, image, ry, rx, ky, kx, sy, sx, seed):
    rng = np.random.default_rng(seed)
    d_in, weight = rng.standard_normal((c, image, ry, rx)), rng.standard_normal((k, c, ky, kx))
    rows = np.arange(k)
    got = composed("spectral", d_in, weight, rows, 1, (sy, sx), "float64")
    assert relative(got, composed("kn2row", d_in, weight, rows, 1, (sy, sx), "float64")) <= 1e-10


def test_chunked_spectra_give_the_same_filters(monkeypatch):
    """A small memory budget splits the residue rows into passes (one ending an image channel and starting the
    next), output rows (their inverse along y in a buffer of its own) and frequency blocks (a last, shorter block),
    with the weights' operands made once for all passes or remade in each: every piece must land where the unchunked
    composition puts it."""
    rng = np.random.default_rng(5)
    d_in, weight = rng.standard_normal((3, 3, 21, 19)).astype(np.float32), rng.standard_normal((7, 3, 3, 3))
    weight = weight.astype(np.float32)
    whole = np.zeros((7, 3, 21 + 16, 19 + 16), np.float32)
    spectral.compose(NUMPY, whole, d_in, weight, (8, 8), np.float32, 1 << 30)
    monkeypatch.setattr(spectral, "BLOCK_BYTES", 3 * 1 * 8 * 4 * 4)  # one row, 8 phases: blocks of 4 of 13 kept
    per_phase = spectral.PARTS * 15 * 4  # one channel's (or row's) spectra of one phase: a 5 x 5 grid, 15 frequencies
    made = spectral.PARTS * 13 * 7 * 3 * 4  # the weights' operands at the 13 kept frequencies (2 repeat others)
    both = 2 * 7  # two buffers, each as large as the larger of the channels (3) and the rows (7)
    plans = []
    plan = spectral._plan
    monkeypatch.setattr(spectral, "_plan", lambda *a: plans.append((a[-1], plan(*a))) or plans[-1][1])
    residue_rows = [[(c, p, 1)] for c in range(3) for p in range(8)]  # passes of pieces (image channel, rows)
    for room, cut, once in [
            (per_phase * both * 64 * 2 + made, ([[(0, 0, 8), (1, 0, 8)], [(2, 0, 8)]], 7), True),  # whole channels
            (per_phase * both * 64 - 1 + made, ([[(c, 0, 8)] for c in range(3)], 7), False),  # made once: finer
            (per_phase * both * 64 - 1, ([[(0, 0, 6)], [(0, 6, 2), (1, 0, 4)], [(1, 4, 4), (2, 0, 2)], [(2, 2, 6)]],
                                         7), True),  # 4 passes across channels, where blocks in each took 6
            (per_phase * both * 40, ([[(0, 0, 5)], [(0, 5, 3), (1, 0, 2)], [(1, 2, 5)], [(1, 7, 1), (2, 0, 4)],
                                      [(2, 4, 4)]], 7), False),  # a shorter last pass
            (per_phase * both * 8 - 1, (residue_rows, 4), True),
            (2 * made - 1, (residue_rows, 1), False)]:
        assert spectral._plan(7, 3, 3, (8, 8), (15, 13), 4, room) == (*cut, once)
        chunked = np.zeros_like(whole)
        spectral.compose(NUMPY, chunked, d_in, weight, (8, 8), np.float32, room)
        assert plans[-1] == (room, (*cut, once))  # the cut asserted is the one compose takes
        assert relative(chunked, whole) <= 1e-6, cut
    ref = composed("reference", d_in.astype(np.float64), weight.astype(np.float64), np.arange(7), 1, (8, 8),
                   "float64")
    assert relative(whole, ref) <= 1e-5


class CountingProducts(type(NUMPY)):
    """The NumPy backend, counting the frequencies multiplied (GEMMs into a [K, phases] output, or a batch of them)."""

    def __init__(self, k, phases):
        self.shape, self.products = (k, phases), 0

    def matmul(self, a, b, out=None):
        if out is not None and out.shape[-2:] == self.shape and a.shape[-2] == self.shape[0]:
            self.products += int(np.prod(out.shape[:-2]))
        return super().matmul(a, b, out=out)


@pytest.mark.parametrize("ry, rx, kept", [(21, 19, 13), (16, 16, 10), (21, 16, 11)])
def test_repeated_frequencies_are_not_multiplied(ry, rx, kept):
    """The phases and weights are real: along x frequency 0 (and L_x / 2 on an even grid) the y frequencies over
    L_y / 2 repeat others' conjugates, and are not multiplied (5 x 5 grid: 13 of 15; 4 x 4: 10 of 12; 5 x 4: 11
    of 15); the filters stay the definition's."""
    rng = np.random.default_rng(2)
    d_in, weight = rng.standard_normal((5, 3, ry, rx)), rng.standard_normal((6, 5, 3, 3))
    backend = CountingProducts(6, 3 * 8 * 8)
    out = np.zeros((6, 3, ry + 16, rx + 16))
    workspace = Workspace(backend)
    workspace.take(COMPOSITION, (1 << 20,), np.float64)[:] = np.nan  # a buffer's last contents are not zeros
    spectral.compose(backend, out, d_in, weight, (8, 8), np.float64, 1 << 30, workspace)
    assert len(spectral._kept(spectral._grid((ry, rx), (3, 3), (8, 8))[1])[0]) == kept
    assert backend.products == spectral.PARTS * kept
    ref = composed("reference", d_in, weight, np.arange(6), 1, (8, 8), "float64")
    assert relative(out[:, :, : ry + 16, : rx + 16], ref) <= 1e-10


def test_kn2row_and_the_spectral_route_share_one_scratch_buffer():
    """A layer runs one route at a time, so a decode's kn2row products and spectral spectra are one buffer: its
    peak holds the larger, not both."""
    rng = np.random.default_rng(5)
    d_in, weight = rng.standard_normal((4, 3, 17, 13)), rng.standard_normal((6, 4, 3, 3))
    rows, held = np.zeros(6, int), {}
    for kernels in (("kn2row",), ("spectral",), ("kn2row", "spectral"), ("spectral", "kn2row")):
        workspace = Workspace(NUMPY)
        for kernel in kernels:
            _conv_fast(NUMPY, d_in, weight, rows, 1, (8, 8), (33, 29), "float64", kernel, workspace)
        held[kernels] = workspace.nbytes
    assert 0 < held[("kn2row",)] < held[("spectral",)]
    assert held[("kn2row", "spectral")] == held[("spectral", "kn2row")] == held[("spectral",)]


def test_the_cost_model_picks_spectral_only_for_thick_phases():
    vgg_deep = (512, 512, 3, (220, 220), (3, 3), (16, 16))
    assert spectral.cheaper(*vgg_deep)
    assert spectral.charged_flops(*vgg_deep) < 2.0 * 512 * 512 * 9 * 3 * 220 * 220
    assert not spectral.cheaper(256, 256, 3, (24, 24), (3, 3), (4, 4))  # 48 phases: GEMMs too thin
    assert not spectral.cheaper(512, 512, 3, (220, 220), (1, 1), (16, 16))  # a 1x1 conv has nothing to save
    assert not spectral.cheaper(64, 64, 3, (5, 5), (3, 3), (1, 1))


def test_the_spectral_route_is_not_taken_where_its_spectra_would_be_thin():
    """ResNet50's layer4.1.conv2 (512 x 512, R 299, S 32): one image channel's phase spectra (528 MB, Gauss's
    three operands) are over the room its banks leave (323 MB). Before residue-row passes the route ran one output
    row per product there (100 s against kn2row's 8); now it takes 10 residue rows a pass (320 phases; 10 fit, the
    96 rows of the 3 image channels in 10 passes) with every row, and a room too small for thick GEMMs leaves the
    convolution to kn2row."""
    resnet = (512, 512, 3, (299, 299), (3, 3), (32, 32))
    per_phase = spectral.PARTS * 12 * 7 * 4  # the per_phase compose and cheaper use
    passes, rows = spectral._passes(512, 512, 3, (32, 32), per_phase, 323 << 20)
    assert rows == 512 and [sum(pb for _, _, pb in pieces) for pieces in passes] == [10] * 9 + [6]
    assert [(c, p) for pieces in passes for c, p0, pb in pieces for p in range(p0, p0 + pb)] == [
        (c, p) for c in range(3) for p in range(32)]  # every residue row once, in order
    assert passes[3] == [(0, 30, 2), (1, 0, 8)]
    assert spectral.cheaper(*resnet, room_bytes=323 << 20)
    assert not spectral.cheaper(*resnet, room_bytes=40 << 20)  # one residue row a pass: 32 phases
    assert not spectral.cheaper(*resnet, room_bytes=11 << 20)  # and one output row a product


def test_the_planner_charges_the_route_the_engine_takes():
    costs = Costs("float32")
    costs.image_channels = 3
    costs.conv(None, np.zeros((512, 512, 3, 3)), None, 1, (16, 16), (252, 252))
    assert costs.flops == pytest.approx(spectral.charged_flops(512, 512, 3, [220, 220], (3, 3), (16, 16)))
    assert costs.flops < 0.9 * 2.0 * 512 * 512 * 9 * 3 * 220 * 220
    assert costs.product_flops == costs.flops and costs.bank_bytes == 512 * 3 * 252 * 252 * 4  # its bank, float32
    for kernel, taps in ((np.full((8, 1, 14, 14), 1 / 196), 28), (np.arange(8 * 9.0).reshape(8, 1, 3, 3), 9)):
        costs.flops = costs.product_flops = costs.bank_bytes = 0.0  # a pooling window's taps along each axis (two
        side = 220 + 13 * 16 if taps == 28 else 252  # passes); any other depthwise kernel's all: none a GEMM
        costs.conv(None, kernel, None, 8, (16, 16), (side, side))
        assert costs.flops == pytest.approx(2.0 * 8 * taps * 3 * 220 * 220)
        assert costs.product_flops == 0 and costs.bank_bytes == 8 * 3 * side * side * 4


@functools.cache
def cases() -> dict:
    return dict(linear_zoo() + relu_zoo())


@pytest.mark.parametrize("case", ["dilation2", "depthwise_grouped", "residual_projection", "concat_receptive_fields",
                                  "channel_shuffle", "sum3"])
def test_identity_with_the_spectral_route_forced(case, load):
    proto = cases()[case]
    model = load(proto)
    layers = [layer.name for layer in fd.inspect_model(model).layers if layer.decodable]
    images = random_images(model, 2, seed=4)
    acts = run_ort(proto, images, layers)
    checked = 0
    for name in layers:
        spectral_ = fd.decode(model, name, dtype="float64", kernel="spectral")
        direct = fd.decode(model, name, dtype="float64", kernel="kn2row")
        assert relative(spectral_.filters, direct.filters) <= 1e-10, name
        np.testing.assert_allclose(spectral_.bias, direct.bias, rtol=1e-12, atol=1e-12)
        shape = model.shapes[name]
        in_y, in_x = interior(spectral_, model.input_shape[2:], shape[2:] if len(shape) == 4 else (1, 1))
        if in_y.any() and in_x.any():
            assert_identity(spectral_, acts[name], images, rtol=1e-5)
            checked += 1
    assert checked, f"{case}: no layer has an interior position"


@pytest.mark.parametrize("case", ["residual_projection", "dilation2", "mixed_nonlinear"])
def test_bottom_up_by_the_spectral_route_equals_the_adjoint(case, load):
    model = load(cases()[case])
    checked = 0
    for layer in fd.inspect_model(model).layers:
        if not layer.decodable:
            continue
        up = fd.decode(model, layer.name, dtype="float64", route="bottom-up", kernel="spectral")
        down = fd.decode(model, layer.name, dtype="float64", route="adjoint", position=up.position)
        if down.exact_at != "interior":
            continue
        assert relative(up.filters, down.filters) <= 1e-5, layer.name
        checked += 1
    assert checked, f"{case}: no interior position compared"


def test_fds_filters_are_the_same_by_either_route(load):
    model = load(cases()["relu_residual"])
    images = fd.ArrayImages(random_images(model, 6, seed=7))
    layer = [x.name for x in fd.inspect_model(model).layers if x.decodable][-1]
    direct = fd.decode(model, layer, mode="fds", images=images, top=3, dtype="float64", kernel="kn2row")
    spectral_ = fd.decode(model, layer, mode="fds", images=images, top=3, dtype="float64", kernel="spectral")
    assert relative(spectral_.filters, direct.filters) <= 1e-10


@pytest.mark.parametrize("kind", ["uniform", "rank_one", "rows_constant", "general", "one_zero_row"])
@pytest.mark.parametrize("dtype, tol", [("float64", 1e-12), ("float32", 1e-5)])
def test_depthwise_rank_one_kernels_compose_in_two_passes(kind, dtype, tol, monkeypatch):
    """A depthwise kernel that is an outer product (a pooling window: uniform) composes as k_x taps along x, then
    k_y along y, into rows out of order and an output wider than the composition; any other kernel, or a row whose
    kernel is all zeros, takes every tap. The same filters as the definition either way."""
    from fdsub_onnx.compose import engine

    rng = np.random.default_rng(7)
    channels, (ky, kx), step = 6, (4, 5), (3, 2)
    d_in = rng.standard_normal((channels, 3, 11, 9))
    down, across = rng.standard_normal((channels, ky)), rng.standard_normal((channels, kx))
    weight = {"uniform": np.full((channels, 1, ky, kx), 1.0 / (ky * kx)),
              "rank_one": (down[:, :, None] * across[:, None, :])[:, None],
              "rows_constant": np.repeat(down[:, None, :, None], kx, axis=3),  # ones along x, taps along y
              "general": rng.standard_normal((channels, 1, ky, kx)),
              "one_zero_row": np.concatenate([np.zeros((1, 1, ky, kx)), rng.standard_normal((5, 1, ky, kx))])}[kind]
    calls = []
    separable = engine._separable_taps
    monkeypatch.setattr(engine, "_separable_taps", lambda *a: calls.append(1) or separable(*a))
    rows = np.array([5, 0, 2, 3])
    ref = composed("reference", d_in, weight, rows, channels, step, "float64", extra=(2, 1))
    got = composed("fast", d_in, weight, rows, channels, step, dtype, extra=(2, 1))
    assert relative(got, ref) <= tol, f"{relative(got, ref):.2e}"
    assert bool(calls) == (kind in ("uniform", "rank_one", "rows_constant"))


def test_a_huge_pooling_window_is_found_uniform_without_a_copy():
    """The planner's walks pass a pooling window as a read-only broadcast view (``uniform_window``), so that a huge
    window costs no memory: telling it is rank one must not copy it either (64 rows of a 1024 x 1024 window would
    be 512 MiB in float64)."""
    import tracemalloc

    from fdsub_onnx.compose.engine import two_pass_factors
    from fdsub_onnx.compose.ops._window import uniform_window

    window = uniform_window(64, (1024, 1024))
    tracemalloc.start()
    down, across = two_pass_factors(window[:, 0])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 << 20, peak  # the factors themselves: 1 MiB
    assert down.shape == (64, 1024) and across.shape == (64, 1024)
    assert np.all(down == 1 / 1024**2) and np.all(across == 1)
