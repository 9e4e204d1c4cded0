"""Every decoding of some layers side by side, with fidelity: the pipeline behind ``fdsub fidelity`` and the report.

``compare_layers`` runs the data passes once for all layers (fds statistics and top-N instances in two
onnxruntime passes, ``weights`` and ``fds`` in one bottom-up walk each, the backward passes of ``local`` and
``deconvnet`` two at a time) and scores each decoding with ``fidelity``; it computes, the report only shows.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass

import numpy as np

from ..compose.backend import resolve_device
from ..compose.inspect import Layer, Summary, inspect_model
from ..compose.ops import RULES
from ..data.topn import TopN, rows_of
from ..defaults import (
    DEFAULT_BATCH,
    DEFAULT_SELECT,
    DEFAULT_TOP,
    DEFAULT_WEIGHTING,
    REPORT_LAYERS,
    REPORT_NEURONS,
    html_view,
)
from ..errors import FdsubError
from ..graph.model import Model, find_layer
from ..modes.backward import deconvnet_is_local
from ..modes.cost import (
    CostPlan,
    base_bytes,
    capture_stage,
    fds_stages,
    filters_bytes,
    instance_stage,
    nf_stage,
    weights_stage,
)
from ..modes.decode import iter_decode, leaf_rows, plan_decode
from ..modes.fds import gather_statistics, parse_select, parse_weighting
from ..modes.local import decode_instances
from ..modes.nf import neuron_feature
from ..modes.result import Decoded
from ..neurons import ALL, means_all, parse_neurons
from ..runtime.capture import capture_top
from .fidelity import FIDELITY_MODES, fidelity_of_layers, fidelity_stage

INSTANCE_RULES = ("local", "deconvnet")  # the decodings made of per-instance backward passes


@dataclass
class LayerComparison:
    """One layer: its decodings (mode -> Decoded, same neurons), the instances they came from, their scores."""

    layer: Layer
    decoded: dict[str, Decoded]
    found: TopN | None  # the neurons' top-N instances (None when only ``weights`` was compared)
    scores: dict  # ``fidelity``'s result

    def __repr__(self) -> str:
        """One screen: the layer, the modes decoded and their scores, not the arrays."""
        neurons = len(next(iter(self.decoded.values())).neurons) if self.decoded else 0
        lines = [f"LayerComparison(layer {self.layer.name!r}: {neurons} neurons, modes {', '.join(self.decoded)})"]
        for name, value in list(self.scores.items())[:12]:
            shown = value if isinstance(value, (int, float, str)) or value is None else type(value).__name__
            lines.append(f"  {name}: {shown}")
        if self.found is not None:
            lines.append(f"  instances: top {self.found.top} per neuron")
        return "\n".join(lines[:20])

    def _repr_html_(self) -> str | None:
        """The notebook view: a summary table and each mode's filters (``present/notebook.py``)."""
        return html_view(self)

    @property
    def mean_top_activation(self) -> list[float | None]:
        """Each neuron's mean activation over its filled top-N slots (None where there is none)."""
        filled = (self.found.image_index >= 0) & np.isfinite(self.found.values)
        sums = np.where(filled, self.found.values, 0).astype(np.float64).sum(axis=1)
        counts = filled.sum(axis=1)
        return [float(total / count) if count else None for total, count in zip(sums, counts)]


