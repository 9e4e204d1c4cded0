"""What a command will cost before it runs: the peak memory and the time of each of its stages.

Every command is a sequence of stages (a pass over images, a composition, a pass per instance); the process's
peak is its resident base plus the largest stage's working set, and its time the sum of the stages'. Each
estimate is computed with the same sizing function the stage itself uses to choose its batches
(``fitting_batch``, ``fds.pass_bytes``, ``backward.pass_sizes``, the bank walk, the route planner), so what is
planned is what runs: a plan over the memory budget is refused before any work (``CostPlan.require``).
Times come from FLOP counts and the rates below (this project's 2-core machine: docs/plan.md); they are a
first ETA that the progress lines then correct.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from ..compose.backend import get_backend, usable_cores
from ..compose.engine import Engine
from ..compose.inspect import MEMORY_MARGIN, bank_peak, channels_of, instance_geometry, memory_problem
from ..compose.walker import walk
from ..data.topn import SLOT_BYTES
from ..defaults import DEFAULT_BATCH, DEFAULT_TOP, DEFAULT_WEIGHTING, budget_text, memory_budget
from ..errors import FdsubError
from ..graph.model import Model, ancestors, find_layer, grid
from ..neurons import parse_neurons
from ..runtime.session import FETCHED_BYTES, fitting_batch, image_bytes, tensor_values
from .decode import plan_decode
from .fds import FIX, fetched_tensors, gate_values, pass_bytes
from .gates import NEURON_MEANS_BATCH, NEURON_MEANS_BUDGET, token_factor_values
from .local import PassPlan
from .plan import Costs, forward_work, gradient_flops
from .windows import field_part

#: FLOP/s per core of the NumPy compositions' and backward passes' work outside matrix products (measured on this
#: project's machine, EfficientNet-Lite2 and VGG19: docs/plan.md)
COMPOSE_RATE = 8e9
#: onnxruntime's forward pass per core (``plan.forward_work``): FLOP/s of its dense convolutions and matrix products
#: (MLAS's GEMMs), FLOP/s of its slow products (grouped convolutions' per-group GEMMs: RegNetY, ResNeXt; transposed
#: convolutions' GEMM and scatter, ~60 on a decoder's), and bytes per second of every op's data inputs
#: and outputs (all the time of activations, depthwise convolutions, normalizations and layout). Fitted on twelve
#: networks' forward passes, VGG19 to ViT-B/16, Swin-T and ShuffleNetV2, on this project's 2-core machine: each
#: within 0.79-1.17x of its time, where one FLOP rate for all but matrix products said up to 5x (VGG19;
#: benchmarks/README.md, bench_forward.py)
FORWARD_PRODUCT_RATE, FORWARD_SLOW_PRODUCT_RATE, FORWARD_BYTE_RATE = 110e9, 43e9, 22e9
#: seconds to read one image and resize it to the input (the built-in sets 7 ms, a 1080p JPEG 26 ms, a 260-px PNG
#: crop 3.5 ms on this machine: a first ETA that the progress lines correct)
IMAGE_SECONDS = 7e-3
#: FLOP/s per core of a backward pass's matrix products (``OpRule.matrix_product``; NumPy's BLAS, in float32): a
#: local pass of one image's 3 instances of ViT-S/16 spends 0.09 s of one core per instance in them
#: (benchmarks/README.md, bench_tokens.py)
PRODUCT_RATE = 100e9
#: An adjoint pass's rates per core: a dense convolution's gradient in FLOP/s (``kernels.transposed``: a GEMM over its
#: taps, then their strided adds), and the rest's values per second (elementwise and layout gradients, each value of
#: a map read and written a few times: a mobile network's gates and depthwise maps). Fitted on adjoint decodes of
#: VGG19's conv5_4 (32 neurons), ResNet50's layer4.2.conv2 and DenseNet121's last conv1 (16), EfficientNet-B0's last
#: 1x1 (256) and MobileNetV2's (160); eight decodes with MobileNetV3-large's are planned at 1.02-1.96x of their times,
#: where everything at ``COMPOSE_RATE`` had said 0.45-6.9x (benchmarks/README.md)
CONV_GRADIENT_RATE, GRADIENT_VALUE_RATE = 50e9, 0.35e9
#: The same two rates for ``local`` and ``deconvnet`` passes (one backward pass per image's instances, over their
#: cones): fitted on six layers from VGG19's conv5_4 (32 instances) to EfficientNet-Lite2's conv_head (256), planned
#: at 0.62-1.38x of their passes' time over two runs, where the adjoint's rates said 0.65-2.8x (benchmarks/README.md,
#: bench_forward.py --local)
LOCAL_CONV_RATE, LOCAL_VALUE_RATE = 38e9, 0.8e9
#: seconds per byte of the banks a bottom-up composition makes: their fresh pages and the passes that write them,
#: which on a large network take longer than the products (fitted with ``PRODUCT_RATE`` on this project's 2-core VM
#: over seven networks' all-neuron decodes, VGG19 to RegNetY-400MF, 1.4-49 GB of banks: the plans came within
#: 0.67-1.13x of the times, where all FLOPs at ``COMPOSE_RATE`` had said 1.2-10.9x; benchmarks/README.md)
BANK_SECONDS = 1e-9
#: seconds per value a pass over images fetches from onnxruntime (copied out, then read by the running top-N or cut
#: into windows): the fds first passes of ResNet50, EfficientNet-B0 and MobileNetV2 over 100 images, 6-10 M values
#: an image, spent 0.7-2.9 ns a value beyond their forward, EfficientNet-Lite2's in the default report 1.45
#: (benchmarks/README.md, bench_forward.py --fds, bench_scale.py)
FETCH_SECONDS = 1.5e-9
#: seconds per value of a gate map in the fds second pass (slopes, their products, the windows cut) beside its
#: forward and fetches: 1.9 ns on EfficientNet-Lite2 in the default report (20 M gate values an image), 4.1-9.5 on
#: MobileNetV2, EfficientNet-B0 and ResNet50 over 100 built-in images; their geometric mean
GATE_SECONDS = 4.6e-9
#: the process before a command allocates: Python, NumPy, onnx and onnxruntime loaded
PROCESS_BYTES = 180 << 20
NF_SECONDS = 1e-3  # per image read by the Neuron Feature (its sums are cheap beside reading the image)


@dataclass
class Stage:
    """One stage of a command: its working set above the process's base, its time, and what its progress counts."""

    what: str
    peak_bytes: float
    seconds: float
    count: int = 0
    unit: str = "images"


