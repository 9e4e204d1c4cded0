"""Neuron-level drift between two models (``fdsub diff``): what a quantization, a re-export, a fine-tuning or a
pruning changed in what each neuron computes, compared in image space, where the two models' filters live on the
same pixels whatever their graphs look like.

Layers are matched by name (same output tensor, same kind of op, stride and receptive field), then the rest by
structure: the sequence of decodable layers in graph order, each read as (kind of op, stride, receptive field,
channels), aligned as a diff aligns lines (``difflib.SequenceMatcher``), so renames and exporter differences keep
the pairs; a run of layers whose channels differ in the same place is paired too (a pruned copy), its neurons
paired by their filters. Per matched layer and neuron:

- data-free: the ``weights`` filters of both at the same position: ``filter_drift = ||F_B - F_A|| / ||F_A||``,
  their cosine, and ``bias_drift = |b_B - b_A| / max(|b_A|, ||F_A||)`` (the bias change against the response to
  a unit-norm patch);
- with images: each neuron's response to each image (its largest activation over the positions, the value top-N
  ranks), then ``activation_drift`` (relative RMS of the difference over the images), ``top_overlap`` (the share
  of A's top-N images that are B's too) and ``spearman`` (the rank correlation of the responses).

A fingerprint (``save_fingerprint``) keeps model A's side of that (its layers, filters, biases and responses) so a
later model is compared without the old one.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import time
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..compose.backend import get_backend
from ..compose.engine import Engine
from ..compose.inspect import Layer, channels_of, inspect_model, memory_problem
from ..compose.ops import RULES
from ..data.files import check_result_folder, write_atomically
from ..defaults import DEFAULT_DIFF_TOP, html_view
from ..errors import FdsubError
from ..graph.model import Model, as_map, find_layer, follow_through
from ..modes.cost import (
    CostPlan,
    Stage,
    base_bytes,
    capture_stage,
    compose_stage,
    filters_bytes,
    forward_seconds,
    instance_stage,
    nf_stage,
    weights_stage,
)
from ..modes.decode import iter_decode, plan_decode
from ..modes.local import decode_instances
from ..modes.nf import neuron_feature
from ..neurons import means_all, parse_neurons
from ..runtime.capture import capture_top
from ..runtime.session import FETCHED_BYTES, Forward, fitting_batch, image_bytes, tensor_values

PASS, FAIL = "pass", "fail"
#: the file names and result kind of a fingerprint folder
FINGERPRINT_JSON, FINGERPRINT_NPZ, FINGERPRINT_KIND = "fingerprint.json", "fingerprint.npz", "fingerprint"
FINGERPRINT_FORMAT = 1
SHOWN_NEURONS = 12  # the most changed neurons a diff keeps the filters of (drift.png: A, B and B - A of each)


@dataclass
class LayerDrift:
    """One matched layer: the neurons of A compared (``neurons``) with B's (``neurons_b``), one number per neuron
    for each measure (the image measures None without images), and why it fails the gate (empty: it passes)."""

    layer_a: str
    layer_b: str
    op: str
    matched_by: str  # "name" or "structure"
    neurons: list[int]
    neurons_b: list[int]
    filter_drift: list[float]
    cosine: list[float]
    bias_drift: list[float]
    unmatched_neurons_a: list[int] = field(default_factory=list)
    unmatched_neurons_b: list[int] = field(default_factory=list)
    activation_drift: list[float] | None = None
    top_overlap: list[float] | None = None
    spearman: list[float] | None = None
    nf_drift: list[float] | None = None  # with ``instances``: of the Neuron Feature over each model's own top-N
    local_drift: list[float] | None = None  # ... and of the local filter (the mean input gradient there)
    failures: list[str] = field(default_factory=list)

    @property
    def worst(self) -> float:
        """The largest filter drift of the layer (what the table sorts by)."""
        return max(self.filter_drift, default=0.0)

    def __repr__(self) -> str:
        at = int(np.argmax(self.filter_drift)) if self.filter_drift else 0
        where = "" if self.layer_b == self.layer_a else f" (B: {self.layer_b!r})"
        return (f"LayerDrift({self.layer_a!r}{where}, {len(self.neurons)} neurons, filter drift max "
                f"{self.worst:.3g} at neuron {self.neurons[at] if self.neurons else '-'}"
                + (f", {len(self.failures)} limit(s) crossed" if self.failures else "") + ")")


@dataclass
class DiffReport:
    """``diff_models``'s result: the matched layers (most changed first), what stayed unmatched and why, the gate."""

    model_a: str
    model_b: str
    layers: list[LayerDrift]
    unmatched_a: list[dict]
    unmatched_b: list[dict]
    limits: dict
    images: int
    seconds: float
    #: the most changed layer's most changed neurons, with their filters in both models (``present.save.save_diff``
    #: draws them): layer_a, layer_b, neurons, neurons_b, filter_drift, filters_a, filters_b
    shown: dict | None = None

    @property
    def failures(self) -> list[str]:
        found = [f"{d.layer_a}: {reason}" for d in self.layers for reason in d.failures]
        if self.limits.get("require_all_matched"):
            found += [f"{u['layer']} (A): unmatched: {u['reason']}" for u in self.unmatched_a]
            found += [f"{u['layer']} (B): unmatched: {u['reason']}" for u in self.unmatched_b]
            found += [f"{d.layer_a}: {len(d.unmatched_neurons_a)} neuron(s) of A without a counterpart in B"
                      for d in self.layers if d.unmatched_neurons_a]
        return found

    @property
    def status(self) -> str:
        return FAIL if self.failures else PASS

    def _repr_html_(self) -> str | None:
        """The notebook view: a summary table of the most changed layers (``present/notebook.py``)."""
        return html_view(self)

    def __repr__(self) -> str:
        """One screen in a notebook: the verdict and the most changed layers."""
        lines = [f"DiffReport({self.status}: {self.model_b!r} against {self.model_a!r}, {len(self.layers)} layers "
                 f"matched, {len(self.unmatched_a)}/{len(self.unmatched_b)} unmatched, {self.images} images)"]
        lines += [f"  {d!r}" for d in self.layers[:10]]
        if len(self.layers) > 10:
            lines.append(f"  ... {len(self.layers) - 10} more, less changed")
        lines += [f"  fail: {line}" for line in self.failures[:5]]
        return "\n".join(lines[:20])

    def to_json(self) -> dict:
        return {"model_a": self.model_a, "model_b": self.model_b, "status": self.status, "images": self.images,
                "limits": self.limits, "seconds": round(self.seconds, 3),
                "layers": [_finite(dataclasses.asdict(d)) for d in self.layers],
                "unmatched_a": self.unmatched_a, "unmatched_b": self.unmatched_b, "failures": self.failures}


