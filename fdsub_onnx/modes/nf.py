"""The Neuron Feature comparator (Rafegas et al. 2020): the activation-weighted mean of a neuron's top-N patches.

A patch is the receptive-field window of an instance (image, output position) cut from its image.
Instance n weighs ``w_n = max(activation, 0)``: a negative activation is not evidence of what the neuron
responds to, so it must not pull the mean (nor flip its sign); a neuron whose weights are all 0 falls back
to equal weights. Windows reaching past the image border are not zero-filled: each pixel is averaged over
the instances whose window holds it inside the image (weighted denominator per pixel, ``windows.PixelMean``,
the same mean as `local`'s); a pixel outside the image for every instance, or covered only by instances of
weight 0, is 0.
"""

from __future__ import annotations

import dataclasses
from pathlib import PurePath

import numpy as np

from ..compose.inspect import channels_of, instance_geometry
from ..data.images import read_indices
from ..data.topn import TopN, check_top_fits, instance_weights
from ..errors import FdsubError
from ..graph.model import Model, grid
from ..runtime.cluster import map_tasks, model_ref, worker_model, worker_threads
from .result import Decoded
from .windows import PixelMean, cropped, cut, field_part


def _file_name(source: str) -> str:
    """An image's name without its folder: the same files reached by another path are the same images."""
    return PurePath(source).name


def neuron_feature(model: Model, top: TopN, images, batch_size: int = 32, progress=None, client=None) -> Decoded:
    """The Neuron Feature of each neuron of ``top`` (from ``capture_top``) as a ``Decoded`` of mode "nf".

    ``filters[k]`` [C, R_y, R_x] is the weighted mean patch of neuron ``top.neurons[k]`` (see the module
    docstring for weights and the border rule); ``bias`` is zero. ``images`` must be the set ``top`` was
    captured on; only the images that hold an instance are read, in source order, at most ``batch_size``
    at a time. ``progress(done, total)`` counts those images. With a Dask ``client`` groups of neurons run on the
    cluster (``_on_cluster``), with the same result bit for bit.

    >>> nf = neuron_feature(model, capture_top(model, "conv3", images, top=50), images)   # doctest: +SKIP
    >>> nf.filters.shape                                                                 # doctest: +SKIP
    (64, 3, 18, 18)
    """
    geom = instance_geometry(model, top.layer)
    check_top_fits(top, channels_of(model, top.layer), grid(model, top.layer))
    if len(images) != len(top.sources):
        raise FdsubError(f"the top-N result of layer {top.layer!r} was captured on {len(top.sources)} images but "
                         f"the image set has {len(images)}; give the images it was captured on")
    other = next((i for i, (a, b) in enumerate(zip(top.sources, images.sources)) if _file_name(a) != _file_name(b)),
                 None)
    if other is not None:
        raise FdsubError(f"the top-N result of layer {top.layer!r} was captured on other images: image {other} is "
                         f"{top.sources[other]!r} there, {images.sources[other]!r} here; give the images it was "
                         "captured on")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise FdsubError(f"batch_size must be a positive integer, got {batch_size!r}")
    if client is not None:
        return _on_cluster(client, model, top, images, batch_size, progress)
    weights = instance_weights(top)
    k_neurons = top.values.shape[0]
    crop, kept = field_part(geom, model.input_shape[2:], model.shapes[top.layer][2:4])  # all a window meets
    corners = geom.corner(top.position) + np.asarray(crop)  # [K, N, 2]
    mean = PixelMean(k_neurons, int(model.input_shape[1]), kept, model.input_shape[2:])
    rows, cols = np.nonzero(top.image_index >= 0)
    order = np.argsort(top.image_index[rows, cols], kind="stable")
    rows, cols = rows[order], cols[order]
    image = top.image_index[rows, cols]
    if image.size and image[-1] >= len(images):
        raise FdsubError(f"the top-N result refers to image {int(image[-1])} but the image set has {len(images)}")
    needed = np.unique(image)
    done = 0
    if progress is not None:
        progress(done, len(needed))
    for first, batch in read_indices(images, needed, batch_size):
        lo, hi = np.searchsorted(image, [first, first + len(batch)])
        for k, n, i in zip(rows[lo:hi], cols[lo:hi], image[lo:hi]):  # one at a time: a batch's windows may be many
            mean.add([k], corners[k, n], weights[k, n : n + 1], cut(batch[i - first : i - first + 1], corners[k, n],
                                                                    kept))
        done += int(np.count_nonzero((needed >= first) & (needed < first + len(batch))))
        if progress is not None:
            progress(done, len(needed))
    return Decoded(mean.mean().astype(np.float32), np.zeros(k_neurons, np.float32), np.asarray(top.neurons, np.int64),
                   geom.stride, (geom.origin[0] + crop[0], geom.origin[1] + crop[1]), top.layer, "nf",
                   **cropped(geom, crop, kept))



def _on_cluster(client, model, top: TopN, images, batch_size: int, progress) -> Decoded:
    """Groups of neurons on the workers. A neuron's sums are its own and add in the same order in a group, so the
    groups put together are the one-process result; each group reads only the images its instances are in."""
    groups = [g for g in np.array_split(np.arange(len(top.neurons)), 2 * worker_threads(client)) if len(g)]
    parts = [dataclasses.replace(top, values=top.values[g], image_index=top.image_index[g], position=top.position[g],
                                 neurons=top.neurons[g], sources=[]) for g in groups]  # names: the worker's images
    needed = [len(np.unique(p.image_index[p.image_index >= 0])) for p in parts]
    done = 0

    def finished(index, _):
        nonlocal done
        done += needed[index]
        if progress is not None:
            progress(done, sum(needed))

    if progress is not None:
        progress(0, sum(needed))
    results = map_tasks(client, _group, [(part, batch_size) for part in parts], shared=(model_ref(model), images),
                        done=finished)
    return dataclasses.replace(results[0], filters=np.concatenate([r.filters for r in results]),
                               bias=np.concatenate([r.bias for r in results]),
                               neurons=np.concatenate([r.neurons for r in results]))


def _group(ref, images, top: TopN, batch_size: int) -> Decoded:
    """One group of neurons, on a worker."""
    return neuron_feature(worker_model(ref), dataclasses.replace(top, sources=list(images.sources)), images,
                          batch_size)
