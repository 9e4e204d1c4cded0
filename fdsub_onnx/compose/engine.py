"""The composition engine: substitution steps on filter banks, written against a backend.

A *bank* holds the decoded filters of every channel of a tensor, ``filters`` shaped
[C, C_image, R_y, R_x], and their effective ``bias`` [C] (docs/method.md, "Composition").
Every method takes ``None`` for a bank and returns ``None``: the graph walker runs the
same op rules for geometry alone (inspect) and for full decoding.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ..graph.geometry import Geometry, Pair
from . import spectral
from .backend import COMPOSITION, Workspace, equal_chunks

#: "fast" picks per convolution between the direct (kn2row) and the spectral composition by their cost
#: (``spectral.cheaper``); "kn2row" and "spectral" force one (tests, benchmarks); "reference" is the definition.
KERNELS = ("fast", "kn2row", "spectral", "reference")


@dataclass
class Bank:
    filters: object  # backend array [C, C_image, R_y, R_x]
    bias: object  # backend array [C]

    @property
    def channels(self) -> int:
        return self.filters.shape[0]


class Stacked:
    """A concatenation's bank held as its pieces, not copied: aligned banks ``pieces`` at ``offsets`` inside the
    window ``rf``, their channels one after the other, with a per-channel ``scale`` not yet applied (None: ones)
    and the effective ``bias``. A 1x1 convolution composes each piece at its place (``Engine.conv``) and a
    per-channel affine only changes ``scale`` and ``bias``; anything else reads ``filters``, made once, after which
    the stack lets its pieces go (as a copied concatenation did) and the engine reads it as any bank. DenseNet
    concatenates every map of a block before each layer's BatchNorm and 1x1 convolution: copied, the pieces sat
    in the window of the largest, padded with zeros, and those copies held most of its decode's memory and time."""

    def __init__(self, pieces: list, offsets: list, rf, scale, bias, engine):
        self.pieces, self.offsets, self.rf, self.scale, self.bias = pieces, offsets, tuple(rf), scale, bias
        self._engine, self._filters = engine, None
        self.channels = sum(piece.channels for piece in pieces)

    @property
    def made(self):
        """The filters, if ``filters`` has made them."""
        return self._filters

    @property
    def filters(self):
        """[C, C_image, R_y, R_x]: each piece copied once, at its place, scaled (made on first use)."""
        if self._filters is None:
            self._filters = self._engine.stacked_filters(self)
            self.pieces, self.offsets = [], []
        return self._filters

    def ranges(self) -> list[tuple[int, int]]:
        """Each piece's channels (first, stop) in the stack."""
        ends = np.cumsum([0, *(piece.channels for piece in self.pieces)]).tolist()
        return list(zip(ends[:-1], ends[1:]))


def lazy(bank) -> bool:
    """Whether a bank is a ``Stacked`` whose filters are not made (still its pieces)."""
    return isinstance(bank, Stacked) and bank.made is None


def composes_pieces(weight_shape, groups: int) -> bool:
    """Whether a convolution of weights of ``weight_shape`` composes a ``Stacked`` piece by piece (``_conv_stacked``)
    rather than making its filters: a 1x1 convolution without groups."""
    return groups == 1 and tuple(weight_shape[2:]) == (1, 1)


def references(bank) -> list[tuple]:
    """``(holder, filters)`` for each filter array a bank refers to, none made: a bank holds its filters; a
    ``Stacked`` its pieces' through their banks, and its own once made."""
    if isinstance(bank, Stacked):
        return [(piece, piece.filters) for piece in bank.pieces] + ([] if bank.made is None else [(bank, bank.made)])
    return [(bank, bank.filters)]


def _passes_none(method):
    """Geometry-only pass: a method given no bank computes nothing."""

    @functools.wraps(method)
    def wrapper(self, bank, *args, **kwargs):
        if bank is None or (isinstance(bank, list) and any(b is None for b in bank)):
            return None
        return method(self, bank, *args, **kwargs)

    return wrapper


def root_of(array):
    """The object an array's memory belongs to: its base's base, through any chain of views."""
    while (base := getattr(array, "base", None)) is not None:
        array = base
    return array


def memory_of(array) -> int:
    """The identity of the memory an array lives in (``root_of``)."""
    return id(root_of(array))