@dataclass
class _Side:
    """One side of a diff: a loaded model, or a fingerprint of one (its filters and responses stored)."""

    label: str
    layers: list[Layer]
    input_shape: tuple
    model: Model | None = None
    stored: dict | None = None  # fingerprint: layer -> {"neurons", "filters", "bias", "responses"}
    image_digest: str | None = None
    compared: dict = field(default_factory=dict)  # layer -> the tensor compared (after its BatchNorm), if not itself

    def tensor(self, layer: str) -> str:
        return self.compared.get(layer, layer)


def diff_models(a, b, layers=None, neurons=None, images=None, top: int = DEFAULT_DIFF_TOP,
                max_drift: float | None = None, max_activation_drift: float | None = None,
                min_top_overlap: float | None = None, require_all_matched: bool = False,
                batch_size: int = 32, instances: bool = False, progress=None) -> DiffReport:
    """Compare model ``b`` (a ``Model``) with ``a`` (a ``Model`` or a fingerprint folder, ``save_fingerprint``),
    neuron by neuron: see the module docstring. ``layers``: names of A's layers to compare (default every matched
    one); ``neurons``: a selector applied to every layer (default all); ``images``: an image set for the image
    measures (a fingerprint's must be the one it was made with); ``instances`` (with images, two models): also the
    drift of each neuron's Neuron Feature and ``local`` filter, each model over its own top-N instances (a capture
    and a backward pass per layer and model); the limits make the gate."""
    start = time.perf_counter()
    side_a, side_b, pairs, unmatched_a, unmatched_b, neurons = _compared(a, b, layers, neurons)
    if images is not None and side_a.stored is not None:
        _same_images(side_a, images)
    wanted_a, wanted_b = _wanted(pairs, neurons)
    filters_a = _filters(side_a, wanted_a)
    if progress is not None:
        progress(1, 2)
    filters_b = _filters(side_b, wanted_b)
    if progress is not None:
        progress(2, 2)
    drifts = [_layer_drift(la, lb, how, *filters_a[la.name], *filters_b[lb.name]) for la, lb, how in pairs]
    if images is not None:
        responses_a = _responses(side_a, [d.layer_a for d in drifts], images, batch_size)
        responses_b = _responses(side_b, [d.layer_b for d in drifts], images, batch_size)
        for d in drifts:
            _image_measures(d, responses_a[d.layer_a], responses_b[d.layer_b], top)
    if instances:
        if images is None or side_a.model is None:
            raise FdsubError("the Neuron Feature and local filter drifts compare two models' top instances: give "
                             "--images and a model (not a fingerprint) as A")
        features = {d.layer_a: _instance_measures(d, side_a, side_b, images, top, batch_size) for d in drifts}
    else:
        features = {}
    limits = {"max_drift": max_drift, "max_activation_drift": max_activation_drift,
              "min_top_overlap": min_top_overlap, "require_all_matched": require_all_matched}
    for d in drifts:
        d.failures = _gate(d, limits)
    drifts.sort(key=lambda d: -d.worst)
    shown = _most_changed(drifts[0], filters_a[drifts[0].layer_a], filters_b[drifts[0].layer_b],
                          features.get(drifts[0].layer_a)) if drifts else None
    return DiffReport(side_a.label, side_b.label, drifts, unmatched_a, unmatched_b, limits,
                      0 if images is None else len(images), time.perf_counter() - start, shown)


