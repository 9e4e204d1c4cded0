"""Benchmark: ``fds`` mode for all neurons of a layer against a per-neuron gradient baseline (issue 3).

fdsub side: ``fd.decode(model, layer, mode="fds", images=fd.ArrayImages(x), top=100)``, all neurons,
timed end to end: it includes the top-N capture and the input-window statistics of every
substituted node below the layer (two onnxruntime passes over the images per Conv/MaxPool), then
the bottom-up composition.

Baseline: what a Captum user runs to get per-instance attributions of every neuron
(``NeuronGradient`` / ``NeuronDeconvolution``, which cost the same): per neuron, one forward and
one backward through the *real* network (ReLU, MaxPool; torch CPU) on the batch of that neuron's
top-100 instance images, each image's own position selected by a gather so the input gradients
are per instance. The instances are fdsub's own (``fd.capture_top``), so both sides use the same.
Sampled neurons, extrapolated to the layer. A second, slower baseline (one forward + backward per
instance, batch 1) is sampled on a few instances and reported separately.

Run (from the repository root, 2 cores; about 1 to 2 min):

    PYTHONPATH=. python benchmarks/bench_fds.py                       # conv3_4 and conv4_4, 64x64, 256 images
    PYTHONPATH=. python benchmarks/bench_fds.py --layers conv3_4      # one layer

See benchmarks/README.md for what is measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# Imported first: it fixes the thread counts (from --threads) before NumPy and torch are imported.
from bench_weights_vgg19 import (
    ConvSpec,
    CpuMonitor,
    environment,
    openblas_core,
    sample_channels,
    show_table,
    vgg19_convs,
    vgg19_onnx,
    vgg19_torch,
)

# isort: split
import numpy as np
import onnx

import fdsub_onnx as fd

HERE = Path(__file__).resolve().parent


def real_vgg19_torch(convs: list[ConvSpec], upto: str):
    """The real VGG19 features ending at conv ``upto``, parameters frozen (input gradients only, as NeuronGradient)."""
    net, _ = vgg19_torch(convs, upto)
    for p in net.parameters():
        p.requires_grad_(False)
    return net


@dataclass
class Row:
    layer: str
    neurons: int
    rf: int
    images: int
    top: int
    fdsub_s: float = 0.0
    statistics_s: float = 0.0  # split run: fd.gather_statistics alone (captures + window means of every node below)
    compose_s: float = 0.0  # split run: fd.decode(..., substitution=...) alone (the bottom-up composition)
    capture_s: float = 0.0  # fd.capture_top of the layer alone (for the baseline's instances; not in fdsub_s)
    baseline_ms_per_neuron: float = 0.0
    baseline_extrapolated_s: float = 0.0
    ratio: float = 0.0
    per_instance_ms: float = 0.0
    per_instance_extrapolated_s: float = 0.0
    per_instance_ratio: float = 0.0
    samples: list[int] = field(default_factory=list)
    baseline_times_ms: list[float] = field(default_factory=list)
    per_instance_times_ms: list[float] = field(default_factory=list)
    grad_finite: bool = True
    grad_min_abs_sum: float = 0.0  # smallest per-instance sum |gradient| among the sampled instances


def neuron_gradients(net, images, k: int, rows, cols):
    """Per-instance input gradients of neuron k at (rows[i], cols[i]) of image i: one forward + one backward."""
    import torch

    x = images.clone().requires_grad_(True)
    out = net(x)  # [B, C, H, W]
    picked = out[torch.arange(len(x)), k, rows, cols]  # the instances are independent: grad of the sum is per image
    (grad,) = torch.autograd.grad(picked.sum(), x)
    return grad


def run_baseline(net, x, top, row: Row, per_instance: int):
    import torch

    images = torch.from_numpy(x)
    valid = top.image_index >= 0

    def instances(i):
        keep = valid[i]
        idx = torch.from_numpy(top.image_index[i][keep])
        pos = torch.from_numpy(top.position[i][keep])
        return images[idx], pos[:, 0], pos[:, 1]

    first = instances(0)
    neuron_gradients(net, *first[:1], row.samples[0], *first[1:])  # warm-up (allocator, oneDNN), not timed
    times, min_abs, finite = [], float("inf"), True
    for i, k in enumerate(row.samples):
        batch, rows, cols = instances(i)
        t = time.perf_counter()
        grad = neuron_gradients(net, batch, k, rows, cols)
        times.append(time.perf_counter() - t)
        finite &= bool(torch.isfinite(grad).all())
        min_abs = min(min_abs, float(grad.abs().flatten(1).sum(1).min()))
    row.baseline_times_ms = [1e3 * t for t in times]
    row.baseline_ms_per_neuron = 1e3 * float(np.mean(times))
    row.baseline_extrapolated_s = row.baseline_ms_per_neuron / 1e3 * row.neurons
    row.grad_finite, row.grad_min_abs_sum = finite, min_abs

    # The literal per-instance loop: one forward + backward of one image (batch 1) per instance.
    batch, rows, cols = instances(0)
    k = row.samples[0]
    neuron_gradients(net, batch[:1], k, rows[:1], cols[:1])  # warm-up for batch 1
    one = []
    for j in range(min(per_instance, len(batch))):
        t = time.perf_counter()
        grad = neuron_gradients(net, batch[j : j + 1], k, rows[j : j + 1], cols[j : j + 1])
        one.append(time.perf_counter() - t)
        row.grad_finite &= bool(torch.isfinite(grad).all())
    row.per_instance_times_ms = [1e3 * t for t in one]
    row.per_instance_ms = 1e3 * float(np.mean(one))
    filled = int(valid.sum(1).mean())
    row.per_instance_extrapolated_s = row.per_instance_ms / 1e3 * filled * row.neurons


def print_table(rows: list[Row], title: str):
    header = [
        "layer",
        "neurons",
        "RF",
        "fdsub fds (s)",
        "stats + compose (s)",
        "baseline ms/neuron",
        "baseline extrap. (s)",
        "ratio",
        "per-instance ms",
        "per-instance extrap. (s)",
        "ratio",
    ]
    body = [
        [
            r.layer,
            str(r.neurons),
            str(r.rf),
            f"{r.fdsub_s:.2f}",
            f"{r.statistics_s:.1f} + {r.compose_s:.1f}" if r.statistics_s else "-",
            f"{r.baseline_ms_per_neuron:.0f}",
            f"{r.baseline_extrapolated_s:.0f}",
            f"{r.ratio:.1f}x",
            f"{r.per_instance_ms:.1f}",
            f"{r.per_instance_extrapolated_s:.0f}",
            f"{r.per_instance_ratio:.0f}x",
        ]
        for r in rows
    ]
    show_table(title, header, body)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--layers", nargs="+", default=["conv3_4", "conv4_4"], help="conv layers (default conv3_4 conv4_4)"
    )
    parser.add_argument("--size", type=int, default=64, help="input size (default 64)")
    parser.add_argument("--images", type=int, default=256, help="number of standard-normal images (default 256)")
    parser.add_argument("--top", type=int, default=100, help="instances per neuron (default 100)")
    parser.add_argument("--sample", type=int, default=4, help="baseline neurons per layer, extrapolated (default 4)")
    parser.add_argument(
        "--per-instance", type=int, default=10, help="instances timed in the batch-1 baseline (default 10)"
    )
    parser.add_argument(
        "--no-split", action="store_true", help="skip the second fdsub run timing statistics and composition apart"
    )
    parser.add_argument(
        "--threads", type=int, default=2, help="threads for NumPy/OpenBLAS, torch, onnxruntime (default 2)"
    )
    parser.add_argument("--seed", type=int, default=0, help="weight and image seed (default 0)")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "fds.json", help="where to write the results")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    convs = vgg19_convs(args.seed)
    x = np.random.default_rng(args.seed).standard_normal((args.images, 3, args.size, args.size)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "vgg19.onnx")
        onnx.save(vgg19_onnx(convs, args.size), path)
        model = fd.load_model(path)
    layers = {layer.name: layer for layer in fd.inspect_model(model).layers}
    print(
        f"VGG19 topology (random He weights) at {args.size}x{args.size}, {args.images} standard-normal images, "
        f"top {args.top}; {args.threads} threads (OpenBLAS kernel {openblas_core()}); baseline: {args.sample} "
        f"neurons/layer + {args.per_instance} batch-1 instances",
        flush=True,
    )
    fd_cpu, base_cpu = CpuMonitor(), CpuMonitor()
    rows = []
    for name in args.layers:
        layer = layers[name]
        row = Row(
            name,
            layer.channels,
            layer.receptive_field[0],
            args.images,
            args.top,
            samples=sample_channels(layer.channels, args.sample),
        )
        with fd_cpu:
            t = time.perf_counter()
            decoded = fd.decode(model, name, mode="fds", images=fd.ArrayImages(x), top=args.top)
            row.fdsub_s = time.perf_counter() - t
        assert decoded.filters.shape[0] == layer.channels and np.isfinite(decoded.filters).all()
        del decoded
        print(f"  fdsub    {name}: fds decode of {layer.channels} neurons {row.fdsub_s:.2f} s", flush=True)
        if not args.no_split:
            with fd_cpu:
                t = time.perf_counter()
                sub = fd.gather_statistics(
                    model, [fd.find_layer(model, name).output[0]], fd.ArrayImages(x), top=args.top
                )
                row.statistics_s = time.perf_counter() - t
                t = time.perf_counter()
                fd.decode(model, name, mode="fds", substitution=sub)
                row.compose_s = time.perf_counter() - t
            del sub
            print(
                f"           split: statistics {row.statistics_s:.2f} s + composition {row.compose_s:.2f} s", flush=True
            )
        t = time.perf_counter()
        top = fd.capture_top(model, name, fd.ArrayImages(x), top=args.top, neurons=row.samples)
        row.capture_s = time.perf_counter() - t
        gc.collect()  # drop fdsub's onnxruntime sessions before timing torch
        net = real_vgg19_torch(convs, name)
        with base_cpu:
            run_baseline(net, x, top, row, args.per_instance)
        row.ratio = row.baseline_extrapolated_s / row.fdsub_s
        row.per_instance_ratio = row.per_instance_extrapolated_s / row.fdsub_s
        print(
            f"  baseline {name}: {row.baseline_ms_per_neuron:.0f} ms/neuron (batch of {args.top}), "
            f"{row.per_instance_ms:.1f} ms/instance (batch 1); gradients finite: {row.grad_finite}, "
            f"smallest per-instance sum |grad| {row.grad_min_abs_sum:.3g}",
            flush=True,
        )
        rows.append(row)

    title = (
        f"fds mode, all neurons, top {args.top} of {args.images} images at {args.size}, {args.threads} threads; "
        f"baseline: per-neuron gradient, {args.sample} neurons/layer, extrapolated"
    )
    print_table(rows, title)
    wall = time.perf_counter() - wall
    load = {"fdsub": fd_cpu.share(), "baseline": base_cpu.share()}
    print(
        f"wall: total {wall:.1f} s; machine load from other processes: {100 * load['fdsub']['others']:.0f}% during "
        f"fdsub, {100 * load['baseline']['others']:.0f}% during the baseline"
    )
    if max(v["others"] + v["steal"] for v in load.values()) > 0.10:
        print("WARNING: other processes used more than 10% of the CPUs: the timings are disturbed")

    ok = all(r.grad_finite and r.grad_min_abs_sum > 0 for r in rows)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "fds",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": environment(args),
        "rows": [asdict(r) for r in rows],
        "wall_s": wall,
        "other_processes_cpu_share": load,
        "baseline_gradients_ok": ok,
    }
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    if not ok:
        print("FAIL: a baseline gradient is not finite or is zero", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
