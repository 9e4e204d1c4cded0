"""The polyphase spectral composition: a convolution's substitution with fewer multiplications.

Substituting a bank ``d`` [C, C_image, R_y, R_x] at taps ``step`` apart is a plain convolution once the fine grid
is split by residue modulo the step (polyphase): each of the ``C_image * S_y * S_x`` phases is a small image of
``ceil(R / S)`` pixels, convolved (full, not valid) with the layer's ``k_y x k_x`` kernel on the coarse grid. By the
convolution theorem that is, at each frequency of a grid large enough not to wrap, one complex product of the
weight spectrum ``[K, C]`` with the phases' spectrum ``[C, phases]``: a GEMM per frequency, three real ones with
Gauss's product. The transforms are GEMMs too (small DFT matrices, one axis at a time), so NumPy and CuPy run the
same code; their matrices also make Gauss's sums and undo them (``PARTS``), so no elementwise pass is left. It is
exact up to rounding (docs/method.md, "Cost"); ``cheaper`` says when it beats the direct (kn2row) composition.
"""

from __future__ import annotations

import functools

import numpy as np

from .backend import COMPOSITION, NumpyBackend, Workspace, equal_chunks

# The cost model, in kn2row-GEMM FLOPs, fitted on this project's 2-core machine (benchmarks/README.md,
# "Composition routes"): the spectral route's many mid-size GEMMs run at ~0.6 of kn2row's one large GEMM, a float
# moved by its strided (interleaving) copies costs ~600 FLOPs' time, one of kn2row's contiguous shifted adds ~150.
GEMM_RATE = 0.6
COPY_FLOPS = 600.0
SHIFT_ADD_FLOPS = 150.0
MARGIN = 0.9  # the spectral route is taken where the model says it saves at least 10%
MIN_PHASES = 64  # fewer phases make per-frequency GEMMs too thin to run at BLAS's rate
MIN_ROWS = 64  # and so do fewer output rows
TEMP_BYTES = NumpyBackend.temp_bytes
ROOM_TEMPS = 4  # the spectra may take this many temporaries (1 GiB on a CPU) where the banks are large
#: the weights' spectra and products made at once (a block of frequencies): 8-16 MiB blocks, in cache, ran VGG19's
#: deepest layer 5% faster than 64 MiB
BLOCK_BYTES = 16 << 20
#: Gauss's product ``(A + iB)(X + iY)``: ``k1 = (A + B) X``, ``k2 = A (Y - X)``, ``k3 = B (X + Y)``, real part
#: ``k1 - k3``, imaginary ``k1 + k2``. The spectra are kept as these three operands, made by the transforms'
#: matrices (a row per operand), and the inverse's matrix takes the three products: the sums and differences, an
#: elementwise pass each over memory, cost a quarter of the products' time otherwise.
PARTS = 3
#: the weights' spectra GEMM's rows are padded with zero rows to a multiple of this: OpenBLAS writes its [3 b, K C]
#: output at 9 GB/s with 15 rows, 16 GB/s with 16 (VGG19's conv5_4 alone: 1.73 -> 1.56 s, median of 5)
ROW_MULTIPLE = 16


@functools.lru_cache(maxsize=64)
def _dft(n: tuple, size: tuple, dtype: str) -> np.ndarray:
    """[3F, n_y*n_x]: the 2-D DFT (half spectrum along x) of an n_y x n_x block zero-padded to ``size`` as Gauss's
    weight operands (``PARTS``), real plus imaginary, real, imaginary parts; F = L_y * (L_x // 2 + 1)."""
    (ny, nx), (ly, lx) = n, size
    fx = lx // 2 + 1
    phase = (np.outer(np.arange(ly), np.arange(ny))[:, None, :, None] / ly
             + np.outer(np.arange(fx), np.arange(nx))[None, :, None, :] / lx).reshape(ly * fx, ny * nx)
    angle = -2 * np.pi * phase
    return np.concatenate([np.cos(angle) + np.sin(angle), np.cos(angle), np.sin(angle)]).astype(dtype)


