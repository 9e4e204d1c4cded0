"""`check_model`: the health of a model for decoding, as pass/fail checks for a CI job.

Checks, each bounded in time by the layers and neurons it samples:

- ``coverage``: the share of layers (``inspect``) that can be decoded is at least ``min_coverage``.
- ``expected-layers`` (only when asked): the decodable layers are the expected count, or include the
  expected names.
- ``finite-weights``: no NaN or Inf in any float constant of the model (initializers, Constant nodes).
- ``identity``: the `weights` identity of docs/method.md on the sampled layers. Filters decoded from the model
  in ``weights`` mode must predict the activations of its *linearized* copy (``_linearize``), computed
  with onnxruntime on random images: ``max |<D, patch> + beta - act| <= tolerance * max |act|`` on every
  interior output position of the sampled neurons.
- ``degenerate-filters``: the share of sampled decoded filters that are not finite, all zero or
  constant over their receptive field is at most ``max_degenerate``.
- ``dead-neurons``: in each sampled layer, the share of neurons whose response never varies over the
  probe images (taken after the layer's activation: BatchNormalization, Relu, ... that follow it alone;
  after a ReLU: never > 0) is at most ``max_dead``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..compose.inspect import Summary, inspect_model
from ..compose.ops import RULES
from ..data.images import open_images
from ..defaults import CHECK_IMAGES
from ..errors import FdsubError
from ..graph.model import Model, as_map, find_layer, follow_through, load_model
from ..graph.prune import pruned
from ..graph.validate import nonfinite_weights
from ..modes.cost import CostPlan, Stage, base_bytes, forward_seconds, weights_stage
from ..modes.decode import decode, plan_decode
from ..modes.result import degenerate_kind
from ..neurons import means_all
from ..runtime.session import FETCHED_BYTES, Forward, fitting_batch, image_bytes, tensor_values
from .compare import spread
from .self_test import identity_error as _identity_error
from .self_test import linearized

DEFAULT_IMAGES = CHECK_IMAGES
PASS, FAIL, SKIP = "pass", "fail", "skip"
CHECKS = ("coverage", "expected-layers", "finite-weights", "identity", "degenerate-filters", "dead-neurons")
VARIES = 1e-6  # a neuron varies when its range over the probe set exceeds this share of its layer's largest |value|
BATCH = 8


@dataclass
class Check:
    """One check: ``status`` is pass, fail or skip; ``value`` is compared with ``limit``; ``details`` say where."""

    name: str
    status: str
    summary: str
    value: float | None = None
    limit: float | None = None
    details: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.status == FAIL


@dataclass
class CheckReport:
    """The checks of one model, with the coverage figures they rest on."""

    model: str
    input_shape: list[int]
    layers: int
    decodable: int
    blocked: list[dict]  # {"layer", "op", "reason"} of each layer that cannot be decoded
    sampled: list[str]  # the layers decoded and probed
    checks: list[Check]
    seconds: float = 0.0

    @property
    def coverage(self) -> float:
        return self.decodable / self.layers if self.layers else 0.0

    @property
    def passed(self) -> bool:
        return not any(c.failed for c in self.checks)

    @property
    def status(self) -> str:
        return PASS if self.passed else FAIL

    def check(self, name: str) -> Check | None:
        """The check called ``name`` (None when it did not run)."""
        return next((c for c in self.checks if c.name == name), None)

    def to_json(self) -> dict:
        return {
            "model": self.model, "status": self.status, "input_shape": self.input_shape,
            "layers": self.layers, "decodable": self.decodable, "coverage": self.coverage,
            "blocked": self.blocked, "sampled": self.sampled, "seconds": round(self.seconds, 3),
            "checks": [dataclasses.asdict(c) | {"value": _finite(c.value), "seconds": round(c.seconds, 3)}
                       for c in self.checks],
        }


def _finite(value: float | None) -> float | None:
    """A value for strict JSON: NaN and infinities become null (the summary says why)."""
    return value if value is None or np.isfinite(value) else None


def check_model(
    model: Model | str | os.PathLike,
    *,
    input_shape: tuple[int, ...] | None = None,
    layers: Sequence[str] | None = None,
    sample: int = 3,
    neurons_per_layer: int = 4,
    max_rf: int | None = None,
    images=DEFAULT_IMAGES,
    preprocessing: dict | None = None,
    min_coverage: float | None = None,
    max_dead: float = 0.5,
    max_degenerate: float = 0.0,
    tolerance: float = 1e-4,
    expect_decodable: int | Sequence[str] | None = None,
    dtype: str = "float64",
    identity_images: int = 2,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> CheckReport:
    """Run the checks (module docstring) on ``model`` (a Model or a path) and report each one.

    ``layers`` names the layers to decode and probe (``"all"``: every decodable layer); by default ``sample``
    decodable layers spread from the first to the deepest whose receptive field is at most ``max_rf`` pixels
    (default: no bound; a layer whose field never fits inside the image is decoded at its centre by the adjoint
    route, whose filter holds there; layers after an upsampling, decoded per position, are sampled whatever ``max_rf``).
    ``neurons_per_layer``
    neurons, evenly spaced, are decoded per layer. ``images`` (a spec for ``open_images``, opened with
    ``preprocessing``, or an image set; None skips the check) are the dead-neuron probes;
    ``identity_images`` random normal images drive the identity. The checks guard the model, not the tool: the
    identity is decoded in float64 by default (it tests the linearization; float32 rounding is not a model
    defect), and coverage is reported always but fails only below an explicit ``min_coverage``. A FdsubError when
    the model cannot be checked at all (unreadable, unknown layer, decoding out of memory).

    >>> report = check_model("model.onnx", sample=2, neurons_per_layer=2)     # doctest: +SKIP
    >>> report.passed, [(c.name, c.status) for c in report.checks]            # doctest: +SKIP
    """
    _check_options(sample, neurons_per_layer, max_rf, min_coverage, max_dead, max_degenerate, tolerance,
                   identity_images, dtype)
    note = progress or (lambda message: None)
    start = time.perf_counter()
    if not isinstance(model, Model):
        note(f"loading {model}")
        model = load_model(model, input_shape)
    summary = inspect_model(model)
    blocked = [{"layer": lay.name, "op": lay.op, "reason": lay.reason} for lay in summary.layers if not lay.decodable]
    checks = [_timed(_coverage, summary, min_coverage)]
    if expect_decodable is not None:
        checks.append(_timed(_expected, summary, expect_decodable, model))
    checks.append(_timed(_finite_weights, model))
    picked, notes = _sample(model, summary, layers, sample, max_rf)
    with np.errstate(all="ignore"):  # NaN weights are reported by the checks, not as warnings
        decoded = []
        started = time.perf_counter()
        for name in picked:
            note(f"decoding {name}")
            channels = next(lay.channels for lay in summary.layers if lay.name == name)
            neurons = _spread(channels, neurons_per_layer)
            decoded.append(decode(model, name, neurons=neurons, mode="weights", dtype=dtype))
        spent = time.perf_counter() - started  # the decode serves both checks below
        if picked:
            note("checking the identity on the linearized model")
        checks.append(_timed(_identity, model, decoded, tolerance, identity_images, seed, notes, extra=spent))
        checks.append(_timed(_degenerate, decoded, max_degenerate))
        if picked and images is not None:
            note("probing for dead neurons")
        checks.append(_timed(_dead, model, picked, images, preprocessing or {}, max_dead))
    return CheckReport(model.path, list(model.input_shape), len(summary.layers), len(summary.layers) - len(blocked),
                       blocked, picked, checks, time.perf_counter() - start)


def _check_options(sample, neurons, max_rf, min_coverage, max_dead, max_degenerate, tolerance, identity_images, dtype):
    _check_sizes(sample, neurons, max_rf, identity_images, dtype)
    for name, value in (("min coverage", min_coverage), ("max dead", max_dead), ("max degenerate", max_degenerate)):
        if value is not None and not 0.0 <= value <= 1.0:
            raise FdsubError(f"{name} is a share between 0 and 1, got {value!r}")
    if not tolerance > 0:
        raise FdsubError(f"tolerance must be a positive relative error such as 1e-4, got {tolerance!r}")


def _check_sizes(sample, neurons, max_rf, identity_images, dtype):
    """The options that size the work (``estimate_check`` reads them too)."""
    for name, value in (("sample (--sample)", sample), ("neurons per layer (-k)", neurons),
                        ("identity images", identity_images)):  # the CLI's option named beside the argument
        if int(value) != value or value < 1:
            raise FdsubError(f"{name} must be a positive integer, got {value!r}")
    if max_rf is not None and (int(max_rf) != max_rf or max_rf < 1):
        raise FdsubError(f"max receptive field (--max-rf) must be a positive number of pixels, got {max_rf!r}")
    if str(dtype) not in ("float32", "float64"):
        raise FdsubError(f"dtype must be float32 or float64, got {dtype!r}")


def _timed(run, *args, extra: float = 0.0) -> Check:
    start = time.perf_counter()
    result = run(*args)
    result.seconds = time.perf_counter() - start + extra
    return result


# ---- what is checked ----------------------------------------------------------------------------
def _coverage(summary: Summary, min_coverage: float) -> Check:
    total = len(summary.layers)
    decodable = sum(lay.decodable for lay in summary.layers)
    share = decodable / total if total else 0.0
    blocked: dict[str, list] = {}  # one line per blocking reason (it names the node), not one per layer
    for lay in summary.layers:
        if not lay.decodable:
            blocked.setdefault(lay.reason, []).append(lay)
    details = [f"{lay[0].name} ({lay[0].op}): {reason}" if len(lay) == 1 else
               f"{len(lay)} layers ({lay[0].name} ... {lay[-1].name}): {reason}" for reason, lay in blocked.items()]
    if min_coverage is None:  # reported, not a gate: a layer fdsub cannot decode is no defect of the model
        status = PASS if total else FAIL
        return Check("coverage", status, f"{decodable} of {total} layers decodable" + (
            "" if decodable == total or not total else " (reported only; --min-coverage makes it a limit)"),
            share, None, details)
    status = PASS if total and share >= min_coverage else FAIL
    summary = f"{decodable} of {total} layers decodable" + (
        f", under --min-coverage {min_coverage:g}" if status == FAIL and total else "")
    return Check("coverage", status, summary, share, min_coverage, details)


def _expected(summary: Summary, expected, model: Model) -> Check:
    decodable = [lay.name for lay in summary.layers if lay.decodable]
    if isinstance(expected, (int, np.integer)):
        status = PASS if len(decodable) == expected else FAIL
        return Check("expected-layers", status, f"{len(decodable)} decodable layers, expected {expected}",
                     float(len(decodable)), float(expected))

    def tensor(name: str) -> str | None:  # tensor, node or module names, as --layers takes them
        try:
            return find_layer(model, name).output[0]
        except FdsubError:
            return None

    found = {name: tensor(name) for name in expected}
    missing = [name for name in expected if found[name] not in decodable]
    listed = {lay.name for lay in summary.layers}
    details = [f"{name}: {'not decodable' if found[name] in listed else 'no such layer'}" for name in missing]
    return Check("expected-layers", FAIL if missing else PASS,
                 f"{len(expected) - len(missing)} of {len(expected)} expected layers decodable", details=details)


def _finite_weights(model: Model) -> Check:
    bad = [f"{name} {shape}: {nan} NaN, {inf} Inf" for name, shape, nan, inf in nonfinite_weights(model)]
    total = sum(np.asarray(value).dtype.kind == "f" for value in model.constants.values())
    summary = f"{len(bad)} of {total} float tensors hold NaN or Inf" if bad else f"{total} float tensors, all finite"
    return Check("finite-weights", FAIL if bad else PASS, summary, float(len(bad)), 0.0, bad)


def _identity(model: Model, decoded, tolerance, count, seed, notes) -> Check:
    if not decoded:
        return Check("identity", SKIP, "no layer to decode: " + "; ".join(notes), details=notes)
    try:
        gates = {mul: value for d in decoded for mul, value in d.gates.items()}  # held as they were decoded
        linear = _linear_model(model, [d.layer for d in decoded], gates)
    except FdsubError as exc:
        return Check("identity", SKIP, f"the model cannot be linearized: {exc}")
    images = np.random.default_rng(seed).standard_normal((count, *model.input_shape[1:])).astype(np.float32)
    try:
        acts = Forward(linear, [d.layer for d in decoded])(images)
    except FdsubError as exc:
        return Check("identity", SKIP, f"the linearized model does not run: {exc}")
    results = [_identity_error(d, as_map(linear, d.layer, acts[d.layer]), images) for d in decoded]
    compared = [r for r in results if r.positions]
    details = [_identity_line(r, tolerance) for r in results]
    if not compared:
        return Check("identity", SKIP, "no sampled neuron has its receptive field inside the image", details=details)
    worst = max((r.relative if np.isfinite(r.relative) else np.inf) for r in compared)
    status = PASS if all(r.within(tolerance) for r in compared) else FAIL
    neurons = sum(len(d.neurons) for d, r in zip(decoded, results) if r.positions)
    summary = f"max relative error {worst:.2e} over {neurons} neurons of {len(compared)} layers"
    if status == FAIL:
        summary += f", over --tolerance {tolerance:g}" + ("" if all(np.asarray(d.filters).dtype == np.float64
                                                                       for d in decoded) else " (--dtype float64)")
    return Check("identity", status, summary, float(worst), tolerance, details)


def _identity_line(result, tolerance) -> str:
    if not result.positions:
        return f"{result.layer}: no output position with its receptive field inside the image"
    if not np.isfinite(result.relative):
        return f"{result.layer}: prediction or activation not finite"
    line = f"{result.layer}: relative error {result.relative:.2e} on {result.positions} positions"
    if not result.within(tolerance) and result.worst is not None:
        image, neuron, pred, act = result.worst
        line += f" (worst: image {image}, neuron {neuron}, predicted {pred:.6g}, actual {act:.6g})"
    return line


def _linear_model(model: Model, names: list[str], gates: dict) -> Model:
    """The model, computing only ``names``, with its nonlinearities replaced as ``weights`` mode reads them."""
    proto = linearized(pruned(model.proto, names, model.input_name, batch=None), model.patterns, gates)
    return dataclasses.replace(model, proto=proto)


def _degenerate(decoded, max_degenerate: float) -> Check:
    total, bad = 0, []
    for d in decoded:
        for k, f in zip(d.neurons, np.asarray(d.filters, dtype=np.float64)):
            total += 1
            kind = degenerate_kind(f, constant=True)
            if kind:
                bad.append(f"{d.layer} neuron {k}: {kind}")
    if not total:
        return Check("degenerate-filters", SKIP, "no filter decoded")
    share = len(bad) / total
    status = PASS if share <= max_degenerate else FAIL
    summary = f"{len(bad)} of {total} decoded filters degenerate" + (
        f", over --max-degenerate {max_degenerate:g}" if status == FAIL else "")
    return Check("degenerate-filters", status, summary, share, max_degenerate, bad)


def estimate_check(model: Model, layers=None, sample: int = 3, neurons_per_layer: int = 4, max_rf: int | None = None,
                   images: int = 32, identity_images: int = 2, dtype: str = "float64") -> CostPlan:
    """The cost of ``check_model`` with these options (``images``: how many dead-neuron probes), before any work:
    the sampled layers' weights decodes, the identity's run of the linearized model, the probe pass."""
    _check_sizes(sample, neurons_per_layer, max_rf, identity_images, dtype)
    summary = inspect_model(model)
    picked, _ = _sample(model, summary, layers, sample, max_rf)
    channels = {lay.name: lay.channels for lay in summary.layers}
    neurons = {name: _spread(channels[name], neurons_per_layer) for name in picked}
    stages = [weights_stage(plan) for plan in plan_decode(model, picked, neurons=neurons, dtype=dtype).values()]
    if picked:
        stages.append(Stage(f"identity over {identity_images} images", identity_images * (
            image_bytes(model, picked) + FETCHED_BYTES * tensor_values(model, picked)),
            forward_seconds(model, picked, identity_images), identity_images))
        probes = [_activation_of(model, name) for name in picked]
        per_image = _probe_bytes(model, probes)
        stages.append(Stage(f"dead-neuron probe over {images} images",
                            fitting_batch(per_image, BATCH, "the dead-neuron probe", PROBE_FIX) * per_image,
                            forward_seconds(model, probes, images), images))
    return CostPlan("check", stages, base_bytes(model))


PROBE_FIX = "check fewer --layers, or raise --memory-budget"


def _probe_bytes(model: Model, probes: list[str]) -> int:
    """Bytes per probe image: onnxruntime's tensors and the probed activations fetched, in float64 once."""
    return image_bytes(model, probes) + (FETCHED_BYTES + 8) * tensor_values(model, probes)