def _most_changed(d: LayerDrift, decoded_a, decoded_b, features=None, most: int = SHOWN_NEURONS) -> dict:
    """The ``most`` neurons of layer ``d`` whose filters moved most, with their filters in A and in B (and their
    Neuron Features, the mean of their top patches, where ``features`` holds them: in ``d.neurons`` order)."""
    order = np.argsort(-np.nan_to_num(np.asarray(d.filter_drift), posinf=np.finfo(float).max), kind="stable")[:most]
    rows_a = [int(np.flatnonzero(decoded_a[2] == d.neurons[i])[0]) for i in order]
    rows_b = [int(np.flatnonzero(decoded_b[2] == d.neurons_b[i])[0]) for i in order]
    shown = {"layer_a": d.layer_a, "layer_b": d.layer_b, "neurons": [d.neurons[i] for i in order],
             "neurons_b": [d.neurons_b[i] for i in order], "filter_drift": [d.filter_drift[i] for i in order],
             "filters_a": decoded_a[0][rows_a].astype(np.float32),
             "filters_b": decoded_b[0][rows_b].astype(np.float32)}
    if features is not None and features[0].shape == features[1].shape:
        shown["features_a"], shown["features_b"] = (np.asarray(f, np.float32)[order] for f in features)
    return shown


def _compared(a, b, layers, neurons):
    """``(side A, side B, pairs, unmatched of A, of B, neurons per layer of A)`` of a diff: the sides loaded, the
    layers matched and narrowed to ``layers``; a FdsubError when nothing can be compared."""
    side_a = a if isinstance(a, _Side) else (_model_side(a) if isinstance(a, Model) else load_fingerprint(a))
    side_b = _model_side(b)
    if tuple(side_a.input_shape) != tuple(side_b.input_shape):
        raise FdsubError(f"the models take different inputs ({list(side_a.input_shape)} and "
                         f"{list(side_b.input_shape)}): their filters cannot be compared pixel by pixel; pass "
                         "--input-shape to give both the same")
    pairs, unmatched_a, unmatched_b = match_layers(side_a.layers, side_b.layers, side_a.compared, side_b.compared)
    if layers is not None:  # by tensor, node or module name (``find_layer``) where A is a model
        wanted = [find_layer(side_a.model, n).output[0] if side_a.model is not None else n for n in layers]
        missing = [n for n in wanted if n not in {la.name for la, _, _ in pairs}]
        if missing:
            known = {u["layer"]: u["reason"] for u in unmatched_a}
            raise FdsubError(f"layer {missing[0]!r} of A is not matched in B"
                             + (f" ({known[missing[0]]})" if missing[0] in known else "")
                             + "; `fdsub diff` without --layers lists the matched ones")
        pairs = [p for p in pairs if p[0].name in wanted]
    if not pairs:
        raise FdsubError("no layer of A matches one of B (by name or by structure): these are different "
                         "architectures; compare models of the same network")
    per = _per_layer(neurons, [la for la, _, _ in pairs])
    pairs = [p for p in pairs if per[p[0].name] is None or len(per[p[0].name])]
    return side_a, side_b, pairs, unmatched_a, unmatched_b, per


def _wanted(pairs, per: dict) -> tuple[dict, dict]:
    """Each side's layer -> (neuron selector or None for all, its channels): A's neurons as ``per`` says, B's the same
    where its layer has as many channels, all of them where not (paired with A's by their filters)."""
    return ({la.name: (per[la.name], la.channels) for la, _, _ in pairs},
            {lb.name: (per[la.name] if la.channels == lb.channels else None, lb.channels) for la, lb, _ in pairs})


