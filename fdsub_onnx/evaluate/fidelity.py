"""Fidelity: how well a decoded filter predicts its neuron on held-out images.

For each neuron, the prediction at every output position is ``sum(filter * patch) + bias`` with
the patch cut from the zero-extended image (as the layer's padding sees it). Three figures:
the Pearson correlation of prediction and true activation over all (image, position) pairs;
the share of the true top-N images (each image scored by its maximum, as ``capture_top``
does by default) that the prediction also ranks in its top-N; and the two-choice score, the automated
form of Borowski et al.'s psychophysics (ICLR 2021): over every pair of images whose true maxima differ,
the share where the prediction ranks the one with the higher maximum higher (ties count 1/2; chance 0.5).
A degenerate filter (not finite, all zero: ``Decoded.degenerate``) predicts nothing: its neuron is named,
with no score, instead of scoring rounding noise or index tie-breaking.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..compose.backend import usable_cores
from ..compose.inspect import instance_geometry
from ..defaults import FIDELITY_MODES as FIDELITY_MODES  # its home was here; importers keep it
from ..errors import FdsubError
from ..graph.model import as_map, grid
from ..modes.cost import COMPOSE_RATE, Stage, forward_seconds
from ..modes.decode import centre
from ..runtime.cluster import Ordered, map_blocks, merge_ordered
from ..runtime.session import FETCHED_BYTES, Forward, image_bytes, tensor_values
from .predict import predict, prediction_bytes, prediction_operations


def fidelity(model, decodings: dict, images, top: int = 100, batch_size: int = 16, progress=None, device="cpu",
             client=None) -> dict:
    """Per decoding (name -> Decoded of one layer, same neurons): correlation and top-N share per neuron.

    With a Dask ``client`` the images are scored in blocks on the cluster, with the same figures bit for bit.
    """
    return fidelity_of_layers(model, [decodings], images, top, batch_size, progress, device, client)[0]


def fidelity_of_layers(model, layers: list[dict], images, top: int = 100, batch_size: int = 16, progress=None,
                       device="cpu", client=None) -> list[dict]:
    """``fidelity`` of several layers (each a dict of decodings, as ``fidelity`` takes) in one onnxruntime pass
    over the images: reading and running the images once, not once per layer (a report of 6 layers over 1,000
    images spent most of its fidelity time there)."""
    if not layers or not all(layers):
        raise FdsubError("no decodings to measure")
    names, broken, slim = [], [], []
    for decodings in layers:
        first = next(iter(decodings.values()))
        layer, neurons = first.layer, np.asarray(first.neurons)
        for name, decoded in decodings.items():
            if decoded.layer != layer or not np.array_equal(decoded.neurons, neurons):
                raise FdsubError(f"decoding {name!r} is of layer {decoded.layer!r} / other neurons; "
                                 "measure one layer at a time")
        names.append(layer)
        broken.append({name: d.degenerate for name, d in decodings.items()})
        slim.append({name: _scorable(d, broken[-1][name]) for name, d in decodings.items()})  # workers: a copy
    options = {"layers": slim, "batch_size": batch_size}
    done = None if progress is None else lambda at, *_: progress(at, len(images))
    reads = sorted(set(names))
    if client is None:
        part = _score(model, images, Forward(model, reads, device), 0, len(images), **options, progress=done)
    else:
        part = map_blocks(client, _score, model, images, reads, device, 0, len(images), batch_size, _merge_scores,
                          options, progress=done)
    sums, truth_max, pred_max, count = part
    return [_scores(names[i], layers[i], broken[i], sums.total[i], [t[i] for t in truth_max],
                    {name: [p[i][name] for p in pred_max] for name in layers[i]}, int(count[i]), top)
            for i in range(len(layers))]


def _scores(layer, decodings, broken, moments, truth_max, pred_max, count, top) -> dict:
    """One layer's figures from the sums of its pass."""
    neurons = np.asarray(next(iter(decodings.values())).neurons)
    truth = np.concatenate(truth_max)
    n = min(top, len(truth))
    true_top = _top_sets(truth, n)
    result = {"layer": layer, "neurons": neurons.tolist(), "images": len(truth), "top": n, "decodings": {}}
    for name in decodings:
        sx, sy, sxx, syy, sxy = moments[name]
        cov, vx, vy = sxy - sx * sy / count, sxx - sx**2 / count, syy - sy**2 / count
        with np.errstate(invalid="ignore", divide="ignore"):
            r = np.where((vx > 0) & (vy > 0), cov / np.sqrt(vx * vy), np.nan)
        predicted = np.concatenate(pred_max[name])
        share = np.array([len(a & b) / n for a, b in zip(true_top, _top_sets(predicted, n))])
        two = two_choice(truth, predicted)
        bad = np.array([kind is not None for kind in broken[name]], bool)
        r, share, two = (np.where(bad, np.nan, v) for v in (r, share, two))
        result["decodings"][name] = {
            "correlation": _listed(r), "top_share": _listed(share), "two_choice": _listed(two),
            "degenerate": broken[name], "mean_correlation": _mean(r), "mean_top_share": _mean(share),
            "mean_two_choice": _mean(two)}
    return result