def compare_layers(model: Model, layers: list[Layer], picks: list[np.ndarray], images, holdout=None, top: int = 100,
                   select: str = DEFAULT_SELECT, modes=FIDELITY_MODES, progress=None, device="cpu",
                   batch_size: int = DEFAULT_BATCH, client=None, weighting: str = DEFAULT_WEIGHTING
                   ) -> list[LayerComparison]:
    """Decode ``picks[i]`` of ``layers[i]`` in each of ``modes`` and score them on ``holdout`` (default ``images``);
    fds with the ``select`` rule and the ``weighting``.

    ``progress(done, total)`` counts steps (fractions of steps while passes run, some at the same time);
    ``batch_size`` images go through onnxruntime at a time. With a Dask ``client`` the passes over images
    (statistics, top-N, Neuron Feature, fidelity) run on the cluster.
    """
    modes = _checked_modes(modes)
    parse_select(select)
    parse_weighting(weighting)
    device = resolve_device(device)
    targets = [layer.name for layer in layers]
    picked = dict(zip(targets, picks))
    rules = [m for m in INSTANCE_RULES if m in modes]
    # each step weighs its estimated seconds (the cost plan's), so the progress and its ETA move with the time
    stages = _stages(model, targets, picked, len(images), top, len(holdout) if holdout is not None else 0, modes,
                     batch_size)
    steps = _Steps(progress)
    stats_done = steps.part(sum(stage.seconds for stage in stages["data"]))
    instance_parts = {key: steps.part(stage.seconds) for key, stage in stages["instances"].items()}
    nf_parts = {name: steps.part(stage.seconds) for name, stage in stages["nf"].items()}
    scores_done = steps.part(stages["fidelity"].seconds)
    substitution = None
    if "fds" in modes:
        substitution = gather_statistics(model, targets, images, top=top, select=select, progress=stats_done,
                                         device=device, batch_size=batch_size, client=client, weighting=weighting)
    found = {}
    if set(modes) - {"weights"}:
        tops = dict(substitution.tops or {}) if substitution is not None else {}
        for target in targets:  # layers that no substitution needed (pooling): captured on their own
            if target not in tops:
                tops[target] = capture_top(model, target, images, top=top, device=device, batch_size=batch_size,
                                           client=client)
        found = {name: rows_of(tops[name], picked[name]) for name in targets}
    stats_done(1, 1)
    decoded = {name: {} for name in targets}
    if "weights" in modes:
        for d in iter_decode(model, targets, device=device, neurons=picked):
            decoded[d.layer]["weights"] = d
    if "fds" in modes:
        for d in iter_decode(model, targets, mode="fds", substitution=substitution, device=device, neurons=picked):
            decoded[d.layer]["fds"] = d
    for (name, rule), d in _instance_decodes(model, images, found, rules, instance_parts, device).items():
        decoded[name][rule] = d
    if "nf" in modes:
        for name in targets:
            decoded[name]["nf"] = neuron_feature(model, found[name], images, batch_size=batch_size, client=client)
            nf_parts[name](1, 1)
    ordered = [{mode: decoded[name][mode] for mode in modes} for name in targets]
    scores = fidelity_of_layers(model, ordered, holdout if holdout is not None else images, top=top, device=device,
                                batch_size=batch_size, client=client, progress=scores_done)
    return [LayerComparison(layer, own, found.get(layer.name), score)
            for layer, own, score in zip(layers, ordered, scores)]


def estimate_compare(model: Model, layers=None, neurons=None, images: int = 0, top: int = DEFAULT_TOP,
                     holdout: int = 0, modes=FIDELITY_MODES, batch_size: int = DEFAULT_BATCH,
                     command: str = "report") -> CostPlan:
    """The cost of ``compare_layers`` (``report``, ``fidelity``) over ``images`` (and ``holdout``, 0: scored on the
    images), stage by stage as it runs them, before any work; the layers and neurons as ``choose_report`` picks
    them. Every decoding is kept until the end (the page shows them all): they count at every stage."""
    modes = _checked_modes(modes)
    choice = choose_report(model, layers, neurons)
    named = layers is not None and not means_all(layers)
    chosen, picks, dropped, plan = fitting_sample(model, choice.layers, choice.picks, named, images, top, holdout,
                                                  modes, batch_size)
    plan = plan or _plan(model, chosen, picks, images, top, holdout, modes, batch_size)
    plan.command, plan.notes = command, [choice.note] if choice.note else []
    if dropped:
        plan.notes.append(dropped_note(dropped))
    return plan


def _plan(model, chosen, picks, images, top, holdout, modes, batch_size) -> CostPlan:
    targets = [layer.name for layer in chosen]
    picked = dict(zip(targets, picks))
    stages = _stages(model, targets, picked, images, top, holdout, modes, batch_size)
    kept = len(modes) * sum(filters_bytes(model, t, len(picked[t])) for t in targets)
    return CostPlan("report", [*stages["data"], *stages["instances"].values(), *stages["nf"].values(),
                               stages["fidelity"]], base_bytes(model) + kept)