def estimate_diff(a, b, layers=None, neurons=None, images: int = 0, top: int = DEFAULT_DIFF_TOP,
                  instances: bool = False, batch_size: int = 32) -> CostPlan:
    """The cost of ``diff_models`` with these options (``images``: how many), before any work: each model's weights
    decode of its compared layers (B's while A's filters are held), each model's pass over the images, and with
    ``instances`` the captures, Neuron Features and local passes of every layer."""
    side_a, side_b, pairs, _, _, per = _compared(a, b, layers, neurons)
    stages, held, models = [], 0.0, []
    for key, side, wanted in zip("AB", (side_a, side_b), _wanted(pairs, per)):
        if side.model is None:
            continue
        models.append(side.model)
        rows = {side.tensor(name): parse_neurons(selector, channels_of(side.model, side.tensor(name)))
                for name, (selector, _) in wanted.items()}
        made, held = _side_stages(f"{key}: ", side.model, rows, images, batch_size, held)
        stages += made
        if images and instances:
            for tensor, picked in rows.items():
                stages += [capture_stage(side.model, tensor, images, batch_size),
                           nf_stage(side.model, tensor, len(picked), min(images, top * len(picked)), batch_size),
                           instance_stage(side.model, tensor, len(picked) * min(top, images), neurons=len(picked))]
    stages.append(Stage("the filters of both models, compared", held, 0.0))
    return CostPlan("diff", stages, sum(base_bytes(m) for m in models))


def _side_stages(key: str, model: Model, rows: dict, images: int, batch_size: int, held: float
                 ) -> tuple[list[Stage], float]:
    """One model's stages of a diff or a fingerprint (``rows``: layer -> neurons): its weights decode, with the
    filters already held (``held`` bytes) alive throughout, and its pass over ``images``; and the bytes held after."""
    stages = _decode_stages(model, rows)
    for stage in stages:
        stage.what = f"{key}{stage.what}"
        stage.peak_bytes += held
    held += sum(filters_bytes(model, t, len(r), 8) for t, r in rows.items())
    if images:
        tensors = list(rows)
        per_image = image_bytes(model, tensors) + FETCHED_BYTES * tensor_values(model, tensors)
        batch = fitting_batch(per_image, batch_size, "the pass over the images", "use a smaller --batch-size or "
                              "fewer --layers")
        responses = 4.0 * images * sum(len(r) for r in rows.values())
        stages.append(Stage(f"{key}responses of {len(rows)} layers over {images} images",
                            held + batch * per_image + responses, forward_seconds(model, tensors, images), images))
    return stages, held


def _decode_stages(model: Model, rows: dict) -> list[Stage]:
    """The weights decode of ``rows`` (layer -> neurons) as ``iter_decode`` runs it: every neuron of every layer in
    one bottom-up walk (``compose_stage``), but some neurons of several layers each by the route its plan picks (one
    stage). A walk counted with every layer's rows blocked the layers after each (a target's bank is not composed
    further): ShuffleNetV2's 58 layers were planned at 0 s for 2.9 s (4 neurons each) and for ~25 s (all)."""
    targets = list(rows)
    partial = any(len(picked) < channels_of(model, t) for t, picked in rows.items())
    if partial and len(targets) == 1:  # one layer's rows, as decode walks them
        return compose_stage(model, targets, rows, "float32", "weights")
    if not partial and not memory_problem(model, Engine(get_backend("numpy")), targets, None):  # one walk
        return compose_stage(model, targets, None, "float32", "weights")
    plans = list(plan_decode(model, targets, neurons={t: r if partial else None for t, r in rows.items()},
                             dtype="float32").values())
    stages, routes = [weights_stage(plan) for plan in plans], Counter(plan.route for plan in plans)
    return [Stage(f"weights decode of {len(plans)} layers ({', '.join(f'{n} {r}' for r, n in routes.items())})",
                  max(stage.peak_bytes for stage in stages), sum(stage.seconds for stage in stages))]


# ---- matching ---------------------------------------------------------------------------------------------------
def _signature(layer: Layer, channels: bool = True) -> tuple:
    op = RULES.get(layer.op)  # an exporter may write a linear layer as Gemm or as MatMul: both a matrix product
    kind = "matrix product" if op is not None and op.matrix_product else layer.op
    shape = (kind, tuple(layer.stride or ()), tuple(layer.receptive_field or ()), layer.per_position,
             tuple(layer.patch_grid or ()))
    return (*shape, layer.channels) if channels else shape