class Engine:
    """Substitution steps for one backend, dtype and kernel choice (``KERNELS``).

    ``overwritable`` holds the memory (``memory_of``) of the banks that the node being walked reads last and
    nothing else holds (the walker sets it): ``affine`` and ``sum`` write into those instead of copying them, which
    for a ResNet50's deepest banks (3 GB each) saved more time than the convolutions take.
    """

    overwritable: frozenset = frozenset()

    def __init__(self, backend, dtype="float32", kernel="fast"):
        self.backend = backend
        self.dtype = np.dtype(dtype)
        self.kernel = kernel
        self.workspace = Workspace(backend)
        self.image_channels = 3  # set by the walker from the model's input

    def identity(self, channels: int) -> Bank:
        """The image's own bank: channel c is a 1x1 impulse on image channel c."""
        eye = np.eye(channels, dtype=self.dtype).reshape(channels, channels, 1, 1)
        return Bank(self.backend.asarray(eye, self.dtype), self.backend.zeros((channels,), self.dtype))

    @_passes_none
    def conv(self, bank: Bank, weight: np.ndarray, bias, groups: int, step: Pair, out_rf: Pair, rows=None) -> Bank:
        """Substitute each input channel's filter at every kernel tap (the heavy step).

        ``weight`` [C_out, C_in/groups, k_y, k_x]; ``step`` is the image-space distance of
        neighbouring taps; ``rows`` restricts the output to those channels.
        """
        c_out = weight.shape[0]
        rows = np.arange(c_out) if rows is None else np.asarray(rows, dtype=np.int64)
        weight = np.asarray(weight, dtype=self.dtype)[rows]
        bias = np.zeros(c_out, self.dtype) if bias is None else np.asarray(bias, self.dtype)
        group_of_row = rows // (c_out // groups)
        pieces = lazy(bank) and composes_pieces(weight.shape, groups) and tuple(out_rf) == bank.rf
        if pieces and self.kernel != "reference":
            filters = _conv_stacked(self.backend, bank, weight, self.dtype, self.workspace)
        elif self.kernel == "reference":
            filters = _conv_reference(self.backend, bank.filters, weight, group_of_row, groups, step, out_rf,
                                      self.dtype)
        else:
            filters = _conv_fast(self.backend, bank.filters, weight, group_of_row, groups, step, out_rf, self.dtype,
                                 self.kernel, self.workspace)
        per_channel = weight.sum(axis=(2, 3))  # [K, C_in/groups]
        beta_in = self.backend.to_numpy(bank.bias).astype(self.dtype)
        cig = weight.shape[1]
        gathered = beta_in[(group_of_row[:, None] * cig + np.arange(cig)[None, :])]
        beta = bias[rows] + (per_channel * gathered).sum(axis=1)
        return Bank(filters, self.backend.asarray(beta, self.dtype))

    @_passes_none
    def affine(self, bank: Bank, scale, shift) -> Bank:
        """Per-channel ``scale * x + shift`` folded into the bank: the same filters where the scale is one, scaled
        in place where the bank is ``overwritable``, else a scaled copy."""
        unscaled = bool(np.all(np.asarray(scale) == 1))
        factor = np.broadcast_to(np.asarray(scale, np.float64), (bank.channels,))
        scale = self.backend.asarray(factor, self.dtype)
        shift = self.backend.asarray(np.broadcast_to(shift, (bank.channels,)), self.dtype)
        bias = self.backend.xp.asarray(bank.bias * scale + shift)
        if lazy(bank):  # the scale waits for the convolution that reads the stack (or ``filters``)
            pending = bank.scale if unscaled else factor * (1.0 if bank.scale is None else bank.scale)
            return Stacked(bank.pieces, bank.offsets, bank.rf, pending, bias, self)
        if unscaled:
            return Bank(bank.filters, bias)
        source = bank.filters
        filters = source if self._may_overwrite(bank) else self.backend.empty(source.shape, self.dtype)
        self._scale(source, scale, filters)
        return Bank(filters, bias)

    @_passes_none
    def sum(self, banks: list[Bank], geoms: list[Geometry], out: Geometry) -> Bank:
        """Add aligned banks: each placed at its origin inside the union window (the others added into an
        ``overwritable`` one that covers the window, where there is one)."""
        memory = [memory_of(b.filters) for b in banks]
        base = next((i for i, (b, g) in enumerate(zip(banks, geoms))
                     if g == out and self._may_overwrite(b) and memory.count(memory[i]) == 1), None)
        filters = self._placed(banks[0], geoms[0], out) if base is None else banks[base].filters
        first = 0 if base is None else base
        for i, (bank, geom) in enumerate(zip(banks, geoms)):
            if i != first:
                self._write(filters, bank, _offset(geom, out), add=True)
        bias = banks[0].bias
        for bank in banks[1:]:
            bias = bias + bank.bias
        return Bank(filters, bias)

    @_passes_none
    def concat(self, banks: list[Bank], geoms: list[Geometry], out: Geometry) -> Stacked:
        """Stack the channels of aligned banks: held as the banks themselves at their places in the window ``out``
        (``Stacked``; a stack's pieces join the new one's), copied only where something reads ``filters``."""
        pieces, offsets, scales = [], [], []
        for bank, geom in zip(banks, geoms):
            y, x = _offset(geom, out)
            inner = bank.pieces if lazy(bank) else [bank if isinstance(bank, Bank) else Bank(bank.filters, bank.bias)]
            places = bank.offsets if lazy(bank) else [(0, 0)]
            pieces += inner
            offsets += [(y + dy, x + dx) for dy, dx in places]
            scale = bank.scale if lazy(bank) else None
            scales.append(np.ones(bank.channels) if scale is None else scale)
        scale = np.concatenate(scales)
        return Stacked(pieces, offsets, out.rf, None if np.all(scale == 1) else scale,
                       self.backend.xp.concatenate([b.bias for b in banks]), self)

    def stacked_filters(self, stacked: Stacked):
        """A ``Stacked``'s filters: each piece copied once, at its place in the window, then scaled."""
        pieces, offsets = stacked.pieces, stacked.offsets
        covered = all(_covers(o, p.filters.shape[2:], stacked.rf) for p, o in zip(pieces, offsets))
        filters = self._window(stacked.channels, pieces[0], stacked.rf, covered)
        for piece, (y, x), (first, stop) in zip(pieces, offsets, stacked.ranges()):
            self._write(filters[first:stop], piece, (y, x))
        if stacked.scale is not None:
            self._scale(filters, self.backend.asarray(stacked.scale, self.dtype), filters)
        return filters

    @_passes_none
    def take(self, bank: Bank, channels) -> Bank:
        """Channels of a bank in the given order (permutations, neuron selection)."""
        index = self.backend.asarray(np.asarray(channels, dtype=np.int64), np.int64)
        return Bank(bank.filters[index], bank.bias[index])

    def _may_overwrite(self, bank: Bank) -> bool:
        return memory_of(bank.filters) in self.overwritable

    def _placed(self, bank: Bank, geom: Geometry, out: Geometry):
        """A copy of the bank's filters at their place in the window ``out``."""
        filters = self._window(bank.channels, bank, out.rf, geom == out)
        self._write(filters, bank, _offset(geom, out))
        return filters

    def _window(self, channels: int, like: Bank, rf: Pair, covered: bool):
        """Filters of ``channels`` over a window of ``rf``: uninitialized where the banks written into them cover
        it (``covered``), else zeros."""
        shape = (channels, like.filters.shape[1], *rf)
        return self.backend.empty(shape, self.dtype) if covered else self.backend.zeros(shape, self.dtype)

    def _scale(self, source, scale, into) -> None:
        """``into = source * scale`` per channel (``into`` may be ``source``), the rows split over the cores."""
        xp = self.backend.xp
        self.backend.on_cores(lambda a, b: xp.multiply(source[a:b], scale[a:b, None, None, None], out=into[a:b]),
                              len(into), into.nbytes)

    def _write(self, filters, bank: Bank, offset: Pair, add: bool = False) -> None:
        """``bank``'s filters written (or added) into ``filters`` at ``offset`` in its window, the rows split over
        the cores."""
        (y, x), (ry, rx) = offset, bank.filters.shape[2:]
        source = bank.filters

        def rows(a, b):
            if add:
                filters[a:b, :, y : y + ry, x : x + rx] += source[a:b]
            else:
                filters[a:b, :, y : y + ry, x : x + rx] = source[a:b]

        self.backend.on_cores(rows, bank.channels, source.nbytes)


