"""Capture throughput: `capture_top` (streaming top-N of every neuron of a layer) against plain onnxruntime
inference of the same graph on the same images, in the same process. Target (issue 3): overhead <= 1.15x.

    PYTHONPATH=. python benchmarks/bench_capture.py [--images 256] [--batch 32] [--repeat 3]

Models: the bundled demo model (layer conv4) and the onnx package's light ResNet50 topology with weights
re-randomized (fdsub_onnx/evaluate/zoo.py, graph/randomize.py), captured at res3 (r68) and at its last conv
(r168); with ``--model PATH --layers A,B --photos DIR`` (``--preset``) a real network over real photographs
instead (bench_scale.py's EfficientNet-Lite and crops). The baseline runs a plain onnxruntime session, with
onnxruntime's default options, whose only output is the layer (the graph pruned the same way), batched the same
way, and does nothing with the result; the images are already in memory for both. Best of --repeat runs
each; wall-clock times.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import onnx
from rich.console import Console
from rich.table import Table

import fdsub_onnx as fd
from fdsub_onnx.evaluate.zoo import light_path, randomized
from fdsub_onnx.graph.prune import pruned


def plain(model, layer, images, batch):
    import onnxruntime as ort

    session = ort.InferenceSession(pruned(model.proto, layer, model.input_name, batch="N").SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    for start in range(0, len(images), batch):
        session.run([layer], {model.input_name: images[start : start + batch]})


def best(fn, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--top", type=int, default=100)
    parser.add_argument("--model", default=None, help="a real model instead of the built-in cases")
    parser.add_argument("--layers", default=None, help="with --model: comma-separated layers")
    parser.add_argument("--photos", default=None, help="with --model: a folder of photographs (else noise)")
    parser.add_argument("--preset", default="torchvision")
    args = parser.parse_args()
    if args.model:
        cases = [(os.path.basename(args.model), args.model, layer, args.images) for layer in args.layers.split(",")]
    else:
        folder = tempfile.mkdtemp()
        resnet = os.path.join(folder, "resnet50.onnx")
        onnx.save(randomized(light_path("resnet50")), resnet)
        cases = [("demo", os.path.join(os.path.dirname(__file__), "..", "models", "demo.onnx"), "conv4",
                  args.images), ("resnet50", resnet, "r68", args.images // 4),
                 ("resnet50", resnet, "r168", args.images // 4)]
    table = Table(title=f"capture_top (top {args.top}, all neurons) vs plain onnxruntime, batch {args.batch}, "
                        f"best of {args.repeat}")
    for column in ("model", "layer", "images", "plain ORT (s)", "capture (s)", "images/s", "overhead"):
        table.add_column(column, justify="left" if column in ("model", "layer") else "right")
    rng = np.random.default_rng(0)
    for name, path, layer, count in cases:
        model = fd.load_model(path)
        if args.photos:
            found = fd.open_images(args.photos, model.input_shape[1:], preset=args.preset)
            images = np.concatenate([batch for _, batch in found.batches(64)])[:count]
            count = len(images)
        else:
            images = rng.standard_normal((count, *model.input_shape[1:])).astype(np.float32)
        base = best(lambda m=model, lay=layer, x=images: plain(m, lay, x, args.batch), args.repeat)
        ours = best(lambda m=model, lay=layer, x=images: fd.capture_top(m, lay, fd.ArrayImages(x), top=args.top,
                                                                        batch_size=args.batch), args.repeat)
        table.add_row(name, layer, str(count), f"{base:.2f}", f"{ours:.2f}", f"{count / ours:.1f}",
                      f"{ours / base:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
