"""`local` and `deconvnet` modes: each top-N instance's own filter from a backward pass, then their mean.

An instance's filter is its input gradient (``local``) or deconvnet projection cut to the neuron's
receptive field (zeros where the field leaves the image), or to the part of it that meets the image for some
position where the field is wider than that (``windows.field_part``, as ``weights`` keeps). The neuron's filter
is the mean of its instance filters weighted by activation (``instance_weights``) *per pixel*, over the
instances whose window holds that pixel inside the image (``windows.PixelMean``, as the Neuron Feature): the
padding at a border instance is no evidence that the filter is 0 there, so a linear first layer decodes to its
weights wherever its instances lie (docs/method.md property 8); a pixel no instance holds inside the image is
0. The bias, one number per instance, is the weighted mean over all instances (``local``; zero for
``deconvnet``, whose projection is not a linearization).
"""

from __future__ import annotations

import numpy as np

from ..compose.backend import get_backend, ordered_map, resolve_device
from ..compose.inspect import instance_geometry
from ..data.images import read_indices
from ..data.topn import TopN, instance_weights
from ..graph.model import ancestors, find_layer, grid
from ..runtime.capture import capture_top
from .backward import (
    BACKWARD_MODES,
    ShapedValues,
    batch_moves,
    forward_for,
    image_gradients,
    pass_model,
    pass_sizes,
    per_image_bytes,
)
from .cone import cone_gradients, cones
from .result import Decoded
from .windows import PixelMean, cropped, cut, field_part


def decode_instances(model, layer: str, images, top: int = 100, neurons=None, rule: str = "local",
                     per_instance: bool = False, instances: TopN | None = None, batch_size: int = 128,
                     progress=None, device="cpu", dtype: str = "float32", client=None) -> Decoded:
    """Decode ``neurons`` of ``layer`` from their ``top`` instances on ``images`` (or the given ``instances``).

    Instances are taken image by image: onnxruntime runs once per image, and that image's instances (up to
    ``batch_size``, fewer when memory is short) share its forward values in one GEMM-shaped backward pass.
    The passes run on every core at once (``ordered_map``) and are added up in image order. On
    ``device="gpu"`` they run in CuPy; only the receptive-field cuts come back to the host. The passes and the
    result are in ``dtype`` (float32, or float64 on request). A Dask ``client`` runs the capture of the
    instances on the cluster; the backward passes (as many as instances, not images) run here.
    """
    device = resolve_device(device)
    target = find_layer(model, layer).output[0]
    found = instances if instances is not None else capture_top(model, target, images, top=top, neurons=neurons,
                                                                device=device, client=client)
    geom = instance_geometry(model, target)
    crop, kept = field_part(geom, model.input_shape[2:], grid(model, target))  # all a window meets
    k_neurons, slots = found.values.shape
    shape = (int(model.input_shape[1]), *kept)
    weights = instance_weights(found)
    weights /= np.maximum(weights.sum(axis=1, keepdims=True), 1e-30)
    filters, bias = PixelMean(k_neurons, shape[0], kept, model.input_shape[2:]), np.zeros(k_neurons)
    each = ((np.zeros((k_neurons, slots, *shape), np.float32), np.zeros((k_neurons, slots), np.float32))
            if per_instance else None)
    backend = get_backend(device.backend)
    workers = backend.workers
    plan = PassPlan(model, target, geom, batch_size, backend, np.dtype(dtype).itemsize)
    cone, passing, nodes, per_pass, images_at_once, spread = (plan.cone, plan.passing, plan.nodes, plan.per_pass,
                                                               plan.images_at_once, plan.spread)
    # onnxruntime runs beside the backward passes, which keep every core busy: one thread of its own
    forward = forward_for(model, target, device, threads=1 if device.name == "cpu" and workers > 1 else None,
                          passing=(passing, nodes))
    rows, cols = np.nonzero(found.image_index >= 0)
    order = np.argsort(found.image_index[rows, cols], kind="stable")
    rows, cols = rows[order], cols[order]
    index = found.image_index[rows, cols]
    starts = np.flatnonzero(np.r_[True, index[1:] != index[:-1]])  # each image's first instance
    bounds = list(zip(starts, np.r_[starts[1:], len(rows)]))

    def spread_passes():
        """(rows, slots, forward values) of each pass: the instances of whole images, up to ``per_pass`` (at least
        one image's: an image runs through onnxruntime once), each with its image's values (those the pass reads,
        batch first; one image's are shared, not copied)."""
        at = 0
        while at < len(bounds):
            lo, hi, at = bounds[at][0], bounds[at][1], at + 1
            while at < len(bounds) and bounds[at][1] - lo <= per_pass:
                hi, at = bounds[at][1], at + 1
            wanted, inverse = np.unique(index[lo:hi], return_inverse=True)
            loaded = {}
            for first, batch in read_indices(images, wanted, len(wanted)):
                loaded.update({first + i: image for i, image in enumerate(batch)})
            values = forward(np.stack([loaded[int(i)] for i in wanted]))
            own = ShapedValues({name: backend.asarray(v if len(wanted) == 1 else v[inverse], dtype)  # one image:
                                for name, v in values.items()}, passing)  # shared, not copied
            yield rows[lo:hi], cols[lo:hi], own

    def passes():
        """(rows, slots, forward values) of each pass: a run of one image's instances."""
        if spread:
            yield from spread_passes()
            return
        for block in range(0, len(bounds), images_at_once):
            spans = bounds[block : block + images_at_once]
            wanted = [int(index[start]) for start, _ in spans]
            loaded = {}
            for first, batch in read_indices(images, np.asarray(wanted), len(wanted)):
                loaded.update({first + i: image for i, image in enumerate(batch)})
            values = forward(np.stack([loaded[i] for i in wanted]))
            for b, (start, end) in enumerate(spans):
                own = ShapedValues({name: backend.asarray(v if len(spans) == 1 else v[b : b + 1], dtype)  # one
                                    for name, v in values.items()}, passing)  # image: whole
                for lo in range(start, end, per_pass):
                    yield rows[lo : min(end, lo + per_pass)], cols[lo : min(end, lo + per_pass)], own

    def run(job):
        r, c, own = job
        if cone is not None:  # each instance's receptive-field cone only: the pass ends at its filter
            windows, offsets = cone_gradients(model, target, own, found.neurons[r], found.position[r, c],
                                              BACKWARD_MODES[rule], rule, nodes, cone)
            windows = windows[:, :, crop[0] : crop[0] + kept[0], crop[1] : crop[1] + kept[1]]
        else:
            grads, offsets = image_gradients(passing, target, own, found.neurons[r], found.position[r, c], rule,
                                             nodes)
            windows = cut(grads, geom.corner(found.position[r, c]) + crop, kept)
        return r, c, backend.to_numpy(windows), backend.to_numpy(offsets)

    done = 0
    for r, c, windows, offsets in ordered_map(run, passes(), workers):
        filters.add(r, geom.corner(found.position[r, c]) + crop, weights[r, c], windows)
        np.add.at(bias, r, weights[r, c] * offsets)
        if each is not None:
            each[0][r, c], each[1][r, c] = windows, offsets
        done += len(r)
        if progress is not None:
            progress(done, len(rows))
    if rule != "local":
        bias[:] = 0
        if each is not None:
            each[1][:] = 0
    return Decoded(filters.mean().astype(dtype), bias.astype(dtype), np.asarray(found.neurons, np.int64),
                   geom.stride, (geom.origin[0] + crop[0], geom.origin[1] + crop[1]), target, rule,
                   instance_filters=None if each is None else each[0],
                   instance_bias=None if each is None else each[1], instances=found, **cropped(geom, crop, kept))