@dataclass
class CostPlan:
    """A command's stages and what they add up to, against the memory budget."""

    command: str
    stages: list[Stage]
    base_bytes: float
    budget: int = field(default_factory=memory_budget)
    notes: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> float:
        return self.base_bytes + max((s.peak_bytes for s in self.stages), default=0.0)

    @property
    def seconds(self) -> float:
        return float(sum(s.seconds for s in self.stages))

    @property
    def peak_stage(self) -> Stage | None:
        return max(self.stages, key=lambda s: s.peak_bytes, default=None)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.budget

    def lines(self) -> list[str]:
        """The plan as text: one line per stage, then the total against the budget."""
        out = [f"{self.command}: about {_bytes(self.peak_bytes)} at the peak, {_seconds(self.seconds)} "
               f"({'fits' if self.fits else 'does not fit'} in {budget_text()})"]
        out += [f"  {s.what}: {_bytes(s.peak_bytes)} above the base, {_seconds(s.seconds)}" for s in self.stages]
        out.append(f"  base (the process and the model): {_bytes(self.base_bytes)}")
        return out + [f"  note: {n}" for n in self.notes]

    def require(self, fix: str) -> None:
        """Refuse, in one line and before any work, a plan whose peak is over the memory budget."""
        if not self.fits:
            stage = self.peak_stage
            raise FdsubError(f"{self.command} needs about {_bytes(self.peak_bytes)} at its peak ({stage.what}), "
                             f"over {budget_text()}; {fix}")