def fitting_sample(model, chosen: list[Layer], picks: list, named: bool, images: int, top: int, holdout: int, modes,
                   batch_size: int) -> tuple[list[Layer], list, list[str], CostPlan | None]:
    """``(layers, picks, left out, their plan)``: a sample (layers not named) whose plan is over the memory budget
    loses its deepest layer, one at a time, until it fits or one is left (the deepest cost the most: ViT-B/16's
    default report planned 5.02 GiB for its last token layer's local passes, and was refused). Named layers stay as
    named, unplanned here (None): over the budget, their plan refuses them."""
    chosen, picks, dropped = list(chosen), list(picks), []
    if named:
        return chosen, picks, dropped, None
    plan = _plan(model, chosen, picks, images, top, holdout, modes, batch_size)
    while len(chosen) > 1 and not plan.fits:
        dropped.insert(0, chosen.pop().name)
        picks.pop()
        plan = _plan(model, chosen, picks, images, top, holdout, modes, batch_size)
    return chosen, picks, dropped, plan


def dropped_note(dropped: list[str]) -> str:
    return (f"left out {', '.join(dropped)}: the report with {'it' if len(dropped) == 1 else 'them'} does not fit the "
            "memory budget (--layers names them, --memory-budget raises it)")


def _stages(model: Model, targets: list[str], picked: dict, images: int, top: int, holdout: int, modes,
            batch_size: int) -> dict:
    """``compare_layers``'s stages in the order it runs them: ``data`` (the passes over the images and the
    compositions), ``instances`` ((layer, rule) -> the backward passes), ``nf`` (layer -> its Neuron Feature) and
    ``fidelity`` (every layer scored in one pass)."""
    instances = {t: len(picked[t]) * min(top, images) for t in targets}
    data = []
    if "fds" in modes:
        data += fds_stages(model, targets, images, leaf_rows(model, targets, picked), batch_size, neurons=picked)
    elif set(modes) - {"weights"}:
        data += [capture_stage(model, t, images, batch_size) for t in targets]
    if "weights" in modes:
        data += [weights_stage(plan) for plan in plan_decode(model, targets, neurons=picked).values()]
    return {"data": data,
            "instances": {(t, rule): instance_stage(model, t, instances[t], rule, neurons=len(picked[t]))
                          for rule in INSTANCE_RULES if rule in modes for t in targets},
            "nf": {t: nf_stage(model, t, len(picked[t]), min(images, instances[t]), batch_size)
                   for t in targets} if "nf" in modes else {},
            "fidelity": fidelity_stage(model, {t: len(picked[t]) for t in targets}, len(modes), holdout or images,
                                       batch_size)}


def compare_modes(model, layer: str, images, holdout, modes=FIDELITY_MODES, top: int = 100, neurons=None,
                  progress=None, device="cpu", select: str = DEFAULT_SELECT, batch_size: int = DEFAULT_BATCH,
                  client=None, weighting: str = DEFAULT_WEIGHTING) -> LayerComparison:
    """Decode ``neurons`` of ``layer`` in each mode (data modes from ``images``' top-N, fds with ``select`` and
    ``weighting``), then measure on ``holdout``: the one layer's ``LayerComparison`` (``scores`` is ``fidelity``'s
    result, ``decoded`` the filters it scored)."""
    modes = _checked_modes(modes)
    target = find_layer(model, layer).output[0]
    entry = next((lay for lay in inspect_model(model).layers if lay.name == target), None)
    if entry is None:
        raise FdsubError(f"{layer!r} is not a layer (Conv, pooling, Gemm or MatMul output); `fdsub inspect` lists them")
    if not entry.decodable:
        raise FdsubError(f"layer {target!r} is not decodable: {entry.reason}")
    picks = [parse_neurons(neurons, entry.channels, target)]
    return compare_layers(model, [entry], picks, images, holdout, top=top, select=select, modes=modes,
                          progress=progress, device=device, batch_size=batch_size, client=client,
                          weighting=weighting)[0]


@dataclass
class ReportChoice:
    """The layers a report shows (graph order), the neurons of each, and how many layers it chose from."""

    layers: list[Layer]
    picks: list[np.ndarray]
    candidates: int  # the decodable Conv layers a report without --layers chooses from
    note: str | None  # what the default sample left out, in one line; None when it shows every one