def _offset(geom: Geometry, out: Geometry) -> Pair:
    return (geom.origin[0] - out.origin[0], geom.origin[1] - out.origin[1])


def _covers(offset: Pair, shape, rf) -> bool:
    """Whether a piece at ``offset`` of ``shape`` fills the whole window ``rf``."""
    return tuple(offset) == (0, 0) and tuple(shape) == tuple(rf)


#: a stacked 1x1 convolution's products are made a band of rows at a time, this many ``piece_bytes`` each (4 MiB on
#: a CPU, in cache: DenseNet121's 87 bottom-up layers 112.4/112.9 -> 106.3/109.5 s against whole-piece products
#: through a temporary; on a GPU a piece is a whole chunk, so the band is the whole piece)
BAND_PIECES = 4
#: kn2row's products up to this size are made for whole images at once (they stay in the last-level cache, and
#: bands would only add calls), larger ones a band of ``BAND_PIECES`` pieces at a time; a grouped convolution's
#: always for whole images (RegNetY-400MF's in bands: its whole decode 74-80 -> 84-89 s, though each alone ran
#: faster; not understood, benchmarks/README.md)
CACHED_PRODUCTS = 32 << 20


def _conv_stacked(backend, stacked: Stacked, weight, dtype, workspace):
    """A 1x1 convolution of a ``Stacked``: each piece's product with its columns of ``weight`` (times the stack's
    pending scale) written at its place in the window, the first piece that fills it straight into the output, the
    others a band of rows of one image channel at a time (``BAND_PIECES``; ``_kn2row``) through a temporary and
    added; the zeros a copied stack pads its pieces with are never multiplied."""
    k = weight.shape[0]
    matrix = weight[:, :, 0, 0] if stacked.scale is None else weight[:, :, 0, 0] * stacked.scale
    places = list(zip(stacked.pieces, stacked.offsets, stacked.ranges()))
    whole = next((i for i, (piece, offset, _) in enumerate(places)
                  if _covers(offset, piece.filters.shape[2:], stacked.rf)), None)
    shape = (k, stacked.pieces[0].filters.shape[1], *stacked.rf)
    out = backend.zeros(shape, dtype) if whole is None else backend.empty(shape, dtype)
    if whole is not None:
        places.insert(0, places.pop(whole))
    for n, (piece, (y, x), (first, stop)) in enumerate(places):
        w = backend.asarray(matrix[:, first:stop], dtype)
        if n == 0 and whole is not None:
            backend.matmul(w, piece.filters.reshape(piece.channels, -1), out=out.reshape(k, -1))
            continue
        ry, rx = piece.filters.shape[2:]  # kn2row of one tap: each band's product added at the piece's place
        _kn2row(backend, w, piece.filters, (1, 1), (1, 1), dtype, workspace, BAND_PIECES * backend.piece_bytes,
                out[:, :, y : y + ry, x : x + rx])
    return out