def base_bytes(model: Model) -> float:
    """The process, the model as loaded, and onnxruntime's copy of its weights."""
    weights = sum(np.asarray(v).nbytes for v in model.constants.values())
    size = os.path.getsize(model.path) if model.path and os.path.exists(model.path) else weights
    return PROCESS_BYTES + size + 2 * weights


def forward_seconds(model: Model, fetched, count: int) -> float:
    """The time to read ``count`` images, run them through the graph below ``fetched`` (tensor names) in
    onnxruntime and fetch those tensors."""
    fetched = list(fetched)
    return count * (onnxruntime_seconds(model, fetched) + IMAGE_SECONDS
                    + tensor_values(model, fetched) * FETCH_SECONDS)


def onnxruntime_seconds(model: Model, targets) -> float:
    """onnxruntime's time for one image through the graph below ``targets``, on every core."""
    products, slow, moved = forward_work(model, ancestors(model, list(targets)))
    return (products / FORWARD_PRODUCT_RATE + slow / FORWARD_SLOW_PRODUCT_RATE + moved / FORWARD_BYTE_RATE) \
        / usable_cores()


def capture_stage(model: Model, target: str, count: int, batch_size: int = DEFAULT_BATCH) -> Stage:
    """``capture_top``: batches of images through onnxruntime, the layer's activations fetched."""
    per_image = image_bytes(model, [target]) + FETCHED_BYTES * tensor_values(model, [target])
    batch = fitting_batch(per_image, batch_size, "the top-N capture", "use a smaller --batch-size")
    return Stage(f"top-N capture of {target!r} over {count} images", batch * per_image,
                 forward_seconds(model, [target], count), count)


def fds_stages(model: Model, targets, count: int, rows: dict | None = None, batch_size: int = DEFAULT_BATCH,
               weighting: str = DEFAULT_WEIGHTING, dtype: str = "float32", neurons: dict | None = None
               ) -> list[Stage]:
    """``gather_statistics``'s two passes over the images, then the composition of the substituted banks
    (``compose_stage``; ``rows``: the bottom-up pass's, ``neurons``: target -> the neurons asked)."""
    first, second = pass_bytes(model, targets, weighting)
    gates = count * gate_values(model, targets, weighting) * GATE_SECONDS
    stages = []
    for label, per_image, fetched, extra in zip(("first", "second"), (first, second),
                                                fetched_tensors(model, targets, weighting), (0.0, gates)):
        batch = fitting_batch(per_image, batch_size, f"the {label} pass of the fds statistics", FIX)
        stages.append(Stage(f"fds statistics, {label} pass over {count} images (batches of {batch})",
                            batch * per_image, forward_seconds(model, fetched or targets, count) + extra, count))
    stages += compose_stage(model, targets, rows, dtype, "fds", neurons)
    return stages + [stage for t in targets if (stage := _neuron_means_stage(model, t, count, (neurons or rows or
                                                                                               {}).get(t)))]