def _dead(model: Model, picked: list[str], images, preprocessing: dict, max_dead: float) -> Check:
    if images is None:
        return Check("dead-neurons", SKIP, "no probe images")
    if not picked:
        return Check("dead-neurons", SKIP, "no layer to probe")
    if isinstance(images, (str, os.PathLike)):
        images = open_images(os.fspath(images), model.input_shape[1:], **preprocessing)
    probes = {name: _activation_of(model, name) for name in picked}
    forward = Forward(model, list(probes.values()))
    low, high = {}, {}
    batch_size = fitting_batch(_probe_bytes(model, list(probes.values())), BATCH, "the dead-neuron probe", PROBE_FIX)
    for _, batch in images.batches(batch_size):
        values = forward(batch)
        for tensor in probes.values():
            acts = np.asarray(values[tensor], dtype=np.float64)
            acts = as_map(model, tensor, acts) if acts.ndim > 1 else acts[:, None, None, None]
            acts = acts.reshape(acts.shape[0], acts.shape[1], -1)
            lo, hi = acts.min(axis=(0, 2)), acts.max(axis=(0, 2))
            low[tensor] = np.minimum(low.get(tensor, lo), lo)
            high[tensor] = np.maximum(high.get(tensor, hi), hi)
    if not low:
        return Check("dead-neurons", SKIP, "the probe image set is empty")
    details, worst, dead_total, total, broken = [], 0.0, 0, 0, 0
    for name, tensor in probes.items():
        lo, hi = low[tensor], high[tensor]
        scale = float(max(np.abs(lo).max(), np.abs(hi).max()))
        dead = np.flatnonzero(~np.isfinite(hi - lo) | (hi - lo <= VARIES * scale))
        broken += int((~np.isfinite(hi - lo)).sum())
        share = len(dead) / len(lo)
        worst, dead_total, total = max(worst, share), dead_total + len(dead), total + len(lo)
        where = f" (after {tensor!r})" if tensor != name else ""
        shown = ", ".join(map(str, dead[:8])) + (", ..." if len(dead) > 8 else "")
        details.append(f"{name}{where}: {len(dead)} of {len(lo)} dead" + (f" ({shown})" if len(dead) else ""))
    status = PASS if worst <= max_dead else FAIL
    probes_of = _probe_names(images)
    summary = (f"{dead_total} of {total} neurons dead on {len(images)} probe images ({probes_of}); worst layer "
               f"{worst:.0%}")
    if status == FAIL:
        summary += f", over --max-dead {max_dead:g}"
        if broken:  # NaN weights, not the probes (finite-weights names them)
            summary += f"; {broken} of them respond NaN or Inf: the weights' doing, not the probe images'"
        elif probes_of.startswith("builtin:"):
            summary += ("; synthetic probes leave many neurons of real networks still: --images with the model's "
                        "own kind of images")
    return Check("dead-neurons", status, summary, worst, max_dead, details)


