"""The one prediction routine: a decoded filter's response ``sum(filter * patch) + bias`` at output positions.

Patches are cut from the zero-extended image, as the layer's padding sees it; for an output position whose
receptive field lies inside the image this is exactly the identity of ``Decoded``'s docstring.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..compose.backend import NumpyBackend, ordered_map


def predict(decoded, images: np.ndarray, out_size, mask: np.ndarray | None = None) -> np.ndarray:
    """float64 [B, K, Q_y, Q_x] at every output position, or [B, K, P] at the P positions of ``mask`` [Q_y, Q_x].

    A stride of 0 (a filter decoded at one position after an upsampling) puts the same window at every position.
    """
    (ry, rx), (sy, sx), (oy, ox) = decoded.receptive_field, decoded.stride, decoded.origin
    if 0 in (sy, sx):
        one = dataclasses.replace(decoded, stride=(1, 1), exact_at="interior")
        values = predict(one, images, (1, 1))
        full = np.broadcast_to(values, (*values.shape[:2], *tuple(out_size)))
        return full[:, :, mask] if mask is not None else full
    qy, qx = out_size
    bias = np.asarray(decoded.bias, np.float64)
    if mask is None and _swap_cheaper(decoded.filters.shape, images.shape, (sy, sx), (qy, qx)):  # reads a cut
        return _predict_swapped(decoded.filters, images, (sy, sx), (oy, ox), (qy, qx)) + bias[None, :, None, None]
    filters = np.asarray(decoded.filters, np.float64)
    before = (max(0, -oy), max(0, -ox))
    after = (max(0, oy + (qy - 1) * sy + ry - images.shape[2]), max(0, ox + (qx - 1) * sx + rx - images.shape[3]))
    padded = np.pad(np.asarray(images, np.float64), ((0, 0), (0, 0), (before[0], after[0]), (before[1], after[1])))
    y0, x0 = oy + before[0], ox + before[1]
    windows = sliding_window_view(padded, (ry, rx), axis=(2, 3))[:, :, y0 : y0 + (qy - 1) * sy + 1 : sy,
                                                                  x0 : x0 + (qx - 1) * sx + 1 : sx]
    if mask is not None:
        ys, xs = np.nonzero(mask)
        values = np.tensordot(windows[:, :, ys, xs], filters, axes=([1, 3, 4], [1, 2, 3]))  # [B, P, K]
        return values.transpose(0, 2, 1) + bias[None, :, None]
    region = padded[:, :, y0 : y0 + (qy - 1) * sy + ry, x0 : x0 + (qx - 1) * sx + rx]
    return _correlate(region, filters, (sy, sx), (qy, qx)) + bias[None, :, None, None]


def _correlate(region: np.ndarray, filters: np.ndarray, stride, out_size) -> np.ndarray:
    """[B, K, Q_y, Q_x]: ``sum(filter * window)`` for the windows of ``region`` [B, C, L_y, L_x] at ``stride``, by
    the windows' products or by the FFT, whichever costs fewer operations."""
    (sy, sx), (qy, qx) = stride, out_size
    if _fft_cheaper(filters.shape, region.shape[2:], out_size):
        return _correlate_fft(region, filters, stride, out_size)
    ry, rx = filters.shape[2:]
    windows = sliding_window_view(region, (ry, rx), axis=(2, 3))[:, :, : (qy - 1) * sy + 1 : sy,
                                                                  : (qx - 1) * sx + 1 : sx]
    out = np.empty((len(region), qy, qx, len(filters)))
    # tensordot copies the windows it reads: a few output rows at a time keep that copy near temp_bytes
    # (one row of a deep VGG layer's 252x252 windows is already ~100 MB for 16 images)
    rows = max(1, NumpyBackend.temp_bytes // max(windows[:, :, :1].size * 8, 1))
    for start in range(0, qy, rows):
        out[:, start : start + rows] = np.tensordot(windows[:, :, start : start + rows], filters,
                                                    axes=([1, 4, 5], [1, 2, 3]))  # [B, rows, Q_x, K]
    return out.transpose(0, 3, 1, 2)


def _predict_swapped(filters: np.ndarray, images: np.ndarray, stride, origin, out_size) -> np.ndarray:
    """[B, K, Q_y, Q_x] with the roles of image and filter swapped: ``sum_p image[p] * filter[p - corner_q]`` is the
    correlation of the filter, cut to the part some window meets inside the image, with the image as its kernel.
    For a field much wider than the image (EfficientNet-Lite2's conv_head at 260 px: 1,115 px) the windows of the
    padded image are mostly zeros; this form reads only the image and that cut of the filter, in float64 (516 px
    per axis there, not 1,339)."""
    (sy, sx), (oy, ox), (qy, qx) = stride, origin, out_size
    h, w = images.shape[2:]
    last = (oy + (qy - 1) * sy, ox + (qx - 1) * sx)  # the last window's corner: its filter index -last meets pixel 0
    region = np.zeros((*filters.shape[:2], h + (qy - 1) * sy, w + (qx - 1) * sx))  # filter index j at j + last
    ry, rx = filters.shape[2:]
    lo = (max(0, -last[0]), max(0, -last[1]))
    hi = (min(ry, region.shape[2] - last[0]), min(rx, region.shape[3] - last[1]))
    if hi[0] > lo[0] and hi[1] > lo[1]:
        region[:, :, lo[0] + last[0] : hi[0] + last[0], lo[1] + last[1] : hi[1] + last[1]] = \
            filters[:, :, lo[0] : hi[0], lo[1] : hi[1]]
    # window i of the region at i * stride is output position Q - 1 - i; the images are the kernels here
    found = _correlate(region, np.asarray(images, np.float64), stride, out_size)  # [K, B, Q_y, Q_x], reversed
    return found.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1]