def fidelity_stage(model, layers: dict, decodings: int, count: int, batch_size: int = 16) -> Stage:
    """The cost of ``fidelity_of_layers`` (``layers``: target -> neurons scored): ``count`` images through
    onnxruntime once, every decoding's prediction at every position (``predict``, by the path it takes), the
    running moments. The layers' maps of a batch are fetched together; their predictions run one at a time."""
    batch_size = max(1, min(int(batch_size), max(int(count), 1)))  # a batch is never more than the images
    targets = list(layers)
    per_image, operations, held = image_bytes(model, targets) + FETCHED_BYTES * tensor_values(model, targets), 0.0, 0.0
    for target, neurons in layers.items():
        geom = instance_geometry(model, target)
        out_size = grid(model, target) if geom.stride[0] else (1, 1)  # per position: scored at one
        filters = (neurons, int(model.input_shape[1]), *geom.rf)
        stride = tuple(max(s, 1) for s in geom.stride)
        per_image += 8 * 3 * neurons * out_size[0] * out_size[1]  # activations, prediction, their product
        operations += decodings * prediction_operations(filters, stride, model.input_shape[2:], out_size, batch_size)
        held = max(held, prediction_bytes(filters, stride, model.input_shape[2:], out_size, batch_size))
    return Stage(f"fidelity of {len(targets)} layer(s) over {count} images, {decodings} decodings each",
                 batch_size * per_image + held,
                 forward_seconds(model, targets, count) + count * operations / (COMPOSE_RATE * usable_cores()), count)


def two_choice(truth: np.ndarray, predicted: np.ndarray, rows: int = 256) -> np.ndarray:
    """Per neuron (column of [images, K]), the share of image pairs with different true scores that the prediction
    orders the same way (a tie in the prediction counts 1/2); NaN where every true score is the same."""
    won, pairs = np.zeros(truth.shape[1]), np.zeros(truth.shape[1])
    for start in range(0, len(truth), rows):  # tiles of the pair matrix: memory rows x rows, whatever the images
        for col in range(0, len(truth), rows):
            tile = (slice(start, start + rows), slice(col, col + rows))
            tile_won, tile_pairs = _pairs_won(truth[tile[0]], truth[tile[1]], predicted[tile[0]], predicted[tile[1]])
            won += tile_won
            pairs += tile_pairs
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, won / pairs, np.nan)


def _pairs_won(truth_a, truth_b, predicted_a, predicted_b) -> tuple[np.ndarray, np.ndarray]:
    """One tile of the pair matrix: per neuron, the pairs (a, b) with a truly above b that the prediction orders so
    (ties 1/2), and those pairs (a function of its own: a tile's temporaries do not outlive it into the next)."""
    above = truth_a[:, None] > truth_b[None]  # [a, b, K]
    q = predicted_a[:, None] - predicted_b[None]
    return (above & (q > 0)).sum((0, 1)) + 0.5 * (above & (q == 0)).sum((0, 1)), above.sum((0, 1))