class PassPlan:
    """How ``decode_instances`` runs its backward passes, and what they hold (its cost estimate reads the same):
    ``cone`` (each instance's receptive-field cone, or None: whole maps), the network a pass runs over (``passing``,
    ``nodes``: attention's head split moved so that instances ride side by side), ``per_pass`` instances a pass,
    ``images_at_once`` per onnxruntime run, and ``spread``: whole-map passes of instances of several images, each
    with its own image's forward values (else a pass holds one image's instances, sharing its values)."""

    def __init__(self, model, target: str, geom, most: int, backend, itemsize: int):
        self.workers = max(backend.workers, 1)
        self.cone = instance_cone(model, target, geom)
        self.passing, self.nodes = pass_model(model, target)
        self.largest = largest_cut(model, target, geom, self.cone)
        self.image, self.instance = per_image_bytes(model, target, itemsize, self.largest)
        self.per_pass, self.images_at_once = pass_sizes(model, target, most, backend, itemsize, self.workers,
                                                        self.largest)
        moves = batch_moves(self.passing, self.nodes)  # windows or patches on the batch axis: one image a pass
        self.spread = self.cone is None and not moves
        if moves:
            self.images_at_once = 1
        elif self.spread:  # as many as a quarter of the memory left, shared by the passes at once, holds
            room = backend.free_bytes() // 4 // self.workers
            self.per_pass = int(max(1, min(most, room // max(self.image + self.instance, 1))))

    def peak(self) -> int:
        """Bytes the passes hold at once: spread, each of the ``workers`` passes and the one being read hold their
        instances' values and gradients; else the run's forward values and, per worker, its cut of them beside the
        image's and its instances' gradients (EfficientNet-Lite2 blocks.16, one instance a pass on 2 cores: 1,672 MB
        measured, 1,657 MB by this count)."""
        if self.spread:
            return (self.workers + 1) * self.per_pass * (self.image + self.instance)
        return self.images_at_once * self.image + self.workers * (2 * self.image + self.per_pass * self.instance)


def instance_cone(model, target: str, geom) -> dict | None:
    """Each tensor's cone (the window an instance's pass reads there), or None where the passes take whole maps:
    ``target`` is not reached through a chain of windowed and elementwise ops, or its cones hold more values than
    the whole maps. A field much wider than the image makes cones mostly padding: EfficientNet-Lite2's conv_head
    at 260 px (field 1,115 px) cuts 465 M values per instance where its maps hold 34 M."""
    cone = cones(model, ancestors(model, [target]), target)
    image = None if cone is None else cone.get(model.input_name)
    if image is None or (image.ratio, image.start, image.size) != (tuple(geom.stride), tuple(geom.origin),
                                                                    tuple(geom.rf)):
        return None
    maps = {t: int(np.prod(model.shapes[t][1:])) for t in cone if len(model.shapes.get(t, ())) == 4}
    if sum(_cut_values(model, t, cone[t]) for t in maps) > sum(maps.values()):
        return None
    return cone


def largest_cut(model, target: str, geom, cone: dict | None) -> int:
    """Values of the largest gradient one instance's pass holds: its largest cut of a cone, or on whole maps the
    larger of the largest map and its filter (the part of the field that meets the image, ``field_part``)."""
    if cone is not None:
        return max(_cut_values(model, t, c) for t, c in cone.items() if len(model.shapes.get(t, ())) == 4)
    maps = [int(np.prod(model.shapes[o][1:])) for n in ancestors(model, [target]) for o in n.output
            if o in model.shapes]
    kept = field_part(geom, model.input_shape[2:], grid(model, target))[1]
    return max([int(model.input_shape[1]) * kept[0] * kept[1], *maps])


def _cut_values(model, tensor: str, cone) -> int:
    return int(model.shapes[tensor][1]) * cone.size[0] * cone.size[1]