def _kept(size: tuple) -> tuple[np.ndarray, np.ndarray]:
    """The frequencies (flat, y major) whose products are made, and the others: the phases and the weights are real,
    so along x frequency 0 and, on an even grid, L_x / 2 the spectrum is Hermitian along y (``S[-f_y] =
    conj(S[f_y])``) and the y frequencies over L_y / 2 repeat others (VGG19's deepest layer: 130 of 144)."""
    ly, lx = size
    fx = lx // 2 + 1
    flat = np.arange(ly * fx).reshape(ly, fx)
    repeated = np.zeros((ly, fx), bool)
    repeated[ly // 2 + 1 :, _edges(lx)] = True
    return flat[~repeated], flat[repeated]


@functools.lru_cache(maxsize=64)
def _separable(n: tuple, size: tuple, dtype: str) -> tuple:
    """The 2-D transforms one axis at a time (several times fewer FLOPs than ``_dft``'s dense matrices; the same
    layouts): ``(half, forward, inverse, back, folded)``.

    - ``half`` [2, F_x, n_x]: real and imaginary parts of the DFT along x (half spectrum, F_x = L_x // 2 + 1);
    - ``forward`` [3 L_y, 2 n_y]: the complex DFT along y as a real matrix on (re, im)-stacked rows, its output
      Gauss's operands (``PARTS``) re, im - re, re + im;
    - ``inverse`` [2 L_y, 3 L_y]: the inverse along y of a spectrum given as Gauss's three products (real part
      ``k1 - k3``, imaginary ``k1 + k2``), its output rows ordered (y, re/im);
    - ``back`` [L_x, 2 F_x]: the real inverse along x of a half spectrum (its columns re then im), scaled by
      1 / (L_y L_x); the other half is the first's conjugate, so columns count twice but for x frequency 0 and,
      on an even grid, L_x / 2;
    - ``folded``: ``inverse`` for those two x frequencies, whose y frequencies over L_y / 2 are not made (``_kept``):
      their spectrum is Hermitian along y, so its inverse is real, each y frequency below L_y / 2 counting twice
      for itself and its conjugate (the imaginary rows are zeros).
    """
    (ny, nx), (ly, lx) = n, size
    fx = lx // 2 + 1
    angle = -2 * np.pi * np.outer(np.arange(fx), np.arange(nx)) / lx
    half = np.stack([np.cos(angle), np.sin(angle)])
    theta = -2 * np.pi * np.outer(np.arange(ly), np.arange(ny)) / ly
    a, b = np.cos(theta), np.sin(theta)
    forward = np.block([[a, -b], [b - a, a + b], [a + b, a - b]])
    theta = 2 * np.pi * np.outer(np.arange(ly), np.arange(ly)) / ly
    a, b = np.cos(theta), np.sin(theta)  # real part out: a re - b im; imaginary: b re + a im
    inverse = np.stack([np.concatenate([a - b, -b, -a], axis=1), np.concatenate([a + b, a, -b], axis=1)],
                       axis=1).reshape(2 * ly, PARTS * ly)
    counts = np.where(np.arange(ly) < ly - np.arange(ly), 2.0, 0.0)  # below L_y / 2: itself and its conjugate
    counts[_edges(ly)] = 1.0  # 0 and L_y / 2 are their own conjugates
    folded = inverse.reshape(ly, 2, PARTS, ly) * counts
    folded[:, 1] = 0.0
    twice = np.full(fx, 2.0)
    twice[_edges(lx)] = 1.0
    angle = 2 * np.pi * np.outer(np.arange(lx), np.arange(fx)) / lx
    back = np.concatenate([np.cos(angle) * twice, -np.sin(angle) * twice], axis=1) / (ly * lx)
    return tuple(m.astype(dtype) for m in (half, forward, inverse, back, folded.reshape(2 * ly, PARTS * ly)))


def _grid(shape, kernel, step):
    """Coarse sizes: the phases' extent ``n`` and the full convolution's ``L = n + k - 1``."""
    n = tuple(-(-r // s) for r, s in zip(shape, step))
    return n, tuple(a + k - 1 for a, k in zip(n, kernel))


def _regions(size, step):
    """The fine extent ``size`` as rectangles that split into whole coarse cells: (first coarse index, coarse
    count, phases) per axis (the whole cells, then the cut-off last one), so each is a reshaped view."""
    per_axis = []
    for q, s in zip(size, step):
        whole, rest = divmod(q, s)
        per_axis.append(([(0, whole, s)] if whole else []) + ([(whole, 1, rest)] if rest else []))
    return [(a, b) for a in per_axis[0] for b in per_axis[1]]


def _cells(xp, array, my: int, mx: int):
    """A view of ``array`` [..., m_y * p_y, m_x * p_x] as [..., m_y, p_y, m_x, p_x] (coarse cells of phases): by
    strides, so that writing through it always reaches ``array``."""
    *lead, hy, hx = array.shape
    *lead_strides, sy, sx = array.strides
    return xp.lib.stride_tricks.as_strided(array, (*lead, my, hy // my, mx, hx // mx),
                                           (*lead_strides, sy * (hy // my), sy, sx * (hx // mx), sx))


def flops(rows: int, channels: int, image_channels: int, shape, kernel, step) -> tuple[float, float]:
    """(spectral, kn2row) cost of composing ``rows`` outputs from ``channels`` inputs of fine size ``shape``,
    in kn2row-GEMM FLOPs: the spectral route's GEMMs and transforms plus its transposing copies."""
    (ny, nx), (ly, lx) = _grid(shape, kernel, step)
    phases = image_channels * step[0] * step[1]
    fx = lx // 2 + 1
    products = PARTS * 2 * len(_kept((ly, lx))[0]) * rows * channels * phases
    forward = 2 * (2 * fx * nx * ny + 6 * ly * ny * fx)  # per column: along x (real), then along y (complex)
    inverse = 2 * (6 * ly * ly * fx + 2 * lx * fx * ly)
    transforms = phases * (forward * channels + inverse * rows)
    copies = phases * (ny * nx * channels * 2 + ly * lx * rows)
    spectral = (products + transforms) / GEMM_RATE + copies * COPY_FLOPS
    direct = 2 * rows * channels * kernel[0] * kernel[1] * image_channels * shape[0] * shape[1]
    direct += kernel[0] * kernel[1] * rows * image_channels * shape[0] * shape[1] * SHIFT_ADD_FLOPS
    return spectral, direct


def room(temp_bytes: int, in_bytes: int, out_bytes: int) -> int:
    """The bytes the spectral route's spectra may take: a quarter of the input and output banks (the planner's
    ``MEMORY_MARGIN`` counts a quarter of the banks alive for temporaries) up to ``ROOM_TEMPS`` temporaries, and
    never less than one (what kn2row takes)."""
    return max(temp_bytes, min(ROOM_TEMPS * temp_bytes, (in_bytes + out_bytes) // 4))


def cheaper(rows: int, channels: int, image_channels: int, shape, kernel, step, itemsize: int = 4,
            room_bytes: int | None = None) -> bool:
    """Whether the spectral route should compose this convolution: it saves at least 10% by the cost model, and
    within ``room_bytes`` (default ``room`` of these shapes on a CPU) its per-frequency GEMMs are not thin (at
    least ``MIN_PHASES`` phases, and all rows or ``MIN_ROWS`` of them, at once)."""
    return _saving(rows, channels, image_channels, shape, kernel, step, itemsize, room_bytes) is not None


def charged_flops(rows: int, channels: int, image_channels: int, shape, kernel, step) -> float:
    """The FLOPs a cost estimate charges for this convolution's composition: kn2row's GEMM count, scaled by the
    spectral route's saving where ``cheaper`` takes it (so plans and ``--plan`` times follow the route run)."""
    gemm = 2.0 * rows * channels * kernel[0] * kernel[1] * image_channels * shape[0] * shape[1]
    saving = _saving(rows, channels, image_channels, shape, kernel, step)
    return gemm if saving is None else gemm * saving


def _saving(rows, channels, image_channels, shape, kernel, step, itemsize=4, room_bytes=None) -> float | None:
    """The spectral route's cost over kn2row's where ``cheaper`` takes it, else None."""
    if image_channels * step[0] * step[1] < MIN_PHASES or kernel[0] * kernel[1] < 4:
        return None
    (_, _), (ly, lx) = _grid(shape, kernel, step)
    if room_bytes is None:
        out_shape = [r + (t - 1) * s for r, t, s in zip(shape, kernel, step)]
        room_bytes = room(TEMP_BYTES, channels * image_channels * shape[0] * shape[1] * itemsize,
                          rows * image_channels * out_shape[0] * out_shape[1] * itemsize)
    passes, chunk, _ = _plan(rows, channels, image_channels, step, (ly * (lx // 2 + 1), len(_kept((ly, lx))[0])),
                             itemsize, room_bytes)
    if _phases(passes[0], step[1]) < MIN_PHASES or chunk < min(rows, MIN_ROWS):
        return None
    spectral, direct = flops(rows, channels, image_channels, shape, kernel, step)
    return spectral / direct if spectral < MARGIN * direct else None


def compose(backend, out, source, weight, step, dtype, temp_bytes: int, workspace=None) -> None:
    """``out[k, :, y + i*s_y, x + j*s_x] = sum_c weight[k, c, i, j] * source[c, :, y, x]``, spectrally.

    ``out`` [K, C_image, Q_y, Q_x] holds zeros (a view is fine; Q at least R + (k - 1) * s; written, not added
    to), ``source`` [C, C_image, R_y, R_x], ``weight`` [K, C, k_y, k_x] (NumPy). Memory: the phases' and
    products' spectra stay near ``temp_bytes`` (image channels a few at a time, and rows a few at a time where
    one image channel's do not fit). Temporaries come from ``workspace`` (``backend.Workspace``).
    """
    workspace = workspace or Workspace(backend)
    k, c, ky, kx = weight.shape
    c_img, ry, rx = source.shape[1:]
    sy, sx = step
    (ny, nx), (ly, lx) = _grid((ry, rx), (ky, kx), step)
    name = np.dtype(dtype).name
    transforms = tuple(backend.asarray(m, dtype) for m in _separable((ny, nx), (ly, lx), name))
    fx = lx // 2 + 1
    freqs = ly * fx
    kept, repeated = _kept((ly, lx))
    weights = _dft((ky, kx), (ly, lx), name).reshape(PARTS, freqs, ky * kx)[:, kept]
    weights = backend.asarray(weights.reshape(PARTS * len(kept), ky * kx), dtype)
    itemsize = np.dtype(dtype).itemsize
    tap_major = backend.asarray(np.asarray(weight, dtype).reshape(k * c, ky * kx).T, dtype)  # [taps, K*C]
    size = (min(out.shape[2], ly * sy), min(out.shape[3], lx * sx))
    passes, rows, once = _plan(k, c, c_img, step, (freqs, len(kept)), itemsize, temp_bytes)
    most = max(_phases(pieces, sx) for pieces in passes)  # phases of the thickest pass
    # Two buffers take turns (each step's input is dead once its output is made): the phases' split, spectrum
    # and, with every row at once, the inverse along y in one; the transform along x, the products and the
    # inverse along x in the other. With the weights' operands made once for all passes (``_plan``), or the block
    # of them each pass makes, they are cut from one flat buffer as large as ``temp_bytes``, the same for every
    # layer of a decode (``Workspace.take``'s reserve).
    block = _block(len(kept), rows, c, most, itemsize)
    sizes = [PARTS * freqs * (max(c, k) if rows == k else c) * most, PARTS * freqs * max(c, rows) * most,
             0 if rows == k else 2 * freqs * rows * most,
             PARTS * len(kept) * k * c if once else -(-PARTS * block // ROW_MULTIPLE) * ROW_MULTIPLE * rows * c]
    reserve = temp_bytes + 2 * BLOCK_BYTES  # the passes' buffers, and a block of weights' operands with its pad
    one, other, apart, weights_room = _cut(workspace.take(COMPOSITION, (sum(sizes),), dtype, reserve), sizes)
    made = None  # the weights' operands [PARTS, kept, K, C], where they are made once for every pass
    if once:
        made = backend.matmul(weights, tap_major, out=weights_room.reshape(PARTS * len(kept), k * c))
        made = made.reshape(PARTS, len(kept), k, c)
    for pieces in passes:
        phases = _phases(pieces, sx)
        spectrum = _phase_spectrum(backend, transforms, source, (ny, nx), step, pieces, one, other)
        for k0 in range(0, k, rows):
            n = min(rows, k - k0)
            product = _products(backend, weights, tap_major[:, k0 * c : (k0 + n) * c], spectrum, n, other,
                                (kept, repeated), None if made is None else made[:, :, k0 : k0 + n], weights_room,
                                block)
            along_y = _inverse_y(backend, transforms, product.reshape(PARTS * ly, fx, n * phases),
                                 _part(one if rows == k else apart, (2 * ly, fx, n * phases)), lx)
            along_y = along_y.reshape(ly, 2 * fx, n * phases)  # rows (y, re/im, x frequency)
            full = backend.matmul(transforms[3], along_y, out=_part(other, (ly, lx, n * phases)))
            for (i, p0, pb), piece in zip(pieces, _pieces(full.reshape(ly, lx, n, phases), pieces, sx)):
                _interleave(backend, out[k0 : k0 + n, i, : size[0], : size[1]], piece, step, (p0, pb))


def _edges(size: int) -> list[int]:
    """The frequencies of a real signal of ``size`` points that are their own conjugates: 0 and, on an even grid,
    size / 2 (along x, those whose spectrum is Hermitian along y)."""
    return [0] + ([size // 2] if size % 2 == 0 and size > 1 else [])


def _inverse_y(backend, transforms, product, into, lx: int):
    """The inverse along y [2 L_y, F_x, m] of the products [PARTS L_y, F_x, m], in blocks of x frequencies:
    ``folded`` (``_separable``) for the ``_edges``, whose repeated y frequencies (``_kept``) hold zeros, and
    ``inverse`` for the others."""
    inverse, folded = transforms[2], transforms[4]
    fx = product.shape[1]
    last = fx - 1 if len(_edges(lx)) > 1 else fx  # where L_x / 2, the second edge, begins (none on an odd grid)
    for (a, b), matrix in (((0, 1), folded), ((1, last), inverse), ((last, fx), folded)):
        if b > a:
            backend.matmul(matrix, product[:, a:b].reshape(product.shape[0], -1),
                           out=into[:, a:b].reshape(into.shape[0], -1))
    return into


def _block(kept: int, rows: int, c: int, phases: int, itemsize: int) -> int:
    """The frequencies whose weights' operands are made at once where each pass makes them (``BLOCK_BYTES``)."""
    return max(1, min(kept, BLOCK_BYTES // (PARTS * rows * max(c, phases) * itemsize)))


def _cut(buffer, sizes):
    """Consecutive pieces of a flat buffer, of ``sizes`` elements each."""
    ends = np.cumsum([0, *sizes])
    return [buffer[a:b] for a, b in zip(ends[:-1], ends[1:])]


def _part(buffer, shape):
    """The first ``prod(shape)`` elements of a flat buffer, as an array of ``shape``."""
    return buffer[: int(np.prod(shape))].reshape(shape)


def _plan(k: int, c: int, c_img: int, step, freqs: tuple[int, int], itemsize: int, temp_bytes: int):
    """``_passes``'s cut and whether the weights' operands of every kept frequency are made once for all passes
    (``freqs``: all and kept) rather than remade by each, a block at a time: where they take at most half of
    ``temp_bytes`` and the passes' share left cuts them no finer (VGG19's conv5_4 alone, 6 passes, with a room
    for its 408 MB: 2.2 -> 1.8 s; a larger room costs more than that in a whole decode, see docs/method.md)."""
    per_phase, made = PARTS * freqs[0] * itemsize, PARTS * freqs[1] * k * c * itemsize
    each = _passes(k, c, c_img, step, per_phase, temp_bytes)
    if made <= temp_bytes // 2:
        once = _passes(k, c, c_img, step, per_phase, temp_bytes - made)
        if len(once[0]) <= len(each[0]) and once[1] == each[1]:
            return *once, True
    return *each, False


def _passes(k: int, c: int, c_img: int, step, per_phase: int, temp_bytes: int):
    """How the phases are cut to fit ``temp_bytes``: the passes, each a list of pieces ``(image channel, first
    residue row, residue rows)``, and the output rows per product. ``per_phase``: the bytes of one channel's or
    row's spectrum of one phase; ``compose``'s two buffers hold the larger of the channels and the rows each. Whole
    image channels with every row where they fit, else blocks of residue rows of one image channel, or where that
    takes fewer passes the residue rows of all image channels in one sequence cut in equal passes (a pass may end
    one channel and start the next: VGG19's conv5_3 runs 4 passes of 12 rows where blocks of 8 within a channel ran
    6, 1.64 -> 1.53 s alone; at an equal count the blocks' copies are faster), else one residue row a pass and the
    rows a few at a time (their inverse along y in a third buffer)."""
    sy, sx = step
    fit = temp_bytes // (2 * max(c, k) * per_phase)  # phases that fit with every row
    if fit >= sy * sx:  # whole image channels
        cc = equal_chunks(c_img, fit // (sy * sx))
        passes = [[(i, 0, sy) for i in range(c0, min(c0 + cc, c_img))] for c0 in range(0, c_img, cc)]
    else:  # blocks of residue rows within an image channel
        pb = equal_chunks(sy, max(1, fit // sx))
        passes = [[(i, p0, min(pb, sy - p0))] for i in range(c_img) for p0 in range(0, sy, pb)]
    total = c_img * sy  # or the residue rows of all image channels in one sequence, where that takes fewer passes
    per = equal_chunks(total, max(1, fit // sx))
    if -(-total // per) < len(passes):
        passes = [[(i, max(a, i * sy) - i * sy, min(a + per, total, (i + 1) * sy) - max(a, i * sy))
                   for i in range(a // sy, -(-min(a + per, total) // sy))] for a in range(0, total, per)]
    if fit >= sx:
        return passes, k
    x = per_phase * sx
    rows = (temp_bytes - c * x) // (2 * x)  # the spectrum (c), the products and their inverse along y (rows each)
    if rows < c:  # the products' buffer holds the transform along x (c) first
        rows = (temp_bytes - 2 * c * x) // x
    return passes, equal_chunks(k, max(1, min(k, rows)))


def _phases(pieces, sx: int) -> int:
    """The phases of a pass (``_passes``): its pieces' residue rows, ``sx`` residue columns each."""
    return sum(pb for _, _, pb in pieces) * sx


def _pieces(array, pieces, sx: int):
    """Views of ``array`` [..., phases] as [..., residue rows, residue columns], one per piece of a pass (``_passes``:
    its phases are the pieces' one after the other)."""
    views, first = [], 0
    for _, _, pb in pieces:
        views.append(array[..., first : first + pb * sx].reshape(*array.shape[:-1], pb, sx))
        first += pb * sx
    return views


def _phase_spectrum(backend, transforms, source, n, step, pieces, into, scratch):
    """[PARTS, F, C, phases]: the spectrum (Gauss's operands) of the phases of ``source`` [C, C_image, R_y, R_x]
    (fine grid split by residue modulo ``step``) in a pass's ``pieces`` (``_passes``: image channel, first residue
    row, residue rows); phases ordered (piece, residue y, residue x). Made in the flat buffer ``into`` (the split
    phases first), through ``scratch``."""
    c, _, ry, rx = source.shape
    (ny, nx), (sy, sx) = n, step
    phases = _phases(pieces, sx)
    split = _part(into, (ny, nx, c, phases))  # [coarse y, coarse x, channel, phase]
    views = _pieces(split, pieces, sx)
    for (_, p0, pb), view in zip(pieces, views):
        if ry % sy and ry % sy < p0 + pb:  # the last coarse row's phases beyond the bank are zeros
            view[-1, :, :, max(0, ry % sy - p0) :] = 0
        if rx % sx:
            view[:, -1, :, :, rx % sx :] = 0

    def part(a, b):  # channels a:b
        for (i, p0, pb), view in zip(pieces, views):
            for (y0, my, py), (x0, mx, px) in _regions((ry, rx), step):
                if py <= p0:
                    continue
                fine = _cells(backend.xp, source[a:b, i, y0 * sy : y0 * sy + my * py, x0 * sx : x0 * sx + mx * px],
                              my, mx)
                pe = min(py, p0 + pb)
                view[y0 : y0 + my, x0 : x0 + mx, a:b, : pe - p0, :px] = fine[:, :, p0:pe].transpose(1, 3, 0, 2, 4)

    backend.on_cores(part, c, split.nbytes)
    half, forward = transforms[:2]
    fx, ly = half.shape[1], forward.shape[0] // PARTS
    columns = c * phases
    along_x = backend.matmul(half[:, None], split.reshape(1, ny, nx, columns),
                             out=_part(scratch, (2, ny, fx, columns)))  # [re/im, y, x frequency]
    spectrum = backend.matmul(forward, along_x.reshape(2 * ny, fx * columns),
                              out=_part(into, (PARTS * ly, fx * columns)))
    return spectrum.reshape(PARTS, ly * fx, c, phases)


def _products(backend, weights, tap_major, spectrum, k, into, frequencies, made, scratch, block):
    """[PARTS, F, K, phases] in the flat buffer ``into``: per kept frequency (``frequencies``: ``_kept``'s kept and
    repeated), Gauss's three real products of the weights' operands [K, C] with the phases' [C, phases], zeros at
    the repeated ones. ``made``: the weights' operands [PARTS, kept, K, C] made once for every pass (``_plan``), or
    None: then they are made here in the flat buffer ``scratch``, ``block`` frequencies at a time, from ``weights``
    [PARTS kept, taps] and ``tap_major``."""
    _, freqs, c, phases = spectrum.shape
    kept, repeated = frequencies
    dtype = spectrum.dtype
    product = _part(into, (PARTS, freqs, k, phases))
    for f in repeated:  # basic indexing: the same on NumPy and CuPy
        product[:, f] = 0
    if made is None:
        w_flat = _part(scratch, (-(-PARTS * block // ROW_MULTIPLE) * ROW_MULTIPLE, k * c))
        pad = backend.zeros((ROW_MULTIPLE, weights.shape[1]), dtype)
    else:
        block = len(kept)
    for f0 in range(0, len(kept), block):
        b = min(block, len(kept) - f0)
        if made is None:
            n = -(-PARTS * b // ROW_MULTIPLE) * ROW_MULTIPLE  # zero rows up to a multiple: OpenBLAS's fast kernels
            rows = backend.xp.concatenate([weights[j * len(kept) + f0 : j * len(kept) + f0 + b] for j in range(PARTS)]
                                          + [pad[: n - PARTS * b]])
            spec = backend.matmul(rows, tap_major, out=w_flat[:n])[: PARTS * b].reshape(PARTS, b, k, c)
        else:
            spec = made[:, f0 : f0 + b]
        for i0, i1 in _runs(kept[f0 : f0 + b]):  # consecutive frequencies: one batched product a part
            f, g = kept[f0 + i0], kept[f0 + i1 - 1] + 1
            for j in range(PARTS):
                backend.matmul(spec[j, i0:i1], spectrum[j, f:g], out=product[j, f:g])
    return product


def _runs(frequencies) -> list[tuple[int, int]]:
    """``(start, stop)`` positions of the runs of consecutive values in ``frequencies`` (increasing)."""
    breaks = [i for i in range(1, len(frequencies)) if frequencies[i] != frequencies[i - 1] + 1]
    return list(zip([0, *breaks], [*breaks, len(frequencies)])) if len(frequencies) else []


def _interleave(backend, target, full, step, residues):
    """``target[k, Y*s_y + p, X*s_x + q] = full[Y, X, k, p - first, q]`` for the residues p in ``residues``
    (first, count): the phases back onto the fine grid, through views of whole coarse cells, the rows k split
    over the cores. Written, not added: a page of fresh zeros that is read before it is written faults twice."""
    sy, sx = step
    p0, pb = residues

    def part(a, b):
        for (y0, my, py), (x0, mx, px) in _regions(target.shape[1:], step):
            if py <= p0:
                continue
            pe = min(py, p0 + pb)
            view = _cells(backend.xp, target[a:b, y0 * sy : y0 * sy + my * py, x0 * sx : x0 * sx + mx * px], my,
                          mx)
            view[:, :, p0:pe] = full[y0 : y0 + my, x0 : x0 + mx, a:b, : pe - p0, :px].transpose(2, 0, 3, 1, 4)

    backend.on_cores(part, target.shape[0], target.size * target.itemsize)
