"""`local` and `deconvnet` modes: each top-N instance's own filter from a backward pass, then their mean.

An instance's filter is its input gradient (``local``) or deconvnet projection cut to the neuron's
receptive field (zeros where the field leaves the image); the neuron's filter is the mean over its
instances weighted by activation (``instance_weights``), and so is its bias (``local``; zero for
``deconvnet``, whose projection is not a linearization).
"""

from __future__ import annotations

import numpy as np

from ..compose.backend import array_module, get_backend, resolve_device
from ..compose.inspect import layer_geometry
from ..data.images import read_indices
from ..data.topn import TopN, instance_weights
from ..graph.model import find_layer
from ..runtime.capture import capture_top
from .backward import forward_for, instance_gradients, instances_per_batch
from .result import Decoded


def decode_instances(model, layer: str, images, top: int = 100, neurons=None, rule: str = "local",
                     per_instance: bool = False, instances: TopN | None = None, batch_size: int = 16,
                     progress=None, device="cpu", dtype: str = "float32", client=None) -> Decoded:
    """Decode ``neurons`` of ``layer`` from their ``top`` instances on ``images`` (or the given ``instances``).

    Instances run ``batch_size`` at a time, fewer when memory is short (``instances_per_batch``). On
    ``device="gpu"`` each batch runs its backward pass in CuPy; only the receptive-field cuts come back to
    the host. The passes run in float64; ``dtype`` is that of the result. A Dask ``client`` runs the capture of
    the instances on the cluster; the backward passes (as many as instances, not images) run here.
    """
    device = resolve_device(device)
    target = find_layer(model, layer).output[0]
    found = instances if instances is not None else capture_top(model, target, images, top=top, neurons=neurons,
                                                                device=device, client=client)
    geom = layer_geometry(model, target)
    k_neurons, slots = found.values.shape
    shape = (int(model.input_shape[1]), *geom.rf)
    weights = instance_weights(found)
    weights /= np.maximum(weights.sum(axis=1, keepdims=True), 1e-30)
    filters, bias = np.zeros((k_neurons, *shape)), np.zeros(k_neurons)
    each = ((np.zeros((k_neurons, slots, *shape), np.float32), np.zeros((k_neurons, slots), np.float32))
            if per_instance else None)
    forward = forward_for(model, target, device)
    backend = get_backend(device.backend)
    batch_size = instances_per_batch(model, target, batch_size, backend)
    to_numpy = backend.to_numpy
    rows, cols = np.nonzero(found.image_index >= 0)
    order = np.argsort(found.image_index[rows, cols], kind="stable")
    rows, cols = rows[order], cols[order]
    for start in range(0, len(rows), batch_size):
        r, c = rows[start : start + batch_size], cols[start : start + batch_size]
        index = found.image_index[r, c]
        loaded = {}
        for first, batch in read_indices(images, np.unique(index), batch_size):
            loaded.update({first + i: image for i, image in enumerate(batch)})
        grads, offsets = instance_gradients(model, target, np.stack([loaded[i] for i in index]), found.neurons[r],
                                            found.position[r, c], rule, forward, device)
        cut, offsets = to_numpy(_receptive_fields(grads, found.position[r, c], geom)), to_numpy(offsets)
        np.add.at(filters, r, weights[r, c, None, None, None] * cut)
        np.add.at(bias, r, weights[r, c] * offsets)
        if each is not None:
            each[0][r, c], each[1][r, c] = cut, offsets
        if progress is not None:
            progress(min(start + batch_size, len(rows)), len(rows))
    if rule != "local":
        bias[:] = 0
        if each is not None:
            each[1][:] = 0
    return Decoded(filters.astype(dtype), bias.astype(dtype), np.asarray(found.neurons, np.int64),
                   geom.stride, geom.origin, target, rule,
                   instance_filters=None if each is None else each[0],
                   instance_bias=None if each is None else each[1], instances=found)


def _receptive_fields(grads: np.ndarray, positions: np.ndarray, geom) -> np.ndarray:
    """[M, C, R_y, R_x]: each gradient's window ``[O + q*S, O + q*S + R)``, zero outside the image."""
    ry, rx = geom.rf
    xp = array_module(grads)
    padded = xp.pad(grads, ((0, 0), (0, 0), (ry, ry), (rx, rx)))
    out = xp.empty((len(grads), grads.shape[1], ry, rx))
    for m, (y, x) in enumerate(geom.corner(positions) + (ry, rx)):
        out[m] = padded[m, :, y : y + ry, x : x + rx]
    return out
