"""The transposed window kernels of the backward passes: a convolution's input gradient (the transposed
convolution), a transposed convolution's (a correlation), and pooling's switches and scattered sums.

They sit beside the engine's forward kernels and run on NumPy or CuPy arrays (``array_module``); the op classes
of ``compose/ops`` call them from their backward readings.
"""

from __future__ import annotations

import numpy as np

from ..graph.geometry import Window
from .backend import array_module

TEMP_BYTES = 256 << 20  # bound on the tap products one GEMM of ``transposed`` makes


CACHE_BYTES = 2 << 20  # the tap products ``transposed`` keeps in a core's L2 cache between its GEMM and adds


def window_counts(window: Window, in_size, out_size, include_pad: bool) -> np.ndarray:
    """[Q_y, Q_x]: how many taps of each window an average divides by (those inside the input, or inside the
    padded input with ``include_pad``; a ceil_mode window's taps beyond the end pad never count)."""
    per_axis = []
    for n, q, k, s, d, b, e in zip(in_size, out_size, window.kernel, window.strides, window.dilations, window.begin,
                                   window.end):
        lo, hi = (-b, n + e) if include_pad else (0, n)
        taps = np.arange(q)[:, None] * s - b + np.arange(k)[None, :] * d
        per_axis.append(((taps >= lo) & (taps < hi)).sum(axis=1))
    return np.maximum(np.outer(*per_axis), 1)


def padded_size(size, window: Window, out_size) -> tuple[int, int]:
    """The padded input extent (per axis) that holds every window of the output, ceil_mode's extra ones included."""
    return tuple(max(n + b + e, span + s * (q - 1))
                 for n, b, e, span, s, q in zip(size, window.begin, window.end, window.span, window.strides, out_size))


def tap(array, i, j, window: Window, out_size):
    """The strided view [.., Qh, Qw] of a padded ``array`` that kernel tap (i, j) of every window reads."""
    (dy, dx), (sy, sx) = window.dilations, window.strides
    y, x = i * dy, j * dx
    return array[..., y : y + sy * (out_size[0] - 1) + 1 : sy, x : x + sx * (out_size[1] - 1) + 1 : sx]


def tiles(window: Window, size, out_size) -> bool:
    """Whether the windows tile the input exactly: stride = kernel, no dilation, no padding, no input left over."""
    return (window.strides == window.kernel and window.dilations == (1, 1) and not any(window.begin)
            and all(q * k == n for q, k, n in zip(out_size, window.kernel, size)))


def zeros_as(grad, shape):
    """Zeros [M, C, ...] laid out in memory as ``grad`` is (channel-major after a GEMM, ``transposed``), so that
    elementwise passes between the two walk both in memory order."""
    xp = array_module(grad)
    if grad.ndim == 4 and grad.strides[1] > grad.strides[0]:
        return xp.zeros((shape[1], shape[0], *shape[2:]), grad.dtype).transpose(1, 0, 2, 3)
    return xp.zeros(shape, grad.dtype)


