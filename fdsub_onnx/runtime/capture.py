"""Capture with onnxruntime: the streaming top-N instances (image, position) of each neuron of a layer.

The instances of a neuron are ranked by one total order: higher activation first, then lower image
index, then lower position (row-major). Top-N under a total order is associative, so batches,
shards and resumed runs all combine exactly into the result of one uninterrupted scan.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import numpy as np

from ..data.topn import TopN, resume, save_checkpoint, short, start_top, union_notes
from ..errors import FdsubError
from ..graph.model import Model, channel_axis, find_layer, grid, to_maps, windows_per_image
from ..neurons import parse_neurons
from . import cluster
from .session import Forward

CHECKPOINT_SECONDS = 2.0  # at most this long between checkpoint writes (and one more on the way out)
_LAST = np.iinfo(np.int64).max  # tie key of an unfilled slot: after every real instance


def capture_top(model: Model, layer: str, images, top: int = 100, neurons=None, per_image: int = 1,
                batch_size: int = 32, shard: tuple[int, int] | None = None,
                checkpoint: str | os.PathLike | None = None, progress=None, device="cpu", client=None) -> TopN:
    """Scan ``images`` with onnxruntime and keep each neuron's ``top`` best instances.

    ``neurons`` is a selector (see ``parse_neurons``). ``per_image`` instances at most per image
    and neuron (default 1: the image's maximum, first position on ties). ``shard=(i, n)`` scans
    only the i-th of n contiguous blocks of images; ``merge_top`` of all n equals one run.
    With ``checkpoint`` the state is saved there as batches complete (and when interrupted); a
    later call with the same path resumes after the last completed batch. ``progress(done,
    total)`` is called before the first batch and after each one, with images scanned in this shard.
    ``device`` ("cpu", "gpu", "auto") picks onnxruntime's execution provider (``resolve_device``).
    With a Dask ``client`` (``connect``) the images are scanned in blocks on the cluster, with the same result
    and checkpoints (``runtime.cluster``).

    >>> top = capture_top(model, "conv3", ArrayImages(x), top=10)     # doctest: +SKIP
    >>> top.values.shape, top.position.shape                          # doctest: +SKIP
    ((64, 10), (64, 10, 2))
    """
    target = find_layer(model, layer).output[0]
    shape = model.shapes.get(target)
    axis = channel_axis(model, target)
    tokens = shape is not None and len(shape) == 3 and axis == 2  # ([W, T, C] too; rows of tokens [T, C] below)
    if shape is None or (len(shape) not in (2, 4) and not tokens):
        raise FdsubError(f"layer {target!r} has output shape {shape}; top-N capture needs [N, C, H, W], [N, C] or "
                         "tokens [N, T, C] or [T, C]")
    channels = int(shape[axis])
    rows, width = grid(model, target)
    picked = parse_neurons(neurons, channels, target)
    for name, value, least in (("top", top, 1), ("per_image", per_image, 1), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise FdsubError(f"{name} must be a positive integer, got {value!r}")
    positions = rows * width
    if per_image > positions:
        raise FdsubError(f"per_image (--per-image) {per_image} is more than the {positions} positions of the map of "
                         f"{target!r}; give at most {positions}")
    first, stop = _shard_range(len(images), shard)
    given, wanted = list(_image_shape(images)), list(model.input_shape[1:])
    if given != wanted:
        raise FdsubError(f"images are {given} but input {model.input_name!r} takes {wanted}; "
                         "pass --input-shape or resize the images")
    scan = {"target": target, "picked": picked, "top": int(top), "per_image": int(per_image),
            "width": width,  # flat position -> (row, col)
            "every": bool(np.array_equal(picked, np.arange(channels))),  # all neurons in order: no copy of acts
            "channels": channels, "batch_size": int(batch_size), "axis": axis,
            "windows": windows_per_image(model, target)}  # how to lay the values out as maps (to_maps)
    signature = {"layer": target, "neurons": picked.tolist(), "top": int(top), "per_image": int(per_image),
                 "range": [first, stop], "sources": len(images), "model": os.path.abspath(model.path)}
    state = start_top(picked, target, images, int(per_image), int(top))
    if checkpoint is not None:
        state = resume(Path(checkpoint), signature, state)
    if client is not None:
        state = _capture_on_cluster(client, model, images, state, first, stop, scan, checkpoint, signature,
                                    progress, device)
    else:
        state = _capture_here(Forward(model, [target], device), images, state, first, stop, scan, checkpoint,
                              signature, progress)
    state.skipped = union_notes(state.skipped, getattr(images, "skipped", []))
    state.ranges = [[first, stop]] if stop > first else []
    return state


def _capture_here(run, images, state, first, stop, scan, checkpoint, signature, progress) -> TopN:
    """The scan in this process: checkpoints every CHECKPOINT_SECONDS and on the way out."""
    total = stop - first
    latest, saved, last_save = state, state.images_done, time.monotonic()
    if progress is not None:
        progress(state.images_done, total)

    def after(scanned: TopN) -> None:
        nonlocal latest, saved, last_save
        latest = scanned
        if checkpoint is not None and time.monotonic() - last_save >= CHECKPOINT_SECONDS:
            save_checkpoint(Path(checkpoint), scanned, signature, images)
            saved, last_save = scanned.images_done, time.monotonic()
        if progress is not None:
            progress(scanned.images_done, total)

    try:
        return _scan(run, state, images, first + state.images_done, stop, first, after, **scan)
    finally:
        if checkpoint is not None and latest.images_done > saved:
            save_checkpoint(Path(checkpoint), latest, signature, images)


def _scan(run, state, images, start, stop, first, after, target, picked, channels, width, every, batch_size,
          axis=1, windows=1, **_) -> TopN:
    """The state after images ``start..stop-1`` (``images_done`` counted from ``first``); ``after(state)`` follows
    each batch."""
    for index, batch in (images.batches(batch_size, start) if start < stop else ()):
        if index >= stop:
            break
        batch = batch[: stop - index]
        acts = to_maps(np.asarray(run(batch)[target], np.float32), axis, windows).reshape(len(batch), channels, -1)
        acts = acts if every else acts[:, picked]
        state = update_top(state, acts, index, width)
        state.images_done = index + len(batch) - first
        if after is not None:
            after(state)
    return state


def _top_block(model, images, forward, lo, hi, **scan) -> TopN:
    """One block's top-N on a cluster worker (no image names: the client puts them back)."""
    empty = start_top(scan["picked"], scan["target"], None, scan["per_image"], scan["top"])
    state = _scan(forward, empty, images, lo, hi, lo, None, **scan)
    state.ranges = [[lo, min(hi, len(images))]]  # which images it holds, for merge_top's overlap check
    return state


def _capture_on_cluster(client, model, images, state, first, stop, scan, checkpoint, signature, progress,
                        device) -> TopN:
    """The scan in blocks on the cluster, merged into the (resumed) ``state``; the checkpoint holds the finished
    blocks that follow it without a gap, as a one-process run's would."""
    resumed = state
    if resumed.ranges is None:  # a fresh or resumed scan holds the images before its first block
        resumed = dataclasses.replace(resumed, ranges=[[first, first + resumed.images_done]] if resumed.images_done
                                      else [])

    def whole(part: TopN) -> TopN:
        return merge_top([resumed, dataclasses.replace(part, sources=resumed.sources)])

    def save(part: TopN, end: int) -> None:
        save_checkpoint(Path(checkpoint), whole(part), signature, images)

    def done(count: int, total: int) -> None:
        if progress is not None:
            progress(resumed.images_done + count, stop - first)

    part = cluster.map_blocks(client, _top_block, model, images, [scan["target"]], device,
                              first + resumed.images_done, stop, scan["batch_size"], merge_top, scan,
                              progress=done, checkpoint=None if checkpoint is None else save)
    if part is None:
        done(0, 0)
        return resumed
    return whole(part)


def merge_top(parts: list[TopN], top: int | None = None) -> TopN:
    """Combine partial results (shards) exactly: the top-N of their union, as one run would give."""
    if not parts:
        raise FdsubError("nothing to merge; give at least one top-N result")
    head = parts[0]
    for part in parts[1:]:
        for what, a, b in (("layer", head.layer, part.layer), ("per_image", head.per_image, part.per_image),
                           ("neurons", head.neurons.tolist(), part.neurons.tolist()),
                           ("image sources", head.sources, part.sources)):
            if a != b:
                shown = (f"{len(a)} vs {len(b)} entries" if what == "image sources" and len(a) != len(b)
                         else f"{short(a)} vs {short(b)}")
                raise FdsubError(f"cannot merge top-N results with different {what} ({shown}); "
                                 "shards must come from the same command")
    ranges = _disjoint_ranges(parts)
    least = min(p.top for p in parts)
    top = least if top is None else top
    if not 1 <= top <= least:
        raise FdsubError(f"cannot merge into top {top}: the parts keep {least} instances per neuron")
    state = start_top(head.neurons, head.layer, head, head.per_image, top)
    state.values = np.concatenate([p.values for p in parts], axis=1)
    state.image_index = np.concatenate([p.image_index for p in parts], axis=1)
    state.position = np.concatenate([p.position for p in parts], axis=1)
    state = _select(state, top)
    state.images_done = sum(p.images_done for p in parts)
    state.skipped = union_notes(*(p.skipped for p in parts))
    state.ranges = ranges
    return state


def _disjoint_ranges(parts: list[TopN]) -> list[list[int]]:
    """The image ranges of all parts, joined where they touch; a FdsubError when two parts share an image
    (the same shard twice, or shards of different splits), which would count those images twice."""
    blocks = []
    for i, part in enumerate(parts):
        if part.ranges is None:
            raise FdsubError(f"part {i + 1} of the merge does not say which images it scanned (an unfinished or older "
                             "result); run `fdsub top --shard` for it again")
        blocks += [(int(a), int(b), i) for a, b in part.ranges]
    blocks.sort()
    for (a0, b0, i), (a1, b1, j) in zip(blocks, blocks[1:]):
        if a1 < b0:
            what = ("are one shard given twice" if (a0, b0) == (a1, b1) and parts[i].ranges == parts[j].ranges
                    else f"overlap (images {a1}-{min(b0, b1) - 1} are in both)")
            raise FdsubError(f"cannot merge: parts {i + 1} and {j + 1} {what}; give each shard once, "
                             "all from one --shard split")
    joined: list[list[int]] = []
    for a, b, _ in blocks:
        if joined and joined[-1][1] == a:
            joined[-1][1] = b
        else:
            joined.append([a, b])
    return joined


# ---- the streaming top-N -------------------------------------------------------------------
def _candidates(acts: np.ndarray, first: int, per_image: int, width: int):
    """Each image's best ``per_image`` positions per neuron: values, image [K, B*k] and position [K, B*k, 2]."""
    b, k_neurons, p = acts.shape
    if per_image == 1:
        pos = np.argmax(acts, axis=2)[..., None]  # argmax: the first maximum in row-major order
    else:
        pos = _best(acts, [np.broadcast_to(np.arange(p), acts.shape)], per_image)
    values = np.take_along_axis(acts, pos, axis=2)  # [B, K, k]: selected in the activations' own layout
    if np.isnan(values).any():  # NaN wins argmax; only then pay for a copy ranking it as -inf
        return _candidates(np.where(np.isnan(acts), -np.inf, acts), first, per_image, width)
    image = np.broadcast_to(first + np.arange(b)[:, None, None], pos.shape)
    values, image, pos = (a.transpose(1, 0, 2).reshape(k_neurons, -1) for a in (values, image, pos))
    return values, image, np.stack([pos // width, pos % width], axis=-1)


def update_top(state: TopN, acts: np.ndarray, first: int, width: int) -> TopN:
    """The state after one batch of activations [B, K, H*W] of images ``first``, ``first + 1``, ..."""
    return _merge(state, _candidates(acts, first, state.per_image, width), state.top)


def _merge(state: TopN, candidates, top: int) -> TopN:
    """The state with one batch's candidates merged in (a new object: an interrupt leaves the old intact).

    Only rows where some candidate reaches the row's current last value can change; the others are kept.
    """
    values, image, position = candidates
    rows = np.flatnonzero((values >= state.values[:, -1:]).any(axis=1))
    part = TopN(np.concatenate([state.values[rows], values[rows]], axis=1),
                np.concatenate([state.image_index[rows], image[rows]], axis=1),
                np.concatenate([state.position[rows], position[rows]], axis=1),
                state.neurons, state.layer, state.sources, state.images_done, state.per_image, state.skipped)
    part = _select(part, top)
    merged = TopN(state.values.copy(), state.image_index.copy(), state.position.copy(), state.neurons, state.layer,
                  state.sources, state.images_done, state.per_image, state.skipped)
    merged.values[rows], merged.image_index[rows], merged.position[rows] = part.values, part.image_index, part.position
    return merged


def _select(state: TopN, top: int) -> TopN:
    """Keep the ``top`` best columns of every row under the total order."""
    image_key = np.where(state.image_index < 0, _LAST, state.image_index)
    flat_key = state.position[..., 0] * (1 << 31) + state.position[..., 1]
    keep = _best(state.values, [image_key, flat_key], top)
    state.values = np.take_along_axis(state.values, keep, axis=1)
    state.image_index = np.take_along_axis(state.image_index, keep, axis=1)
    state.position = np.take_along_axis(state.position, keep[..., None], axis=1)
    return state


def _best(values: np.ndarray, ties: list[np.ndarray], k: int) -> np.ndarray:
    """Indices along the last axis of the ``k`` best entries, in order: value descending, then ``ties`` ascending.

    argpartition finds the k-th value; rows where it is tied with entries left out are ranked in
    full with lexsort (rare with real activations), so the choice never depends on argpartition.
    """
    m = values.shape[-1]
    if m <= k:
        chosen = np.broadcast_to(np.arange(m), values.shape)
    else:
        chosen = np.argpartition(-values, k - 1, axis=-1)[..., :k]
        kth = np.take_along_axis(values, chosen, axis=-1).min(axis=-1, keepdims=True)
        tied = (values >= kth).sum(axis=-1) > k
        if tied.any():
            rows = values[tied]
            order = np.lexsort([t[tied] for t in reversed(ties)] + [-rows], axis=-1)[..., :k]
            chosen = chosen.copy()
            chosen[tied] = order
    keys = [np.take_along_axis(np.broadcast_to(t, values.shape), chosen, axis=-1) for t in ties]
    order = np.lexsort([*reversed(keys), -np.take_along_axis(values, chosen, axis=-1)], axis=-1)
    return np.take_along_axis(chosen, order, axis=-1)


def _shard_range(count: int, shard) -> tuple[int, int]:
    """Shard i of n is the contiguous block [i*count//n, (i+1)*count//n) of image indices."""
    if shard is None:
        return 0, count
    i, n = (int(v) for v in shard)
    if not (n >= 1 and 0 <= i < n):
        raise FdsubError(f"shard {i}/{n} does not exist; shards are numbered 0 to n-1, e.g. 0/4 ... 3/4")
    return i * count // n, (i + 1) * count // n


def _image_shape(images) -> tuple[int, ...]:
    """[C, H, W] of the image set (from its array, or its first batch)."""
    array = getattr(images, "array", None)
    if array is not None:
        return tuple(array.shape[1:])
    shape = getattr(images, "image_shape", None)
    if shape is not None:
        return tuple(shape)
    for _, batch in images.batches(1):
        return tuple(batch.shape[1:])
    raise FdsubError("the image set is empty; give at least one image")
