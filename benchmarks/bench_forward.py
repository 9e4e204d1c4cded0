"""Benchmark: how close the cost plan's time for onnxruntime's forward passes comes to the time they take.

For each network, the forward pass to its outputs (VGG19: its last convolution), timed over a batch of 8
synthetic images (one at a time where the export fixes the batch), against ``plan.forward_work`` at
``modes.cost``'s rates; with ``--fds`` also ``gather_statistics``'s two passes over 100 built-in images against
``fds_stages`` (a late layer of ResNet50, EfficientNet-B0 and MobileNetV2); with ``--local`` the ``local`` passes
of six layers against ``instance_stage`` (``capture_top``, then ``fd.decode(mode="local")`` over the same built-in
images in one process: the passes' time is the decode's less the capture). Run with the project's venv after
``bench_compose.py prepare`` (and ``bench_drift.py prepare`` for ResNet50, ``bench_scale.py prepare`` for
EfficientNet-Lite2); the exports are torchvision's at random init, so the times are the architectures'.

    .venv/bin/python benchmarks/bench_forward.py [--models vgg19,resnet50,...] [--fds] [--local]
    ~/.cache/fdsub-bench/venv/bin/python benchmarks/bench_forward.py prepare   (exports MORE with torchvision)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench_compose  # noqa: E402
from bench_compose import EXPORTED, model_path  # noqa: E402

#: exported by ``prepare`` here beside bench_compose's: grouped convolutions, attention, shifted windows
MORE = ("resnext50_32x4d", "vit_b_16", "swin_t")
bench_compose.EXPORTED += MORE
if __name__ == "__main__" and sys.argv[1:2] == ["prepare"]:  # torch's venv, which has no onnxruntime
    bench_compose.prepare(MORE)
    sys.exit(0)

import fdsub_onnx as fd  # noqa: E402
from fdsub_onnx.compose.backend import session  # noqa: E402
from fdsub_onnx.graph.model import ancestors, find_layer  # noqa: E402
from fdsub_onnx.graph.prune import pruned  # noqa: E402
from fdsub_onnx.modes import cost  # noqa: E402
from fdsub_onnx.modes.fds import gather_statistics  # noqa: E402
from fdsub_onnx.modes.plan import forward_work  # noqa: E402

#: the fds passes timed with --fds: a late layer of each network
FDS_LAYERS = {"resnet50": "layer3.5.conv2",
              "efficientnet_b0": "/features/features.5/features.5.2/block/block.3/block.3.0/Conv_output_0",
              "mobilenet_v2": "/features/features.12/conv/conv.1/conv.1.0/Conv_output_0"}


def outputs(model, name: str) -> list[str]:
    if name == "vgg19":  # its classifier's Reshape fixes the batch: up to the last convolution
        return [[n for n in model.nodes if n.op_type == "Conv"][-1].output[0]]
    return [o.name for o in model.proto.graph.output]


def forward_row(name: str) -> dict:
    """Seconds per image of onnxruntime's forward (best of 3 runs over a batch) against the plan's."""
    model = fd.load_model(str(model_path(name)))
    targets = outputs(model, name)
    products, slow, moved = forward_work(model, ancestors(model, targets))
    planned = cost.onnxruntime_seconds(model, targets)
    for batch in (8, 1):  # some exports fix the batch in their reshapes
        sess = session(pruned(model.proto, targets, model.input_name, batch="N" if batch > 1 else None))
        x = np.random.default_rng(0).standard_normal((batch, *model.input_shape[1:])).astype(np.float32)
        try:
            sess.run(None, {model.input_name: x})
        except Exception:
            continue
        best = min(_timed(sess, {model.input_name: x}, 8 // batch) for _ in range(3)) / 8
        return {"model": name, "products_gflop": products / 1e9, "slow_gflop": slow / 1e9,
                "moved_mb": moved / 1e6, "taken_ms": best * 1e3, "planned_ms": planned * 1e3}
    raise SystemExit(f"{name}: onnxruntime cannot run it")


def fds_row(name: str, count: int = 100) -> dict:
    """The two fds passes' seconds (split where the progress crosses half the images) against ``fds_stages``."""
    model = fd.load_model(str(model_path(name)))
    target = find_layer(model, FDS_LAYERS[name]).output[0]
    images = fd.open_images(f"builtin:blobs:{count}", tuple(model.input_shape[1:]))
    marks, start = [], time.perf_counter()
    gather_statistics(model, [target], images, top=16,
                      progress=lambda done, total: marks.append((time.perf_counter() - start, done, total)))
    end = time.perf_counter() - start
    half = next(t for t, done, total in marks if done >= total // 2)
    first, second = cost.fds_stages(model, [target], count)[:2]
    return {"model": name, "first_s": half, "second_s": end - half, "first_planned_s": first.seconds,
            "second_planned_s": second.seconds}


#: the local passes timed with --local: (network, layer, images, top, neurons); instances = top x neurons
LOCAL_ROWS = (("vgg19", "r34", 32, 1, "0-31"), ("resnet50", "layer4.2.conv2", 16, 2, "0-15"),
              ("efficientnet_b0", "features.8.0", 32, 4, "0-31"), ("mobilenet_v2", "features.18.0", 32, 4, "0-31"),
              ("lite2", "/_blocks.12/_project_conv/Conv_output_0", 64, 16, "0-15"),
              ("lite2", "/_conv_head/Conv_output_0", 64, 16, "0-15"))


def local_row(name: str, layer: str, count: int, top: int, neurons: str) -> dict:
    """The local passes' seconds (the decode's less its capture of the same images) against ``instance_stage``."""
    from fdsub_onnx.runtime.capture import capture_top

    path = bench_compose.CACHE / "scale" / "efficientnet_lite2_260.onnx" if name == "lite2" else model_path(name)
    model = fd.load_model(str(path))
    images = fd.open_images(f"builtin:blobs:{count}", tuple(model.input_shape[1:]))
    start = time.perf_counter()
    capture_top(model, layer, images, top=top, neurons=neurons)
    capture = time.perf_counter() - start
    start = time.perf_counter()
    fd.decode(model, layer, neurons=neurons, mode="local", images=images, top=top)
    taken = time.perf_counter() - start - capture
    instances = top * (int(neurons.split("-")[1]) - int(neurons.split("-")[0]) + 1)
    planned = cost.instance_stage(model, find_layer(model, layer).output[0], instances).seconds
    return {"model": name, "layer": layer, "instances": instances, "taken_s": taken, "planned_s": planned}


def _timed(sess, feed, runs: int) -> float:
    start = time.perf_counter()
    for _ in range(runs):
        sess.run(None, feed)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(("vgg19", "resnet50", *EXPORTED, *MORE)))
    parser.add_argument("--fds", action="store_true", help="also the fds passes of ResNet50, EfficientNet-B0, "
                        "MobileNetV2")
    parser.add_argument("--local", action="store_true", help="also the local passes of six layers")
    args = parser.parse_args(argv)
    print("| model | products GFLOP | slow products GFLOP | moved MB | taken ms/image | planned ms/image "
          "| plan / taken |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in args.models.split(","):
        if name != "vgg19" and not model_path(name).exists():
            print(f"| {name} | (not exported: bench_compose.py prepare) |")
            continue
        r = forward_row(name)
        print(f"| {name} | {r['products_gflop']:.2f} | {r['slow_gflop']:.2f} | {r['moved_mb']:.0f} | "
              f"{r['taken_ms']:.2f} | {r['planned_ms']:.2f} | {r['planned_ms'] / r['taken_ms']:.2f} |")
    if args.fds:
        print("\n| model | first pass s (planned) | second pass s (planned) | plan / taken |")
        print("| --- | --- | --- | --- |")
        for name in FDS_LAYERS:
            r = fds_row(name)
            print(f"| {name} | {r['first_s']:.1f} ({r['first_planned_s']:.1f}) | {r['second_s']:.1f} "
                  f"({r['second_planned_s']:.1f}) | {r['first_planned_s'] / r['first_s']:.2f}, "
                  f"{r['second_planned_s'] / r['second_s']:.2f} |")
    if args.local:
        print("\n| model | layer | instances | passes s | planned s | plan / taken |")
        print("| --- | --- | --- | --- | --- | --- |")
        for row in LOCAL_ROWS:
            r = local_row(*row)
            print(f"| {r['model']} | {r['layer']} | {r['instances']} | {r['taken_s']:.2f} | {r['planned_s']:.1f} | "
                  f"{r['planned_s'] / r['taken_s']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