def _conv_fast(backend, d_in, weight, group_of_row, groups, step, out_rf, dtype, kernel="fast", workspace=None):
    """Batched substitution, per group: spectral (``spectral.compose``) where it is cheaper or forced, else per
    chunk of output rows one matrix product for all kernel taps, then the backend's shifted accumulation of the
    taps into the output filters (kn2row, ``_kn2row``: a band of the bank's rows at a time where the products
    would not stay in cache). Temporaries come from ``workspace`` (``backend.Workspace``)."""
    workspace = workspace or Workspace(backend)
    k, cig, ky, kx = weight.shape
    c_img, ry, rx = d_in.shape[1:]
    out = backend.zeros((k, c_img, *out_rf), dtype)
    flat = d_in.reshape(d_in.shape[0], -1)
    if cig == 1 and groups > 1:
        _depthwise(backend, out, flat, weight, group_of_row, step, (c_img, ry, rx), dtype, workspace)
        return out
    taps = ky * kx
    room = spectral.room(backend.temp_bytes, d_in.nbytes, out.nbytes)
    for group in np.unique(group_of_row):
        rows = np.flatnonzero(group_of_row == group)
        source = flat[group * cig : (group + 1) * cig]
        if kernel == "spectral" or (kernel == "fast" and spectral.cheaper(
                len(rows), cig, c_img, (ry, rx), (ky, kx), step, out.itemsize, room)):
            _placed_rows(backend, out, rows, functools.partial(
                spectral.compose, backend, source=d_in[group * cig : (group + 1) * cig], weight=weight[rows],
                step=step, dtype=dtype, temp_bytes=room, workspace=workspace))
            continue
        w = np.ascontiguousarray(weight[rows].transpose(2, 3, 0, 1))  # [ky, kx, rows, cig]: tap-major
        product_is_output = taps == 1 and tuple(out_rf) == (ry, rx)  # a 1x1 convolution keeping the size
        row = taps * flat.shape[1] * np.dtype(dtype).itemsize  # one output row's products for whole images
        if product_is_output:
            chunk = held = len(rows)
        elif groups > 1 or len(rows) * row <= CACHED_PRODUCTS:  # whole images, chunks of rows up to temp_bytes
            chunk = equal_chunks(len(rows), max(1, backend.temp_bytes // row))
            held = chunk * row
        else:  # a band of the bank's rows at a time (``_kn2row``)
            held = min(backend.temp_bytes, BAND_PIECES * backend.piece_bytes)
            chunk = equal_chunks(len(rows), max(1, held // (taps * rx * np.dtype(dtype).itemsize)))
        for start in range(0, len(rows), chunk):
            index = rows[start : start + chunk]
            n = len(index)
            w_chunk = backend.asarray(w[:, :, start : start + n].reshape(taps * n, cig), dtype)
            if product_is_output:  # no temporary
                _placed_rows(backend, out, index, functools.partial(_product_into, backend, w_chunk, source))
                continue
            _placed_rows(backend, out, index, functools.partial(
                _kn2row, backend, w_chunk, d_in[group * cig : (group + 1) * cig], (ky, kx), step, dtype, workspace,
                held))
    return out


def _kn2row(backend, weight, source, kernel, step, dtype, workspace, held, part):
    """``part`` [n, C_image, Q_y, Q_x] += the direct substitution of ``source`` [C, C_image, R_y, R_x] by ``weight``
    [taps * n, C] (tap-major): one matrix product for all taps, then their shifted accumulation. A band of the
    bank's rows of one image channel at a time where all the products would not fit ``held`` bytes (whole image
    channels where they do), so that the products are added while in cache: made for whole images, DenseNet121's
    3x3 convolutions of 32 rows wrote and read back 1.9 GB of products each (743 px banks: 1.4-2.2 -> 0.9-1.0 s)."""
    ky, kx = kernel
    taps, (c, c_img, ry, rx) = ky * kx, source.shape
    n = weight.shape[0] // taps
    per_row = taps * n * rx * np.dtype(dtype).itemsize
    offsets = [(i * step[0], j * step[1]) for i in range(ky) for j in range(kx)]
    band = max(1, held // per_row)
    channels = max(1, min(c_img, band // ry))  # whole image channels where one fits, else bands of one
    for c0 in range(0, c_img, channels):
        c1 = min(c_img, c0 + channels)
        for y0 in range(0, ry, band if c1 - c0 == 1 else ry):
            y1 = min(ry, y0 + band)
            rows = source[:, c0:c1, y0:y1].reshape(c, -1)
            products = backend.matmul(weight, rows, out=workspace.take(COMPOSITION, (taps * n, rows.shape[1]), dtype))
            backend.shift_add(part[:, c0:c1, y0 : y1 + (ky - 1) * step[0]],
                              products.reshape(taps, n, c1 - c0, y1 - y0, rx), offsets)


def _product_into(backend, weight, source, part):
    """``part`` [n, ...] = ``weight`` [n, C] @ ``source`` [C, ...]: a 1x1 convolution's output is its product."""
    backend.matmul(weight, source, out=part.reshape(len(part), -1))


def _placed_rows(backend, out, index, accumulate):
    """Run ``accumulate(part)`` on the rows ``index`` of ``out``: in place where they are contiguous, else on a
    gathered copy written back."""
    if index[-1] - index[0] + 1 == len(index):
        accumulate(out[index[0] : index[-1] + 1])
    else:
        part = out[backend.asarray(index, np.int64)]
        accumulate(part)
        out[backend.asarray(index, np.int64)] = part


def _depthwise(backend, out, flat, weight, group_of_row, step, shape, dtype, workspace):
    """One input channel per group (depthwise convs, pooling): scaled shifted copies, the rows split over the cores,
    each tap's scaled copy made a few rows at a time (``backend.piece_bytes``)."""
    xp = backend.xp
    c_img, ry, rx = shape
    source = flat.reshape(-1, c_img, ry, rx)
    rows = len(group_of_row)
    w = backend.asarray(weight[:, 0], dtype)  # [rows, ky, kx]
    taps = [(i * step[0], j * step[1], i, j) for i in range(weight.shape[2]) for j in range(weight.shape[3])]
    in_order = rows == source.shape[0] and bool((group_of_row == np.arange(rows)).all())
    index = None if in_order else backend.asarray(group_of_row, np.int64)
    few = max(1, backend.piece_bytes // max(1, flat.shape[1] * np.dtype(dtype).itemsize))
    factors = two_pass_factors(weight[:, 0])
    if factors is not None:  # a pooling window's are ones along x and one value along y: plain adds, scaled once
        plain = (bool(np.all(factors[0] == factors[0][:, :1])), bool(np.all(factors[1] == 1)))
        down, across = (backend.asarray(f, dtype) for f in factors)

    def part(a, b):
        for r0 in range(a, b, few):
            r1 = min(b, r0 + few)
            src = source[r0:r1] if index is None else source[index[r0:r1]]
            scaled = workspace.take("depthwise", src.shape, dtype)
            if factors is not None:
                _separable_taps(xp, out[r0:r1], src, (down[r0:r1], across[r0:r1]), plain, step, scaled, workspace,
                                dtype)
                continue
            for y, x, i, j in taps:
                xp.multiply(w[r0:r1, i, j, None, None, None], src, out=scaled)
                out[r0:r1, :, y : y + ry, x : x + rx] += scaled

    backend.on_cores(part, rows, rows * out[0].size * out.itemsize)


def two_pass_factors(kernels: np.ndarray):
    """``(down, across)`` [rows, k_y] and [rows, k_x] with ``kernels[r] == outer(down[r], across[r])`` for every row
    (to a few units of rounding of its largest tap), where k_y + k_x taps are fewer than k_y * k_x, or None: a
    pooling window is one (uniform), and its taps then compose in k_y + k_x shifted passes instead of k_y * k_x
    (EfficientNet's squeeze-and-excitation averages a 14 x 14 map: 28 passes, not 196)."""
    n, ky, kx = kernels.shape
    if ky + kx >= ky * kx:
        return None
    low, high = kernels.min(axis=(1, 2)), kernels.max(axis=(1, 2))
    if np.all(low == high) and np.all(high != 0):  # uniform (a pooling window, often a broadcast view): no copy
        return np.repeat(high[:, None], ky, axis=1), np.ones((n, kx), high.dtype)
    rows = np.arange(n)
    p, q = np.unravel_index(np.abs(kernels).reshape(n, -1).argmax(axis=1), (ky, kx))
    pivot = kernels[rows, p, q]
    if not np.all(pivot != 0):
        return None
    down, across = kernels[rows, :, q], kernels[rows, p, :] / pivot[:, None]
    error = np.abs(down[:, :, None] * across[:, None, :] - kernels).max(axis=(1, 2))
    eps = np.finfo(kernels.dtype).eps if np.issubdtype(kernels.dtype, np.floating) else 0.0
    return (down, across) if np.all(error <= 4 * eps * np.abs(pivot)) else None


def _separable_taps(xp, out, src, factors, plain, step, scaled, workspace, dtype):
    """``out`` [n, C, Q_y, Q_x] += the taps of rank-one kernels (``two_pass_factors``: ``factors`` on the backend)
    over ``src`` [n, C, R_y, R_x]: the taps along x summed into a temporary as tall as ``src`` and as wide as ``out``,
    then that shifted along y. ``plain``: whether the factors along y are one value a row (the temporary scaled
    once), and along x all ones (plain adds)."""
    (down, across), (even, ones) = factors, plain
    ry, rx = src.shape[2:]
    wide = workspace.take("depthwise_x", (*src.shape[:3], out.shape[3]), dtype)
    wide.fill(0)
    for j in range(across.shape[1]):
        if not ones:
            xp.multiply(across[:, j, None, None, None], src, out=scaled)
        wide[..., j * step[1] : j * step[1] + rx] += src if ones else scaled
    tall = workspace.take("depthwise_y", wide.shape, dtype)
    for i in range(down.shape[1]):
        if i == 0 or not even:
            xp.multiply(down[:, i, None, None, None], wide, out=tall)
        out[:, :, i * step[0] : i * step[0] + ry] += tall


def _conv_reference(backend, d_in, weight, group_of_row, groups, step, out_rf, dtype):
    """Plain loops over (output, input, tap): the definition, kept to test the fast kernel."""
    k, cig, ky, kx = weight.shape
    ry, rx = d_in.shape[2:]
    out = backend.zeros((k, d_in.shape[1], *out_rf), dtype)
    for row in range(k):
        for c in range(cig):
            source = d_in[group_of_row[row] * cig + c]
            for i in range(ky):
                for j in range(kx):
                    y, x = i * step[0], j * step[1]
                    out[row, :, y : y + ry, x : x + rx] += weight[row, c, i, j] * source
    return out