def choose_report(model: Model, layers=None, neurons=None, summary: Summary | None = None,
                  max_layers: int = REPORT_LAYERS, max_neurons: int = REPORT_NEURONS) -> ReportChoice:
    """The layers and neurons of a report: ``layers`` named (a list or a comma-separated string) or ``"all"``
    (every decodable Conv layer), ``neurons`` a selector (``parse_neurons``, ``"all"`` for every neuron) cut to
    what each layer has.

    By default a sample that finishes on any model: ``max_layers`` of the decodable Conv layers, the first, the
    deepest and the others evenly spaced between them in graph order (all of them when there are fewer), and the
    first ``max_neurons`` neurons of each; ``note`` says what that left out.

    >>> choice = fd.choose_report(fd.load_model("demo.onnx"))                        # doctest: +SKIP
    >>> [layer.name for layer in choice.layers], [len(p) for p in choice.picks]      # doctest: +SKIP
    (['conv1', 'conv2', 'conv3', 'conv4'], [16, 16, 16, 16])
    """
    for value, what in ((max_layers, "max_layers"), (max_neurons, "max_neurons")):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise FdsubError(f"{what} must be a positive integer, got {value!r}")
    summary = inspect_model(model) if summary is None else summary
    chosen = choose_layers(model, summary, layers)
    candidates = len(chosen)
    kind = "decodable Conv and token" if any(layer.patch_grid for layer in chosen) else "decodable Conv"
    if layers is None:
        chosen = [chosen[i] for i in spread(candidates, max_layers)]
    if neurons is None:
        picks = [np.arange(min(max_neurons, layer.channels), dtype=np.int64) for layer in chosen]
    else:
        picks = neurons_per_layer(neurons, chosen)
    fewer_layers = len(chosen) < candidates
    fewer_neurons = neurons is None and any(layer.channels > max_neurons for layer in chosen)
    note = None
    if fewer_layers or fewer_neurons:
        names = ", ".join(la.name for la in chosen)
        shown = (f"{len(chosen)} of {candidates} {kind} layers ({names})"
                 if fewer_layers else f"{'the' if candidates == 1 else 'all'} {_layers(candidates, kind)}"
                 if layers is None or means_all(layers) else _layers(len(chosen), "named"))
        first = "neuron 0" if max_neurons == 1 else f"neurons 0-{max_neurons - 1}"
        each = f" x {first} of each" if fewer_neurons else ""
        flags = " ".join(f"--{flag} {ALL}" for flag, cut in (("layers", fewer_layers), ("neurons", fewer_neurons))
                         if cut)
        note = f"report of {shown}{each}; {flags} for every one"
    return ReportChoice(chosen, picks, candidates, note)


def spread(count: int, most: int) -> list[int]:
    """``most`` positions of ``count`` (all when fewer): the first, the last and the others evenly spaced between."""
    return sorted({int(i) for i in np.round(np.linspace(0, count - 1, min(most, count)))})


def _layers(count: int, kind: str = "decodable Conv") -> str:
    return f"{count} {kind} layer{'' if count == 1 else 's'}"


def choose_layers(model: Model, summary: Summary, names) -> list[Layer]:
    """The named layers (a list or a comma-separated string) in graph order, each a decodable feature map;
    every decodable Conv layer when ``names`` is None or ``"all"``."""
    listed = {layer.name: layer for layer in summary.layers}
    if names is None or means_all(names):
        chosen = [layer for layer in summary.layers if layer.decodable and (
            layer.patch_grid is not None or _default_layer(layer.op))]
        if not chosen:
            raise FdsubError(f"{model.path} has no decodable Conv layer; name layers with --layers "
                             "(`fdsub inspect` lists them)")
        return chosen
    names = [n.strip() for n in names.split(",")] if isinstance(names, str) else [str(n) for n in names]
    wanted = []
    for name in [n for n in names if n]:
        target = find_layer(model, name).output[0]
        layer = listed.get(target)
        if layer is None:
            raise FdsubError(f"{name!r} is not a layer (Conv, pooling, Gemm or MatMul output); "
                             "`fdsub inspect` lists them")
        if not layer.decodable:
            raise FdsubError(f"layer {target!r} is not decodable: {layer.reason}")
        if len(model.shapes.get(target, ())) != 4 and layer.patch_grid is None:
            raise FdsubError(f"layer {target!r} is not a feature map [N, C, H, W] or tokens of a patch grid; the "
                             "report shows conv-like and token layers")
        wanted.append(target)
    if not wanted:
        raise FdsubError("no layer named; give --layers like conv1,conv4 or --layers all for every Conv layer")
    return [layer for layer in summary.layers if layer.name in wanted]