def _costs(filters_shape, images_shape, stride, out_size) -> tuple[float, float]:
    """Operations of a call of ``predict`` on ``images_shape`` [B, C, H, W]: plain (windows of the padded images)
    and swapped (``_predict_swapped``), each by its cheaper path (windows or FFT)."""
    plain = images_shape[0] * min(_operations(filters_shape, _region(filters_shape[2:], stride, out_size), out_size))
    swapped = filters_shape[0] * min(_operations(images_shape, _region(images_shape[2:], stride, out_size), out_size))
    return plain, swapped


def _swap_cheaper(filters_shape, images_shape, stride, out_size) -> bool:
    """Whether the swapped form (``_predict_swapped``) costs fewer operations than windows of the padded image."""
    plain, swapped = _costs(filters_shape, images_shape, stride, out_size)
    return swapped < plain


def _fft_cheaper(filters_shape, region, out_size) -> bool:
    """Whether the FFT's correlation costs fewer operations than the windows' products."""
    direct, fft = _operations(filters_shape, region, out_size)
    return fft < direct


def _operations(filters_shape, region, out_size) -> tuple[float, float]:
    """Operations per image of the windows' products (and their copies: each pixel is copied into every window that
    covers it, (R/S)^2 of them) and of the FFT's correlation."""
    k, c, ry, rx = filters_shape
    size = region[0] * region[1]
    direct = (k + 1) * c * ry * rx * out_size[0] * out_size[1]
    fft = (c + k) * 5.0 * size * np.log2(max(size, 2)) + 4.0 * k * c * size
    return float(direct), float(fft)


def prediction_operations(decoded_shape, stride, image_size, out_size, batch: int = 16) -> float:
    """Operations per image of ``predict`` for filters [K, C, R_y, R_x] at ``stride`` on ``batch`` images at a time
    (the path it takes)."""
    return min(_costs(decoded_shape, (batch, decoded_shape[1], *image_size), stride, out_size)) / batch


def prediction_bytes(decoded_shape, stride, image_size, out_size, batch: int = 16) -> float:
    """Bytes ``predict`` holds for ``batch`` images (by the path it takes): the images in float64, cut to the
    region the windows cover (padding included) or, swapped, beside the filters cut to theirs; the FFT's spectra
    of whichever is the kernel; the windows' copy (``temp_bytes``)."""
    k, c = decoded_shape[:2]
    images = (batch, c, *image_size)
    if _swap_cheaper(decoded_shape, images, stride, out_size):
        region = _region(image_size, stride, out_size)
        held, kernels, fft = 8 * batch * c * np.prod(image_size) + 8 * k * c * np.prod(region), batch, _fft_cheaper(
            images, region, out_size)
    else:
        region = _region(decoded_shape[2:], stride, out_size)  # and the filters in float64
        held = 8 * batch * c * np.prod(region) + 8 * np.prod(decoded_shape)
        kernels, fft = k, _fft_cheaper(decoded_shape, region, out_size)
    spectra = 8 * kernels * c * np.prod([_fast_length(n) for n in region]) if fft else 0
    temporaries = NumpyBackend.temp_bytes * (NumpyBackend().workers if fft else 1)  # the FFT's: one per core
    return float(held + spectra + temporaries)


def _region(size, stride, out_size) -> list[int]:
    """The extent the windows of ``size`` at ``out_size`` positions ``stride`` apart cover."""
    return [(q - 1) * s + n for q, s, n in zip(out_size, stride, size)]


def _correlate_fft(region: np.ndarray, filters: np.ndarray, stride, out_size) -> np.ndarray:
    """[B, K, Q_y, Q_x]: ``sum(filter * window)`` for windows of ``region`` [B, C, L_y, L_x] at stride ``stride``,
    as circular correlations of the FFT size L (exact where a window does not wrap: every window of the region).
    One image and a few filters at a time, so the spectra stay near ``temp_bytes``."""
    b, c = region.shape[:2]
    ly, lx = (_fast_length(n) for n in region.shape[2:])  # longer is as exact: still no window wraps
    k = len(filters)
    spectra = np.fft.rfft2(filters, s=(ly, lx)).conj()  # [K, C, L_y, L_x / 2 + 1]
    per_filter = 16 * ly * (lx // 2 + 1)
    chunk = int(max(1, NumpyBackend.temp_bytes // max(per_filter, 1) // 2))
    (sy, sx), (qy, qx) = stride, out_size

    def one(i):  # NumPy's FFT runs one thread and releases the GIL: images on every core (1.75x on 2)
        image = np.fft.rfft2(region[i], s=(ly, lx))  # [C, L_y, L_x / 2 + 1]
        found = np.empty((k, qy, qx))
        for lo in range(0, k, chunk):
            product = np.einsum("cyx,kcyx->kyx", image, spectra[lo : lo + chunk])
            full = np.fft.irfft2(product, s=(ly, lx))
            found[lo : lo + chunk] = full[:, : (qy - 1) * sy + 1 : sy, : (qx - 1) * sx + 1 : sx]
        return found

    return np.stack(list(ordered_map(one, range(b), NumpyBackend().workers)))


def _fast_length(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n: a length the FFT takes in few steps (603 = 3^2 * 67 is slow, 625 is not)."""
    best = 2 * n
    five = 1
    while five < best:
        three = five
        while three < best:
            two = three
            while two < n:
                two *= 2
            best = min(best, two)
            three *= 3
        five *= 5
    return best