def _neuron_means_stage(model: Model, target: str, count: int, neurons) -> Stage | None:
    """fds's attention and layer norms held per neuron (``gates.neuron_means``): per group of neurons whose sums fit,
    one pass over the images holding their instances (at most all ``count``); None where none is below ``target``."""
    values = token_factor_values(model, target)
    if not values:
        return None
    wanted = len(parse_neurons(neurons, channels_of(model, target), target))
    group = max(1, NEURON_MEANS_BUDGET // (8 * values))
    passes = -(-wanted // group)
    return Stage(f"fds: attention and layer norms held per neuron of {target!r} ({passes} pass(es) over the images "
                 "holding their instances)", (min(wanted, group) + NEURON_MEANS_BATCH) * 8 * values,
                 passes * forward_seconds(model, [target], count), count)


def compose_stage(model: Model, targets, rows: dict | None, dtype: str, mode: str, neurons: dict | None = None
                  ) -> list[Stage]:
    """The composition of ``targets``' banks (``rows``: target -> neurons composed), as ``decode`` runs it: bottom-up
    in one pass where the banks fit, else each layer by the route the planner picks for the neurons asked
    (``neurons``, default ``rows``) over the same shapes (fds's adjoint runs over the substituted weights)."""
    engine = Engine(get_backend("numpy"), dtype)
    targets = list(targets)
    if not memory_problem(model, engine, targets, rows):
        costs = Costs(dtype)  # an engine that counts instead of composing
        for _ in walk(model, costs, targets=targets, compose=True, rows=rows):
            pass
        return [Stage(f"{mode} composition of {len(targets)} layer(s), bottom-up",
                      bank_peak(model, engine, targets, rows) * MEMORY_MARGIN,
                      composition_seconds(costs.flops, costs.product_flops, costs.bank_bytes))]
    neurons = {t: (neurons or rows or {}).get(t) for t in targets}
    return [weights_stage(plan, mode) for plan in plan_decode(model, targets, neurons=neurons, dtype=dtype).values()]


def weights_stage(plan, mode: str = "weights") -> Stage:
    """One layer decoded by the route its ``Plan`` chose."""
    seconds = (adjoint_seconds(plan.flops, plan.product_flops, plan.conv_flops) if plan.route == "adjoint" else
               composition_seconds(plan.flops, plan.product_flops, plan.bank_bytes))
    return Stage(f"{mode} decode of {plan.layer!r} ({plan.route}, {plan.neurons} neurons)", plan.peak_bytes,
                 seconds, plan.neurons, "neurons")


def composition_seconds(flops: float, product_flops: float, bank_bytes: float = 0.0) -> float:
    """The time of a bottom-up composition: its matrix products at BLAS's rate, the rest at NumPy's, over the cores,
    and the banks it makes at ``BANK_SECONDS`` a byte."""
    return ((flops - product_flops) / COMPOSE_RATE + product_flops / PRODUCT_RATE) / usable_cores() \
        + bank_bytes * BANK_SECONDS


def adjoint_seconds(flops: float, product_flops: float, conv_flops: float) -> float:
    """The time of an adjoint decode's passes (``gradient_seconds``) over the cores."""
    return gradient_seconds(product_flops, conv_flops, flops - product_flops - conv_flops) / usable_cores()


def gradient_seconds(products: float, convs: float, rest: float,
                     rates: tuple[float, float] = (CONV_GRADIENT_RATE, GRADIENT_VALUE_RATE)) -> float:
    """One core's time for backward passes (``plan.gradient_flops``): matrix products at BLAS's rate, dense
    convolutions' gradients and every other value at ``rates`` (an adjoint decode's by default)."""
    return products / PRODUCT_RATE + convs / rates[0] + rest / rates[1]


def instance_stage(model: Model, target: str, instances: int, rule: str = "local", dtype: str = "float32",
                   most: int = 128, neurons: int | None = None) -> Stage:
    """``decode_instances``: one onnxruntime run per image, one backward pass per run of its instances, as many
    passes at once as cores; the cut of each instance's field restricts it (its cone). Timed by its dense
    convolutions' gradients and its other values (``gradient_seconds`` at the ``LOCAL_*`` rates; all at NumPy's rate
    planned VGG19's conv5_4, 32 instances, at 156 s for 20 s of work, the adjoint's rates EfficientNet-Lite2's
    conv_head, 256 instances, at 67 s for 27.5)."""
    backend = get_backend("numpy")
    workers = backend.workers
    plan = PassPlan(model, target, instance_geometry(model, target), most, backend, np.dtype(dtype).itemsize)
    if not plan.spread:
        plan.per_pass = min(plan.per_pass, neurons or plan.per_pass)  # one image's instances: one per neuron at most
    peak = plan.peak()
    seconds = gradient_seconds(*gradient_flops(model, ancestors(model, [target])),
                               (LOCAL_CONV_RATE, LOCAL_VALUE_RATE)) * _cone_share(model, target)
    return Stage(f"{rule} passes of {target!r}: {instances} instances", peak,
                 instances * seconds / max(workers, 1), instances, "instances")


def _cone_share(model, target) -> float:
    """The share of a whole-image pass that one instance's cone covers: its receptive field over the image."""
    rf = instance_geometry(model, target).rf
    size = model.input_shape[2:]
    return float(min(1.0, max(0.05, (rf[0] * rf[1]) / (size[0] * size[1]))))


def nf_stage(model: Model, target: str, neurons: int, count: int, batch_size: int = DEFAULT_BATCH) -> Stage:
    """``neuron_feature``: the images holding instances, read in batches; per-pixel sums per neuron."""
    rf = instance_geometry(model, target).rf
    channels = int(model.input_shape[1])
    sums = 2 * 8 * neurons * channels * rf[0] * rf[1]
    batch = min(batch_size, max(count, 1))
    return Stage(f"Neuron Feature of {target!r}", sums + 8 * batch * tensor_values(model, [model.input_name]),
                 count * NF_SECONDS, count)


def _bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


# ---- commands ------------------------------------------------------------------------------------------------
def filters_bytes(model: Model, target: str, neurons: int, itemsize: int = 4) -> float:
    """What a result holds: ``neurons`` filters over the part of the layer's receptive field that meets the image
    for some position (``windows.field_part``: 516 x 516 px of conv_head's 1,115 on EfficientNet-Lite2)."""
    kept = field_part(instance_geometry(model, target), model.input_shape[2:], grid(model, target))[1]
    return float(neurons) * int(model.input_shape[1]) * kept[0] * kept[1] * itemsize


def estimate_decode(model: Model, layer: str, neurons=None, mode: str = "weights", images: int = 0,
                    top: int = DEFAULT_TOP, batch_size: int = DEFAULT_BATCH, dtype: str = "float32", position=None,
                    route: str = "auto") -> CostPlan:
    """The cost of ``decode`` (``images``: how many the data modes read), before any work."""
    target = find_layer(model, layer).output[0]
    picked = parse_neurons(neurons, channels_of(model, target), target)
    k = len(picked)
    if mode == "weights":
        plan = plan_decode(model, [target], neurons=picked, positions={target: position}, dtype=dtype,
                           route=route)[target]
        stages = [weights_stage(plan)]
    elif mode == "fds":
        stages = fds_stages(model, [target], images, {target: picked}, batch_size, dtype=dtype)
    else:
        stages = [capture_stage(model, target, images, batch_size),
                  instance_stage(model, target, k * min(top, images), mode, dtype, neurons=k)]
    result = Stage(f"the {k} filters of {target!r} (decoded.npz)", 2 * filters_bytes(model, target, k, 8), 0.0)
    return CostPlan(f"decode --mode {mode}", stages + [result], base_bytes(model))


def estimate_top(model: Model, layer: str, neurons=None, images: int = 0, top: int = DEFAULT_TOP,
                 batch_size: int = DEFAULT_BATCH) -> CostPlan:
    """The cost of ``capture_top``: the scan, and the instances kept (and the copies a merge makes)."""
    target = find_layer(model, layer).output[0]
    k = len(parse_neurons(neurons, channels_of(model, target), target))
    scan = capture_stage(model, target, images, batch_size)
    scan.peak_bytes += 3.0 * k * top * SLOT_BYTES
    return CostPlan("top", [scan], base_bytes(model))


def estimate_nf(model: Model, layer: str, neurons=None, images: int = 0, top: int = DEFAULT_TOP,
                batch_size: int = DEFAULT_BATCH) -> CostPlan:
    """The cost of ``nf``: the top-N scan, then the Neuron Feature of each neuron."""
    target = find_layer(model, layer).output[0]
    k = len(parse_neurons(neurons, channels_of(model, target), target))
    return CostPlan("nf", [*estimate_top(model, target, neurons, images, top, batch_size).stages,
                           nf_stage(model, target, k, min(images, k * top), batch_size)], base_bytes(model))
