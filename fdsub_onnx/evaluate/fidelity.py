"""Fidelity: how well a decoded filter predicts its neuron on held-out images.

For each neuron, the prediction at every output position is ``sum(filter * patch) + bias`` with
the patch cut from the zero-extended image (as the layer's padding sees it). Two figures:
the Pearson correlation of prediction and true activation over all (image, position) pairs,
and the share of the true top-N images (each image scored by its maximum, as ``capture_top``
does by default) that the prediction also ranks in its top-N.
"""

from __future__ import annotations

import numpy as np

from ..defaults import FIDELITY_MODES as FIDELITY_MODES  # its home was here; importers keep it
from ..errors import FdsubError
from ..runtime.session import Forward
from .predict import predict


def fidelity(model, decodings: dict, images, top: int = 100, batch_size: int = 16, progress=None, device="cpu") -> dict:
    """Per decoding (name -> Decoded of one layer, same neurons): correlation and top-N share per neuron."""
    if not decodings:
        raise FdsubError("no decodings to measure")
    first = next(iter(decodings.values()))
    layer, neurons = first.layer, np.asarray(first.neurons)
    for name, decoded in decodings.items():
        if decoded.layer != layer or not np.array_equal(decoded.neurons, neurons):
            raise FdsubError(f"decoding {name!r} is of layer {decoded.layer!r} / other neurons; "
                             "measure one layer at a time")
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