def within_memory(model: Model, chosen: list[Layer], picks: list[np.ndarray], named: bool, device
                   ) -> tuple[list[Layer], list[str]]:
    """The chosen layers that some route decodes in the memory left (``plan_decode``), and the names of the others.

    Bottom-up banks grow with depth, but the adjoint route needs only a batch of gradients, so every layer it
    can reach fits; what is left out is said. Named layers (``--layers``) must all fit: one error line before
    any work.
    """
    kept, left_out = [], []
    for layer, pick in zip(chosen, picks):
        try:
            plan_decode(model, [layer.name], neurons=pick, device=device)
        except FdsubError:
            if named:
                raise
            left_out.append(layer.name)
            continue
        kept.append(layer)
    if not kept and left_out:
        plan_decode(model, [chosen[0].name], neurons=picks[0], device=device)  # raises with the reason
    return kept, left_out


def neurons_per_layer(selector, layers: list[Layer]) -> list[np.ndarray]:
    """The selector checked against the widest layer, then cut to what each layer has."""
    widest = max(layers, key=lambda layer: layer.channels)
    picked = parse_neurons(selector, widest.channels, widest.name)
    picks = []
    for layer in layers:
        own = picked[picked < layer.channels]
        if not len(own):
            raise FdsubError(f"none of the selected neurons is in layer {layer.name!r}, which has neurons "
                             f"0-{layer.channels - 1}; choose lower indices or leave that layer out")
        picks.append(own)
    return picks


def _checked_modes(modes) -> tuple[str, ...]:
    modes = tuple(modes)
    unknown = [m for m in modes if m not in FIDELITY_MODES]
    if unknown or not modes:
        raise FdsubError(f"unknown mode {unknown[0] if unknown else ''!r}; choose from {', '.join(FIDELITY_MODES)}")
    return modes


def _instance_decodes(model, images, found: dict, rules, parts: dict, device) -> dict:
    """``rules`` (local, deconvnet) of every layer, {(layer, rule): Decoded}, one after the other: each decode runs
    its passes on every core (``decode_instances``); ``parts``: (layer, rule) -> its progress."""
    shared = {name for name in found if {"local", "deconvnet"} <= set(rules) and deconvnet_is_local(model, name)}
    done = {(name, rule): decode_instances(model, name, images, rule=rule, instances=instances,
                                           progress=parts[name, rule], device=device)
            for name, instances in found.items() for rule in rules if not (rule == "deconvnet" and name in shared)}
    for name in shared & {name for name, rule in done if rule == "local"}:
        local = done[(name, "local")]
        done[(name, "deconvnet")] = dataclasses.replace(local, bias=np.zeros_like(local.bias), mode="deconvnet")
        parts[name, "deconvnet"](1, 1)
    return done


class _Steps:
    """``progress(done, total)`` over the report's steps, in estimated seconds; each ``part(seconds)`` is one step
    with its own ``(done, total)`` callback (steps may run at the same time, in threads)."""

    def __init__(self, progress):
        self.progress, self.weights, self.parts, self.lock = progress, [], [], threading.Lock()

    def part(self, seconds: float):
        with self.lock:
            key = len(self.parts)
            self.parts.append(0.0)
            self.weights.append(max(float(seconds), 0.01))  # a step estimated at nothing still moves the bar

        def update(done, total):
            with self.lock:
                self.parts[key] = min(done, total) / total if total else 1.0
                if self.progress is not None:
                    self.progress(sum(p * w for p, w in zip(self.parts, self.weights)), sum(self.weights))

        return update


def _default_layer(op_type: str) -> bool:
    """Whether layers of ``op_type`` are compared by default (``OpRule.default_layer``: convolutions)."""
    op = RULES.get(op_type)
    return op is not None and op.default_layer
