"""Fidelity: how well a decoded filter predicts its neuron on held-out images.

For each neuron, the prediction at every output position is ``sum(filter * patch) + bias`` with
the patch cut from the zero-extended image (as the layer's padding sees it). Two figures:
the Pearson correlation of prediction and true activation over all (image, position) pairs,
and the share of the true top-N images (each image scored by its maximum, as ``capture_top``
does by default) that the prediction also ranks in its top-N.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ._backend import NumpyBackend, resolve_device
from ._capture import Forward
from ._errors import FdsubError


def predict(decoded, images: np.ndarray, out_size) -> np.ndarray:
    """``sum(filters[k] * patch(q)) + bias[k]`` at every output position: float64 [B, K, Q_y, Q_x]."""
    (ry, rx), (sy, sx), (oy, ox) = decoded.receptive_field, decoded.stride, decoded.origin
    qy, qx = out_size
    before = (max(0, -oy), max(0, -ox))
    after = (max(0, oy + (qy - 1) * sy + ry - images.shape[2]), max(0, ox + (qx - 1) * sx + rx - images.shape[3]))
    padded = np.pad(np.asarray(images, np.float64), ((0, 0), (0, 0), (before[0], after[0]), (before[1], after[1])))
    y0, x0 = oy + before[0], ox + before[1]
    windows = sliding_window_view(padded, (ry, rx), axis=(2, 3))[:, :, y0 : y0 + (qy - 1) * sy + 1 : sy,
                                                                  x0 : x0 + (qx - 1) * sx + 1 : sx]
    filters = np.asarray(decoded.filters, np.float64)
    out = np.empty((len(images), qy, qx, len(filters)))
    # tensordot copies the windows it reads: a few output rows at a time keep that copy near temp_bytes
    # (one row of a deep VGG layer's 252x252 windows is already ~100 MB for 16 images)
    rows = max(1, NumpyBackend.temp_bytes // max(windows[:, :, :1].size * 8, 1))
    for start in range(0, qy, rows):
        out[:, start : start + rows] = np.tensordot(windows[:, :, start : start + rows], filters,
                                                    axes=([1, 4, 5], [1, 2, 3]))  # [B, rows, Q_x, K]
    return out.transpose(0, 3, 1, 2) + np.asarray(decoded.bias, np.float64)[None, :, None, None]


def fidelity(model, decodings: dict, images, top: int = 100, batch_size: int = 16, progress=None, device="cpu") -> dict:
    """Per decoding (name -> Decoded of one layer, same neurons): correlation and top-N share per neuron."""
    if not decodings:
        raise FdsubError("no decodings to measure")
    first = next(iter(decodings.values()))
    layer, neurons = first.layer, np.asarray(first.neurons)
    for name, decoded in decodings.items():
        if decoded.layer != layer or not np.array_equal(decoded.neurons, neurons):
            raise FdsubError(f"decoding {name!r} is of layer {decoded.layer!r} / other neurons; measure one layer at a time")
    shape = model.shapes[layer]
    run = Forward(model, [layer], device)
    out_size = tuple(shape[2:4]) if len(shape) == 4 else (1, 1)
    moments = {name: np.zeros((5, len(neurons))) for name in decodings}  # sums of x, y, xx, yy, xy
    truth_max, pred_max = [], {name: [] for name in decodings}
    count = 0
    for done, (_, batch) in enumerate(images.batches(batch_size)):
        acts = np.asarray(run(batch)[layer], np.float64).reshape(len(batch), shape[1], -1)[:, neurons]
        truth_max.append(acts.max(axis=2))
        for name, decoded in decodings.items():
            pred = predict(decoded, batch, out_size).reshape(len(batch), len(neurons), -1)
            pred_max[name].append(pred.max(axis=2))
            moments[name] += [pred.sum((0, 2)), acts.sum((0, 2)), (pred**2).sum((0, 2)), (acts**2).sum((0, 2)),
                              (pred * acts).sum((0, 2))]
        count += acts.shape[0] * acts.shape[2]
        if progress is not None:
            progress(min((done + 1) * batch_size, len(images)), len(images))
    truth = np.concatenate(truth_max)
    n = min(top, len(truth))
    true_top = _top_sets(truth, n)
    result = {"layer": layer, "neurons": neurons.tolist(), "images": len(truth), "top": n, "decodings": {}}
    for name in decodings:
        sx, sy, sxx, syy, sxy = moments[name]
        cov, vx, vy = sxy - sx * sy / count, sxx - sx**2 / count, syy - sy**2 / count
        with np.errstate(invalid="ignore", divide="ignore"):
            r = np.where((vx > 0) & (vy > 0), cov / np.sqrt(vx * vy), np.nan)
        pred_top = _top_sets(np.concatenate(pred_max[name]), n)
        share = [len(a & b) / n for a, b in zip(true_top, pred_top)]
        result["decodings"][name] = {"correlation": [None if np.isnan(v) else float(v) for v in r], "top_share": share,
                                     "mean_correlation": _mean(r), "mean_top_share": float(np.mean(share))}
    return result


def _top_sets(scores: np.ndarray, n: int) -> list[set]:
    """Per neuron (column), the set of the ``n`` best image indices (ties: lower index first)."""
    order = np.argsort(-scores, axis=0, kind="stable")[:n]
    return [set(order[:, k].tolist()) for k in range(scores.shape[1])]


def _mean(values) -> float | None:
    values = np.asarray(values, np.float64)
    return None if np.isnan(values).all() else float(np.nanmean(values))


FIDELITY_MODES = ("weights", "fds", "local", "deconvnet", "nf")


def compare_modes(model, layer: str, images, holdout, modes=FIDELITY_MODES, top: int = 100, neurons=None,
                  progress=None, device="cpu") -> dict:
    """Decode ``neurons`` of ``layer`` in each mode (data modes from ``images``' top-N), then measure on ``holdout``."""
    from ._capture import capture_top, rows_of
    from ._decode import decode, find_layer
    from ._local import decode_instances
    from ._nf import neuron_feature

    unknown = [m for m in modes if m not in FIDELITY_MODES]
    if unknown or not modes:
        raise FdsubError(f"unknown mode {unknown[0] if unknown else ''!r}; choose from {', '.join(FIDELITY_MODES)}")
    target = find_layer(model, layer).output[0]
    device = resolve_device(device)
    found = capture_top(model, target, images, top=top, neurons=neurons, device=device) if set(modes) - {"weights"} else None
    picked = found.neurons if found is not None else neurons
    decodings = {}
    for step, mode in enumerate(modes):
        if progress is not None:
            progress(step, len(modes) + 1)
        if mode == "weights":
            decodings[mode] = decode(model, target, neurons=picked, device=device)
        elif mode == "fds":
            decodings[mode] = decode(model, target, neurons=picked, mode="fds", images=images, top=top, device=device)
        elif mode == "nf":
            decodings[mode] = neuron_feature(model, found, images)
        else:
            decodings[mode] = decode_instances(model, target, images, rule=mode, instances=rows_of(found, picked), device=device)
    result = fidelity(model, decodings, holdout, top=top, device=device)
    if progress is not None:
        progress(len(modes) + 1, len(modes) + 1)
    return result
