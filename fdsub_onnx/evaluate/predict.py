"""The one prediction routine: a decoded filter's response ``sum(filter * patch) + bias`` at output positions.

Patches are cut from the zero-extended image, as the layer's padding sees it; for an output position whose
receptive field lies inside the image this is exactly the identity of ``Decoded``'s docstring.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..compose.backend import NumpyBackend


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
    before = (max(0, -oy), max(0, -ox))
    after = (max(0, oy + (qy - 1) * sy + ry - images.shape[2]), max(0, ox + (qx - 1) * sx + rx - images.shape[3]))
    padded = np.pad(np.asarray(images, np.float64), ((0, 0), (0, 0), (before[0], after[0]), (before[1], after[1])))
    y0, x0 = oy + before[0], ox + before[1]
    windows = sliding_window_view(padded, (ry, rx), axis=(2, 3))[:, :, y0 : y0 + (qy - 1) * sy + 1 : sy,
                                                                  x0 : x0 + (qx - 1) * sx + 1 : sx]
    filters = np.asarray(decoded.filters, np.float64)
    bias = np.asarray(decoded.bias, np.float64)
    if mask is not None:
        ys, xs = np.nonzero(mask)
        values = np.tensordot(windows[:, :, ys, xs], filters, axes=([1, 3, 4], [1, 2, 3]))  # [B, P, K]
        return values.transpose(0, 2, 1) + bias[None, :, None]
    region = padded[:, :, y0 : y0 + (qy - 1) * sy + ry, x0 : x0 + (qx - 1) * sx + rx]
    if _fft_cheaper(filters.shape, region.shape[2:], (qy, qx)):
        return _correlate_fft(region, filters, (sy, sx), (qy, qx)) + bias[None, :, None, None]
    out = np.empty((len(images), qy, qx, len(filters)))
    # tensordot copies the windows it reads: a few output rows at a time keep that copy near temp_bytes
    # (one row of a deep VGG layer's 252x252 windows is already ~100 MB for 16 images)
    rows = max(1, NumpyBackend.temp_bytes // max(windows[:, :, :1].size * 8, 1))
    for start in range(0, qy, rows):
        out[:, start : start + rows] = np.tensordot(windows[:, :, start : start + rows], filters,
                                                    axes=([1, 4, 5], [1, 2, 3]))  # [B, rows, Q_x, K]
    return out.transpose(0, 3, 1, 2) + bias[None, :, None, None]


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


def prediction_operations(decoded_shape, stride, image_size, out_size) -> float:
    """Operations per image of ``predict`` for filters [K, C, R_y, R_x] at ``stride`` (the path it takes)."""
    region = [(q - 1) * s + r for q, s, r in zip(out_size, stride, decoded_shape[2:])]
    return min(_operations(decoded_shape, region, out_size))


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
    out = np.empty((b, k, qy, qx))
    for i in range(b):
        image = np.fft.rfft2(region[i], s=(ly, lx))  # [C, L_y, L_x / 2 + 1]
        for lo in range(0, k, chunk):
            product = np.einsum("cyx,kcyx->kyx", image, spectra[lo : lo + chunk])
            full = np.fft.irfft2(product, s=(ly, lx))
            out[i, lo : lo + chunk] = full[:, : (qy - 1) * sy + 1 : sy, : (qx - 1) * sx + 1 : sx]
    return out


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