def match_layers(a: list[Layer], b: list[Layer], compared_a: dict | None = None, compared_b: dict | None = None
                 ) -> tuple[list[tuple[Layer, Layer, str]], list[dict], list[dict]]:
    """``(pairs (layer of A, layer of B, "name" or "structure") in A's order, unmatched layers of A, of B)``: each
    unmatched one as ``{"layer", "reason"}``. Decodable layers only are paired; by name, a layer is known by the
    tensor it is compared at (``compared_*``: after the BatchNorm that follows it, whose name a copy with the
    BatchNorm fused into the convolution gives the convolution's output)."""
    compared_a, compared_b = compared_a or {}, compared_b or {}
    dec_a, dec_b = [la for la in a if la.decodable], [lb for lb in b if lb.decodable]
    by_name = {compared_b.get(lb.name, lb.name): lb for lb in dec_b}
    pairs = []
    for la in dec_a:
        lb = by_name.get(compared_a.get(la.name, la.name))
        if lb is not None and _signature(la) == _signature(lb):
            pairs.append((la, lb, "name"))
    taken_a, taken_b = {la.name for la, _, _ in pairs}, {lb.name for _, lb, _ in pairs}
    rest_a = [la for la in dec_a if la.name not in taken_a]
    rest_b = [lb for lb in dec_b if lb.name not in taken_b]
    matcher = difflib.SequenceMatcher(None, [_signature(la) for la in rest_a], [_signature(lb) for lb in rest_b],
                                      autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal" or (tag == "replace" and i2 - i1 == j2 - j1 and all(
                _signature(rest_a[i], False) == _signature(rest_b[j], False)
                for i, j in zip(range(i1, i2), range(j1, j2)))):
            pairs += [(rest_a[i], rest_b[j], "structure") for i, j in zip(range(i1, i2), range(j1, j2))]
    order = {la.name: i for i, la in enumerate(a)}
    pairs.sort(key=lambda p: order[p[0].name])
    taken_a, taken_b = {la.name for la, _, _ in pairs}, {lb.name for _, lb, _ in pairs}
    return pairs, _unmatched(a, taken_a, "B"), _unmatched(b, taken_b, "A")


def _unmatched(layers: list[Layer], taken: set, other: str) -> list[dict]:
    return [{"layer": la.name, "reason": (f"no layer of {other} with its name, nor one with the same op, stride, "
                                          f"receptive field and channels in its place" if la.decodable
                                          else f"not decodable: {la.reason}")}
            for la in layers if la.name not in taken]


# ---- the measures ----------------------------------------------------------------------------------------------
def _per_layer(neurons, layers: list[Layer]) -> dict:
    """Layer -> its neurons (None: all): one selector for every layer, each taking the neurons it has (``0-15``:
    the first 16, or all of a layer with fewer; none of a layer with none of them)."""
    if neurons is None or means_all(neurons):
        return {la.name: None for la in layers}
    picked = parse_neurons(neurons, max(int(la.channels or 0) for la in layers))
    return {la.name: picked[picked < int(la.channels or 0)] for la in layers}


def _filters(side: _Side, wanted: dict) -> dict:
    """layer -> (filters [K, ...] float64, bias [K], neuron indices) for ``wanted``: layer -> (a neuron selector or
    None for all, its channels); a model's layers decoded in one walk."""
    if side.stored is not None:
        out = {}
        for name, (neurons, channels) in wanted.items():
            stored = side.stored[name]
            picked = parse_neurons(neurons, channels, name)
            rows = np.searchsorted(stored["neurons"], picked)
            if not np.array_equal(stored["neurons"][np.minimum(rows, len(stored["neurons"]) - 1)], picked):
                raise FdsubError(f"the fingerprint of {side.label} holds neurons {_spec(stored['neurons'])} of "
                                 f"layer {name!r}, not all of {_spec(picked)}; narrow --neurons or fingerprint "
                                 "those neurons")
            out[name] = (stored["filters"][rows], stored["bias"][rows], picked)
        return out
    selectors = {side.tensor(name): neurons for name, (neurons, _) in wanted.items()}
    layer_of = {side.tensor(name): name for name in wanted}
    return {layer_of[d.layer]: (np.asarray(d.filters, np.float64), np.asarray(d.bias, np.float64),
                                np.asarray(d.neurons))
            for d in iter_decode(side.model, list(selectors), neurons=selectors, dtype="float32")}


def _layer_drift(la, lb, how, fa, ba, na, fb, bb, nb) -> LayerDrift:
    """The data-free measures of one matched layer; where the channel counts differ, B's neurons paired with A's by
    their filters (the best cosine first), the rest left unmatched."""
    if fa.shape[1:] != fb.shape[1:]:
        raise FdsubError(f"layers {la.name!r} (A) and {lb.name!r} (B) decode to filters of different shapes "
                         f"{list(fa.shape[1:])} and {list(fb.shape[1:])}; compare models that take the same input")
    flat_a, flat_b = fa.reshape(len(fa), -1), fb.reshape(len(fb), -1)
    norm_a, norm_b = np.linalg.norm(flat_a, axis=1), np.linalg.norm(flat_b, axis=1)
    if la.channels == lb.channels:
        rows_a = rows_b = np.arange(len(fa))
    else:
        rows_a, rows_b = _paired(flat_a, flat_b, norm_a, norm_b)
    scale = norm_a[rows_a]
    drift = _ratio(np.linalg.norm(flat_b[rows_b] - flat_a[rows_a], axis=1), scale)
    both = scale * norm_b[rows_b]
    cosine = np.where(both > 0, (flat_a[rows_a] * flat_b[rows_b]).sum(axis=1) / np.maximum(both, 1e-300), 1.0)
    bias = np.abs(bb[rows_b] - ba[rows_a]) / np.maximum(np.maximum(np.abs(ba[rows_a]), scale), 1e-300)
    return LayerDrift(la.name, lb.name, la.op, how, [int(v) for v in na[rows_a]], [int(v) for v in nb[rows_b]],
                      drift.tolist(), cosine.tolist(), bias.tolist(),
                      sorted(int(v) for v in set(na.tolist()) - set(na[rows_a].tolist())),
                      sorted(int(v) for v in set(nb.tolist()) - set(nb[rows_b].tolist())))