def _probe_names(images) -> str:
    """Where the probe images come from: a builtin set by name, else the first and last of them."""
    sources = list(getattr(images, "sources", None) or [])
    if not sources:
        return "unnamed"
    first = sources[0].split("[")[0] if sources[0].startswith("builtin:") else sources[0]
    return first if first.startswith("builtin:") or len(sources) == 1 else f"{sources[0]} ... {sources[-1]}"


def _activation_of(model: Model, name: str) -> str:
    """The tensor holding ``name``'s response after its activation: followed through the per-channel and
    elementwise ops it alone feeds (BatchNormalization, Relu, a Mul by a constant, ...)."""

    def follows(node, tensor) -> bool:
        op = RULES.get(node.op_type)
        if op is not None and op.affine_by_constant:
            others = [i for i in node.input if i != tensor]
            return len(others) == 1 and others[0] in model.constants
        return op is not None and op.keeps_neuron

    return follow_through(model, name, follows)


# ---- which layers and neurons ---------------------------------------------------------------------
def _sample(model: Model, summary: Summary, layers, sample: int, max_rf: int | None) -> tuple[list[str], list[str]]:
    """The layers to decode, and notes on layers left out."""
    by_name = {lay.name: lay for lay in summary.layers}
    every = means_all(layers)
    if layers is not None and not every:
        picked, notes = [], []
        for name in layers:
            node = find_layer(model, name)
            layer = by_name.get(node.output[0])
            if layer is None:
                raise FdsubError(f"{name!r} is not a layer (Conv, pooling or fully connected); "
                                 "`fdsub inspect` lists them")
            if not layer.decodable:
                notes.append(f"{layer.name}: not decodable ({layer.reason})")
            elif layer.channels is None:
                notes.append(f"{layer.name}: unknown channel count")
            elif layer.name not in picked:
                picked.append(layer.name)
        return picked, notes
    fits = [lay for lay in summary.layers if lay.decodable and lay.channels
            and (every or max_rf is None
                 or lay.per_position  # decoded by the adjoint at one position: cheap at any depth
                 or (lay.receptive_field is not None and max(lay.receptive_field) <= max_rf))]
    if not fits:
        bound = f" with a receptive field of at most {max_rf} px" if max_rf is not None else ""
        return [], [f"no decodable layer{bound}"]
    if every:
        return [lay.name for lay in fits], []
    return [fits[i].name for i in spread(len(fits), sample)], []


def _spread(channels: int, count: int) -> np.ndarray:
    """``count`` neuron indices evenly spaced over ``channels`` (all of them when fewer)."""
    return np.unique(np.round(np.linspace(0, channels - 1, min(count, channels))).astype(np.int64))