def transposed(grad, w, groups, window: Window, x_shape):
    """The gradient of a (grouped) convolution with ``w`` with respect to its input: the transposed convolution.

    Per group and run of instances, one GEMM over their positions and every kernel tap
    (``[taps*C_in/g, K/g] x [K/g, m*Q]``: per instance alone the products would be too small for BLAS; the run
    is as long as keeps its products in a core's L2 cache, ``CACHE_BYTES``: on 224-px maps twice as fast as all
    at once, on the demo's cones 1.3-1.6x faster than runs of 8 MB); each tap's product is then added at its
    strided place. The work runs channel-major ([C, M, H, W] in memory) and the result is that memory seen as
    [M, C, H, W]: the next convolution's GEMM reads it without a copy, and elementwise rules keep its layout.
    Depthwise windows (pooling) are scaled strided adds.
    """
    kernel, begin = window.kernel, window.begin
    xp = array_module(grad)
    m, c_in, h, wd = x_shape
    qh, qw = grad.shape[2:]
    k_out, cig = w.shape[:2]
    kog = k_out // groups
    taps = [(i, j) for i in range(kernel[0]) for j in range(kernel[1])]
    if cig == 1 and kog == 1 and tiles(window, (h, wd), (qh, qw)):  # windows side by side: one broadcast product
        tiled = grad[:, :, :, None, :, None] * w[None, :, 0, None, :, None, :]  # [M, C, Q_y, k_y, Q_x, k_x]
        return tiled.reshape(x_shape)
    if cig == 1 and kog == 1:
        size = padded_size((h, wd), window, (qh, qw))
        padded = zeros_as(grad, (m, c_in, *size))
        one = w.ravel()[0]
        if bool((w == one).all()):  # pooling, one weight for every tap: spread along x, then whole rows along y
            (sy, sx), (dy, dx) = window.strides, window.dilations
            rows = zeros_as(grad, (m, c_in, qh, size[1]))
            scaled = grad if one == 1 else grad * one
            for j in range(kernel[1]):
                rows[..., j * dx : j * dx + sx * (qw - 1) + 1 : sx] += scaled
            for i in range(kernel[0]):
                padded[:, :, i * dy : i * dy + sy * (qh - 1) + 1 : sy] += rows
        else:
            for i, j in taps:
                tap(padded, i, j, window, (qh, qw))[...] += grad * w[None, :, 0, i, j, None, None]
        return padded[:, :, begin[0] : begin[0] + h, begin[1] : begin[1] + wd]
    pointwise = (len(taps) == 1 and groups == 1 and window.strides == (1, 1) and (qh, qw) == (h, wd)
                 and tuple(begin) == (0, 0))
    if not pointwise and window.strides == (1, 1) and kog < cig:
        return transposed_gather(grad, w, groups, window, x_shape, taps)
    padded = None if pointwise else xp.zeros((c_in, m, *padded_size((h, wd), window, (qh, qw))), grad.dtype)
    q = qh * qw
    images = max(1, CACHE_BYTES // max(1, len(taps) * cig * q * grad.itemsize))  # per GEMM, its products in cache
    block = max(1, TEMP_BYTES // max(1, cig * min(images, m) * q * grad.itemsize))
    for g in range(groups):
        gout = xp.ascontiguousarray(grad[:, g * kog : (g + 1) * kog].transpose(1, 0, 2, 3)).reshape(kog, -1)
        wg = w[g * kog : (g + 1) * kog]
        if pointwise:  # a 1x1 convolution: the product is the gradient
            return xp.matmul(wg[:, :, 0, 0].T, gout).reshape(c_in, m, h, wd).transpose(1, 0, 2, 3)
        target = padded[g * cig : (g + 1) * cig]
        blocks = [taps[start : start + block] for start in range(0, len(taps), block)]
        lefts = [(chosen, xp.concatenate([wg[:, :, i, j].T for i, j in chosen])) for chosen in blocks]
        for m0 in range(0, m, images):
            m1 = min(m, m0 + images)
            part = target[:, m0:m1]
            for chosen, left in lefts:
                contrib = xp.matmul(left, gout[:, m0 * q : m1 * q]).reshape(len(chosen), cig, m1 - m0, qh, qw)
                for t, (i, j) in enumerate(chosen):
                    tap(part, i, j, window, (qh, qw))[...] += contrib[t]
    if padded is None:
        padded = xp.zeros((c_in, m, h, wd), grad.dtype)
    return padded[:, :, begin[0] : begin[0] + h, begin[1] : begin[1] + wd].transpose(1, 0, 2, 3)


def transposed_gather(grad, w, groups, window: Window, x_shape, taps):
    """``transposed`` for stride 1 when a layer widens (K/g < C_in/g, e.g. DenseNet's 3x3 convs): each input
    position gathers its taps from the zero-padded gradient, ``dx[u] = sum_t w[t] g[u + begin - t*d]``, one GEMM
    ``[C_in/g, taps*K/g] x [taps*K/g, M*H*W]`` per block of taps on shifted views of the (narrower) gradient,
    instead of a product per tap the width of the input scattered back with strided adds."""
    xp = array_module(grad)
    m, c_in, h, wd = x_shape
    qh, qw = grad.shape[2:]
    k_out, cig = w.shape[:2]
    kog = k_out // groups
    (sy, sx), (by, bx), (dy, dx) = window.span, window.begin, window.dilations
    out = xp.empty((c_in, m, h, wd), grad.dtype)
    block = max(1, TEMP_BYTES // max(1, kog * m * h * wd * grad.itemsize))
    for g in range(groups):
        gpad = xp.zeros((kog, m, sy - 1 + max(qh, h + by), sx - 1 + max(qw, wd + bx)), grad.dtype)
        gpad[:, :, sy - 1 : sy - 1 + qh, sx - 1 : sx - 1 + qw] = grad[:, g * kog : (g + 1) * kog].transpose(1, 0, 2, 3)
        wg, target = w[g * kog : (g + 1) * kog], out[g * cig : (g + 1) * cig].reshape(cig, -1)
        for start in range(0, len(taps), block):
            chosen = taps[start : start + block]
            views = [gpad[:, :, by + sy - 1 - i * dy : by + sy - 1 - i * dy + h,
                          bx + sx - 1 - j * dx : bx + sx - 1 - j * dx + wd] for i, j in chosen]
            right = xp.stack(views).reshape(len(chosen) * kog, -1)  # [taps*K/g, M*H*W]
            left = xp.concatenate([wg[:, :, i, j].T for i, j in chosen], axis=1)  # [C_in/g, taps*K/g]
            if start == 0:
                xp.matmul(left, right, out=target)
            else:
                target += xp.matmul(left, right)
    return out.transpose(1, 0, 2, 3)


def transposed_window(attrs: dict, in_size, out_size, kernel) -> Window:
    """A ConvTranspose's window as seen from its output: input position i, tap t writes output i*s - p + t*d. The
    leading pad p is ``pads`` or, with ``output_shape`` or ``auto_pad`` SAME_*, the total padding
    ``(n_in - 1)*s + output_padding + (k - 1)*d + 1 - n_out`` split as onnxruntime does (the larger half last for
    SAME_UPPER, first otherwise)."""
    kernel = tuple(int(k) for k in kernel)
    strides, dilations = tuple(attrs.get("strides", (1, 1))), tuple(attrs.get("dilations", (1, 1)))
    extra = tuple(attrs.get("output_padding", (0, 0)))
    auto_pad = attrs.get("auto_pad", "NOTSET")
    pads = tuple(attrs.get("pads", (0, 0, 0, 0)))
    begin = tuple(int(p) for p in pads[:2])
    if "output_shape" in attrs or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        total = [max(0, (n - 1) * s + op + (k - 1) * d + 1 - q)
                 for n, s, op, k, d, q in zip(in_size, strides, extra, kernel, dilations, out_size)]
        begin = tuple(t // 2 if auto_pad == "SAME_UPPER" else t - t // 2 for t in total)
    elif auto_pad == "VALID":
        begin = (0, 0)
    end = tuple(max(0, (n - 1) * s + (k - 1) * d + 1 - b - q)
                for n, s, k, d, b, q in zip(in_size, strides, kernel, dilations, begin, out_size))
    return Window(kernel, strides, dilations, begin, end)


def correlated(grad, w, groups, window: Window, out_size):
    """``out[m, c, i, j] = sum_{o, ki, kj} w[c, o, ki, kj] * grad_pad[m, o, i*s + ki*d, j*s + kj*d]``: the
    convolution (no flip) of ``grad`` [M, K, Q_y, Q_x], padded by ``window.begin``/``end``, with ``w``
    [C, K/g, k_y, k_x]; one GEMM per group and block of taps over all instances and positions."""
    xp = array_module(grad)
    m, k_out, qh, qw = grad.shape
    begin = window.begin
    size = [max(b + q + e, s * (n - 1) + span)
            for b, q, e, s, n, span in zip(begin, (qh, qw), window.end, window.strides, out_size, window.span)]
    padded = xp.zeros((m, k_out, *size), grad.dtype)
    padded[:, :, begin[0] : begin[0] + qh, begin[1] : begin[1] + qw] = grad
    c, kog = w.shape[:2]
    cig = c // groups
    taps = [(i, j) for i in range(window.kernel[0]) for j in range(window.kernel[1])]
    result = xp.zeros((m, c, *out_size), grad.dtype)
    block = max(1, TEMP_BYTES // max(1, kog * m * out_size[0] * out_size[1] * grad.itemsize))
    for g in range(groups):
        source = padded[:, g * kog : (g + 1) * kog]
        wg = w[g * cig : (g + 1) * cig]
        total = 0
        for start in range(0, len(taps), block):
            chosen = taps[start : start + block]
            cols = xp.concatenate([tap(source, i, j, window, out_size).transpose(1, 0, 2, 3).reshape(kog, -1)
                                   for i, j in chosen])  # [taps*K/g, M*H*W]
            left = xp.concatenate([wg[:, :, i, j] for i, j in chosen], axis=1)  # [C/g, taps*K/g]
            total = total + xp.matmul(left, cols)
        result[:, g * cig : (g + 1) * cig] = total.reshape(cig, m, *out_size).transpose(1, 0, 2, 3)
    return result


def scatter_sum(index, weights, size: int):
    """[size] of ``weights`` summed at their flat ``index`` (repeats add up), in the weights' dtype: ``add.at``
    on NumPy (float32 stays float32, three times as fast as ``bincount``'s float64), ``bincount`` on CuPy."""
    xp = array_module(weights)
    if xp is not np:
        return xp.bincount(index.reshape(-1), weights=weights.reshape(-1), minlength=size).astype(weights.dtype)
    total = np.zeros(size, weights.dtype)
    np.add.at(total, index.reshape(-1), weights.reshape(-1))
    return total


def maxpool_switches(x, out, window: Window):
    """[B, C, Q_y, Q_x]: the flat index, in the padded input plane (``padded_size``), of each window's first
    maximum (onnxruntime's switch: the first tap equal to the output), tap by tap through strided views."""
    xp = array_module(x)
    (h, w), (qh, qw), begin = x.shape[2:], out.shape[2:], window.begin
    size = padded_size((h, w), window, (qh, qw))
    padded = xp.full((len(x), x.shape[1], *size), -np.inf, x.dtype)
    padded[:, :, begin[0] : begin[0] + h, begin[1] : begin[1] + w] = x
    flat = xp.arange(size[0] * size[1]).reshape(size)
    switch = xp.full(out.shape, -1, np.int64)
    for i in range(window.kernel[0]):
        for j in range(window.kernel[1]):
            hit = (tap(padded, i, j, window, (qh, qw)) == out) & (switch < 0)  # ties: the first maximum only
            switch = xp.where(hit, tap(flat, i, j, window, (qh, qw)), switch)
    return xp.maximum(switch, 0)  # none only where no gradient flows (a NaN window)