def _paired(flat_a, flat_b, norm_a, norm_b) -> tuple[np.ndarray, np.ndarray]:
    """Rows of A and B paired one to one by the cosine of their filters, the most alike first (greedy)."""
    cosine = (flat_a @ flat_b.T) / np.maximum(np.outer(norm_a, norm_b), 1e-300)
    rows_a, rows_b = [], []
    for flat in np.argsort(-cosine, axis=None):
        i, j = divmod(int(flat), cosine.shape[1])
        if i not in rows_a and j not in rows_b:
            rows_a.append(i)
            rows_b.append(j)
            if len(rows_a) == min(cosine.shape):
                break
    order = np.argsort(rows_a)
    return np.asarray(rows_a)[order], np.asarray(rows_b)[order]


def _responses(side: _Side, names: list[str], images, batch_size: int) -> dict:
    """layer -> [images, K] each neuron's largest activation on each image (float32), in one onnxruntime pass."""
    if side.stored is not None:
        return {name: side.stored[name]["responses"] for name in names}
    forward = Forward(side.model, [side.tensor(name) for name in names])
    parts = {name: [] for name in names}
    for _, batch in images.batches(batch_size):
        values = forward(batch)
        for name in names:
            maps = as_map(side.model, side.tensor(name), values[side.tensor(name)])
            parts[name].append(maps.reshape(*maps.shape[:2], -1).max(axis=2).astype(np.float32))
    return {name: np.concatenate(p) for name, p in parts.items()}


def _image_measures(d: LayerDrift, ra: np.ndarray, rb: np.ndarray, top: int) -> None:
    """Activation drift, top-N overlap and Spearman's correlation of each compared neuron's responses."""
    ra, rb = ra[:, d.neurons].astype(np.float64), rb[:, d.neurons_b].astype(np.float64)
    d.activation_drift = _ratio(np.sqrt(((rb - ra) ** 2).mean(axis=0)), np.sqrt((ra**2).mean(axis=0))).tolist()
    n = min(top, len(ra))
    top_a, top_b = np.argsort(-ra, axis=0, kind="stable")[:n], np.argsort(-rb, axis=0, kind="stable")[:n]
    d.top_overlap = [len(set(top_a[:, k]) & set(top_b[:, k])) / n for k in range(ra.shape[1])]
    d.spearman = [_spearman(ra[:, k], rb[:, k]) for k in range(ra.shape[1])]


def _instance_measures(d: LayerDrift, side_a: _Side, side_b: _Side, images, top: int, batch_size: int) -> tuple:
    """The drift of each compared neuron's Neuron Feature and local filter, each model's over its own top-N; returns
    the two models' Neuron Features (``d.neurons`` order)."""
    found = {}
    for key, side, layer, neurons in (("a", side_a, d.layer_a, d.neurons), ("b", side_b, d.layer_b, d.neurons_b)):
        tensor = side.tensor(layer)
        instances = capture_top(side.model, tensor, images, top=top, neurons=list(neurons), batch_size=batch_size)
        found[key] = (neuron_feature(side.model, instances, images, batch_size=batch_size).filters,
                      decode_instances(side.model, tensor, images, instances=instances).filters)
    d.nf_drift, d.local_drift = (_relative(np.asarray(found["a"][i], np.float64), np.asarray(found["b"][i], np.float64))
                                 for i in (0, 1))
    return found["a"][0], found["b"][0]


def _relative(a: np.ndarray, b: np.ndarray) -> list[float]:
    """``||b - a|| / ||a||`` row by row (0 where both are zero, inf where only ``a`` is)."""
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    if a.shape != b.shape:
        return [float("nan")] * len(a)
    return _ratio(np.linalg.norm(b - a, axis=1), np.linalg.norm(a, axis=1)).tolist()