def _scorable(decoded, broken: list):
    """What scoring reads: the filters, with zeros (no arithmetic on inf or NaN) where they are degenerate."""
    bad = np.array([kind is not None for kind in broken], bool)
    filters, bias = decoded.filters, decoded.bias
    if bad.any():
        filters = np.where(bad[:, None, None, None], 0, filters).astype(filters.dtype)
        bias = np.where(bad, 0, bias).astype(bias.dtype)
    return dataclasses.replace(decoded, filters=filters, bias=bias, instances=None, instance_filters=None,
                               instance_bias=None)


def _listed(values: np.ndarray) -> list[float | None]:
    return [None if np.isnan(v) else float(v) for v in values]


def _score(model, images, forward, lo, hi, layers, batch_size, progress=None):
    """Images ``lo..hi-1``: per layer (a dict of decodings each), the sums of the moments (in image order), each
    image's maxima per batch, and the (image, position) pairs counted."""
    sums = Ordered(_add_moments, [{name: np.zeros((5, len(d.neurons))) for name, d in decodings.items()}
                                  for decodings in layers] if lo == 0 else None)
    truth_max, pred_max, count = [], [], np.zeros(len(layers), np.int64)  # moments: sums of x, y, xx, yy, xy
    for start, batch in images.batches(batch_size, lo):
        if start >= hi:
            break
        values = forward(batch)
        entries, truths, preds, positions = zip(*[_score_layer(model, values, batch, d) for d in layers])
        sums.add(list(entries))
        truth_max.append(truths)
        pred_max.append(preds)
        count += positions
        if progress is not None:
            progress(start + len(batch))
    return sums, truth_max, pred_max, count


def _score_layer(model, values, batch, decodings) -> tuple:
    """One batch of one layer: each decoding's moment sums, the true and predicted maxima per image, the positions
    counted."""
    first = next(iter(decodings.values()))
    layer, neurons = first.layer, np.asarray(first.neurons)
    maps = as_map(model, layer, np.asarray(values[layer], np.float64))[:, neurons]
    at = scored_position(model, decodings)
    if at is not None:  # a layer decoded per position (tokens, after an upsampling): scored there alone
        maps = maps[:, :, at[0] : at[0] + 1, at[1] : at[1] + 1]
    out_size = maps.shape[2:]
    acts = maps.reshape(len(batch), len(neurons), -1)
    entry, pred_max = {}, {}
    for name, decoded in decodings.items():
        pred = predict(decoded, batch, out_size).reshape(len(batch), len(neurons), -1)
        pred_max[name] = pred.max(axis=2)
        entry[name] = [pred.sum((0, 2)), acts.sum((0, 2)), (pred**2).sum((0, 2)), (acts**2).sum((0, 2)),
                       (pred * acts).sum((0, 2))]
    return entry, acts.max(axis=2), pred_max, acts.shape[0] * acts.shape[2]


def scored_position(model, decodings: dict) -> tuple[int, int] | None:
    """Where a layer decoded per position (its filters' stride 0: tokens, a layer after an upsampling) is scored:
    the position its ``weights``/``fds`` filters were decoded at (the grid's centre by default), the one where
    they hold; None for a feature map, scored at every position."""
    if not any(0 in tuple(d.stride) for d in decodings.values()):
        return None
    given = [tuple(int(v) for v in d.position) for d in decodings.values() if d.position is not None]
    return given[0] if given else centre(model, next(iter(decodings.values())).layer)


def _add_moments(total: list, entry: list) -> list:
    for layer, own in zip(total, entry):
        for name, values in own.items():
            layer[name] += values
    return total


def _merge_scores(parts):
    sums = merge_ordered([p[0] for p in parts])
    return sums, [m for p in parts for m in p[1]], [m for p in parts for m in p[2]], sum(p[3] for p in parts)


def _top_sets(scores: np.ndarray, n: int) -> list[set]:
    """Per neuron (column), the set of the ``n`` best image indices (ties: lower index first)."""
    order = np.argsort(-scores, axis=0, kind="stable")[:n]
    return [set(order[:, k].tolist()) for k in range(scores.shape[1])]


def _mean(values) -> float | None:
    values = np.asarray(values, np.float64)
    return None if np.isnan(values).all() else float(np.nanmean(values))