def _ratio(change: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``change / scale``, every drift's form: 0 where both are zero, inf where only ``scale`` is."""
    return np.where(scale > 0, change / np.maximum(scale, 1e-300), np.where(change > 0, np.inf, 0.0))


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (ties at their mean rank); 1 where both are constant, 0 where one is."""
    rx, ry = _ranks(x), _ranks(y)
    sx, sy = rx.std(), ry.std()
    if sx == 0 or sy == 0:
        return 1.0 if sx == sy else 0.0
    return float(((rx - rx.mean()) * (ry - ry.mean())).mean() / (sx * sy))


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    unique, inverse = np.unique(values, return_inverse=True)
    return (np.bincount(inverse, ranks) / np.bincount(inverse))[inverse] if len(unique) < len(values) else ranks


def _gate(d: LayerDrift, limits: dict) -> list[str]:
    """Why layer ``d`` fails the limits (empty: it passes), naming the option that sets each."""
    found = []
    checks = [("max_drift", "filter drift", d.filter_drift, max, "--max-drift"),
              ("max_activation_drift", "activation drift", d.activation_drift, max, "--max-activation-drift"),
              ("min_top_overlap", "top-N overlap", d.top_overlap, min, "--min-top-overlap")]
    for key, what, values, worst, option in checks:
        limit = limits.get(key)
        if limit is None or not values:
            continue
        broken = next((i for i, v in enumerate(values) if v is not None and not np.isfinite(v)), None)
        if broken is not None:  # NaN compares false with every limit
            found.append(f"{what} is {values[broken]} at neuron {d.neurons[broken]} (NaN or Inf in a filter or "
                         f"response), so {option} {limit:g} cannot hold")
            continue
        value = worst(values)
        if (value > limit) if worst is max else (value < limit):
            neuron = d.neurons[values.index(value)]
            found.append(f"{what} {value:.3g} at neuron {neuron} is {'over' if worst is max else 'under'} "
                         f"{option} {limit:g}")
    return found


# ---- sides: a model, or a fingerprint ---------------------------------------------------------------------------
def _model_side(model: Model) -> _Side:
    layers = inspect_model(model).layers
    compared = {la.name: _after_affine(model, la.name) for la in layers if la.decodable}
    return _Side(model.path or "model", layers, tuple(model.input_shape), model=model,
                 compared={name: end for name, end in compared.items() if end != name})


def _after_affine(model: Model, name: str) -> str:
    """The tensor a layer is compared at: its output followed through the per-channel affine ops it alone feeds
    (a BatchNormalization, a Mul or Add by a constant), so a copy with them fused into its weights (onnxruntime's
    quantization pre-processing) compares equal."""

    def follows(node, tensor) -> bool:
        op = RULES.get(node.op_type)
        others = [i for i in node.input[1:] if i]
        affine = op is not None and (op.channel_affine or (op.affine_by_constant and len(others) == 1))
        return affine and all(i in model.constants for i in others)

    return follow_through(model, name, follows)


def save_fingerprint(model: Model, out: str | os.PathLike, layers=None, neurons=None, images=None,
                     batch_size: int = 32) -> list[Path]:
    """Write what a later ``diff_models`` against ``model`` needs into the folder ``out`` (atomically):
    ``fingerprint.json`` (the layers as ``inspect`` lists them, the neurons kept, the images' count and digest)
    and ``fingerprint.npz`` (each decodable layer's weights filters and biases, and with ``images`` each neuron's
    response to each image)."""
    check_result_folder(out, FINGERPRINT_KIND)
    side = _model_side(model)
    wanted = _fingerprinted(side, layers, neurons)
    names = list(wanted)
    decoded = _filters(side, wanted)
    responses = _responses(side, names, images, batch_size) if images is not None else {}
    arrays, index = {}, {}
    for i, name in enumerate(names):
        filters, bias, picked = decoded[name]
        arrays |= {f"filters_{i}": filters.astype(np.float32), f"bias_{i}": bias, f"neurons_{i}": picked}
        if name in responses:
            arrays[f"responses_{i}"] = responses[name]
        index[name] = i
    meta = {"format": FINGERPRINT_FORMAT, "model": str(model.path or "model"),
            "input_shape": [int(v) for v in model.input_shape],
            "layers": [dataclasses.asdict(la) for la in side.layers], "stored": index, "compared": side.compared,
            "images": None if images is None else {"count": len(images), "digest": image_digest(images, batch_size)}}

    def write(folder: Path) -> None:
        (folder / FINGERPRINT_JSON).write_text(json.dumps(meta))
        with open(folder / FINGERPRINT_NPZ, "wb") as f:
            np.savez_compressed(f, **arrays)  # zeros outside the image: ShuffleNetV2, 8 neurons a layer, 303 -> 142 MB

    return write_atomically(out, [FINGERPRINT_JSON, FINGERPRINT_NPZ], write, kind=FINGERPRINT_KIND)


def _fingerprinted(side: _Side, layers, neurons) -> dict:
    """layer -> (neuron selector, channels) a fingerprint keeps: ``layers`` (default every decodable one) with
    ``neurons`` of each."""
    names = [la.name for la in side.layers if la.decodable and (layers is None or la.name in set(layers))]
    if layers is not None and len(names) != len(set(layers)):
        missing = sorted(set(layers) - set(names))
        raise FdsubError(f"layer {missing[0]!r} is not a decodable layer of the model; `fdsub inspect` lists them")
    chosen = _per_layer(neurons, [la for la in side.layers if la.name in set(names)])
    channels = {la.name: la.channels for la in side.layers}
    return {name: (chosen[name], channels[name]) for name in names if chosen[name] is None or len(chosen[name])}


def estimate_fingerprint(model: Model, layers=None, neurons=None, images: int = 0, batch_size: int = 32) -> CostPlan:
    """The cost of ``save_fingerprint`` with these options (``images``: how many), before any work: the weights
    decode of the layers kept, the pass over the images, and every filter held until it is written."""
    wanted = _fingerprinted(_model_side(model), layers, neurons)
    rows = {name: parse_neurons(selector, channels, name) for name, (selector, channels) in wanted.items()}
    stages, held = _side_stages("", model, rows, images, batch_size, 0.0)
    stages.append(Stage(f"the filters of {len(rows)} layers, written", held, 0.0))
    return CostPlan("fingerprint", stages, base_bytes(model))


def load_fingerprint(path: str | os.PathLike) -> _Side:
    """A fingerprint folder as one side of a diff; a FdsubError naming what is wrong with a damaged one."""
    folder = Path(path)
    if not (folder / FINGERPRINT_JSON).is_file() or not (folder / FINGERPRINT_NPZ).is_file():
        raise FdsubError(f"{folder} is not a fingerprint folder (no {FINGERPRINT_JSON} and {FINGERPRINT_NPZ}); make "
                         "one with `fdsub fingerprint MODEL --out FOLDER`")
    try:
        meta = json.loads((folder / FINGERPRINT_JSON).read_text())
        if meta.get("format") != FINGERPRINT_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, this fdsub reads {FINGERPRINT_FORMAT}")
        layers = [Layer(**la) for la in meta["layers"]]
        stored = {}
        with np.load(folder / FINGERPRINT_NPZ, allow_pickle=False) as data:
            for name, i in meta["stored"].items():
                entry = {key: np.asarray(data[f"{key}_{i}"]) for key in ("filters", "bias", "neurons")}
                entry["filters"] = entry["filters"].astype(np.float64)
                if f"responses_{i}" in data.files:
                    entry["responses"] = np.asarray(data[f"responses_{i}"])
                if len(entry["bias"]) != len(entry["filters"]) or len(entry["neurons"]) != len(entry["filters"]):
                    raise ValueError(f"layer {name!r}: {len(entry['filters'])} filters, {len(entry['bias'])} "
                                     f"biases, {len(entry['neurons'])} neuron indices")
                for key in ("filters", "bias", "responses"):  # a NaN drift would pass every limit
                    if key in entry and not np.isfinite(entry[key]).all():
                        raise ValueError(f"layer {name!r}: its stored {key} hold NaN or Inf")
                stored[name] = entry
        layers = [dataclasses.replace(la, decodable=la.decodable and la.name in stored) for la in layers]
        digest = (meta.get("images") or {}).get("digest")
        return _Side(f"{meta['model']} (fingerprint {folder})", layers, tuple(meta["input_shape"]), stored=stored,
                     image_digest=digest, compared=dict(meta.get("compared") or {}))
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
        raise FdsubError(f"{folder}: damaged fingerprint ({type(exc).__name__}: {exc}); make it again with "
                         "`fdsub fingerprint`") from None


def image_digest(images, batch_size: int = 32) -> str:
    """A digest of the image set as the model reads it (after preprocessing): a fingerprint's responses hold only
    for the same images."""
    digest = hashlib.sha256()
    for _, batch in images.batches(batch_size):
        digest.update(np.ascontiguousarray(batch, np.float32).tobytes())
    return digest.hexdigest()[:16]


def _same_images(side: _Side, images) -> None:
    if side.image_digest is None:
        raise FdsubError(f"{side.label} holds no responses to images; make it with `fdsub fingerprint --images`, "
                         "or leave --images out")
    if image_digest(images) != side.image_digest:
        raise FdsubError(f"--images are not the images {side.label} was made with; pass the same images (and "
                         "preprocessing), or leave --images out")


def _spec(neurons) -> str:
    values = [int(v) for v in neurons]
    return f"{values[0]}-{values[-1]}" if values == list(range(values[0], values[-1] + 1)) else ",".join(map(str,
                                                                                                         values))


def _finite(entry: dict) -> dict:
    """JSON has no infinity: a drift of a filter that was zero and is not becomes null."""
    return {k: ([None if isinstance(v, float) and not np.isfinite(v) else v for v in value]
                if isinstance(value, list) else value) for k, value in entry.items()}
