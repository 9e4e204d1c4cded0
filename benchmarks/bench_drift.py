"""Benchmark: ``fdsub diff`` against onnxruntime's ``qdq_loss_debug`` on a quantized copy with one damaged layer,
and the time of a diff against the time of decoding one model (issue 26).

1. Damage: MobileNetV2 (torchvision, random init, BatchNorm statistics measured, 224 px) quantized to int8 QDQ by
   onnxruntime (per-channel weights, calibrated on 16 photographs), then one depthwise convolution's weights
   re-quantized per tensor (one scale for its 384 channels instead of one each: the damage a per-tensor setting or
   a bad export does). Which tool ranks the damaged layer first, and with how many images:
   - ``fdsub diff`` (data-free filter drift; with N images activation drift), each layer scored by its mean over
     the neurons, and by its jump (its score minus the largest score of the layers it reads from);
   - ``qdq_loss_debug``: ``compute_weight_error`` (SQNR of each weight tensor, float against dequantized: data-free)
     and ``compute_activation_error`` (SQNR of each activation, float model against QDQ model, on N images), lower
     SQNR is worse; the jump is the drop from the layer before.
   BatchNorm scales are drawn log-uniform over [e^-3, e^1] (a trained network's per-channel scales span decades;
   random init's are all 1, and then one scale per tensor costs nothing).
2. Speed: ResNet50 (torchvision, random init, 224 px) against its float16 copy (onnxconverter-common), every Conv
   layer, 16 neurons each: ``fd.diff`` data-free against ``fd.iter_decode`` of one model (the issue asks at most
   2.5x); and with 256 photographs (one onnxruntime pass per model). Peak memory (VmHWM) beside the times.

    ~/.cache/fdsub-bench/venv/bin/python benchmarks/bench_drift.py prepare   # torch, torchvision, onnxconverter-common
    .venv/bin/python benchmarks/bench_drift.py run [--out benchmarks/results/drift.json]

The photographs are ``~/.cache/fdsub-bench/train/*.png`` (see bench_fidelity.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

CACHE = Path(os.environ.get("FDSUB_BENCH_CACHE", Path.home() / ".cache" / "fdsub-bench"))
HERE = CACHE / "drift"
PHOTOS = CACHE / "train"
DAMAGED = "/features/features.9/conv/conv.1/conv.1.0/Conv"  # a depthwise conv halfway up MobileNetV2


def prepare() -> None:
    import onnx
    import torch
    import torchvision
    from onnxconverter_common import float16

    HERE.mkdir(parents=True, exist_ok=True)
    for name, builder in (("mobilenet_v2", torchvision.models.mobilenet_v2), ("resnet50", torchvision.models.resnet50)):
        torch.manual_seed(0)
        model = builder(weights=None).eval()
        with torch.no_grad():  # BatchNorm statistics of a plausible network: measured on random images
            for module in model.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    # a trained network's per-channel scales span decades (what makes per-tensor quantization
                    # of a depthwise conv harmful); random init's are all 1
                    module.weight.copy_(torch.exp(torch.empty_like(module.weight).uniform_(-3.0, 1.0)))
                    module.reset_running_stats()
                    module.momentum = None
                    module.train()
            model(torch.randn(16, 3, 224, 224))
            model.eval()
        path = HERE / f"{name}.onnx"
        torch.onnx.export(model, (torch.randn(1, 3, 224, 224),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"])
        print(f"wrote {path}")
    half = float16.convert_float_to_float16(onnx.load(str(HERE / "resnet50.onnx")), keep_io_types=True)
    onnx.save(half, str(HERE / "resnet50.fp16.onnx"))
    print(f"wrote {HERE / 'resnet50.fp16.onnx'}")


def _peak_gib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 2**20


def _photos(count: int):
    import fdsub_onnx as fd

    images = fd.open_images(str(PHOTOS), (3, 224, 224), preset="torchvision")
    return fd.ArrayImages(np.concatenate([b for _, b in images.batches(32)])[:count])


class _Reader:
    """onnxruntime's CalibrationDataReader over an image set, one image a run."""

    def __init__(self, images):
        self.feeds = iter({"input": images.array[i : i + 1]} for i in range(len(images)))

    def get_next(self):
        return next(self.feeds, None)

    def __iter__(self):  # qdq_loss_debug's collect_activations iterates
        return self.feeds


def _quantized(source: Path, images) -> Path:
    """int8 QDQ (per-channel weights), then DAMAGED's weights re-quantized per tensor."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime import quantization as q

    good = HERE / "mobilenet_v2.qdq.onnx"
    q.quantize_static(str(source), str(good), _Reader(images), quant_format=q.QuantFormat.QDQ, per_channel=True)
    model = onnx.load(str(good))
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    conv = next(n for n in model.graph.node if n.name == DAMAGED)
    dq = producer[conv.input[1]]  # DequantizeLinear(int8 weight, scale per channel, zero point)
    weight, scale = numpy_helper.to_array(inits[dq.input[0]]), numpy_helper.to_array(inits[dq.input[1]])
    real = weight.astype(np.float32) * scale.reshape(-1, 1, 1, 1)
    one = np.float32(np.abs(real).max() / 127)
    inits[dq.input[0]].CopyFrom(numpy_helper.from_array(np.clip(np.round(real / one), -127, 127).astype(np.int8),
                                                        dq.input[0]))
    inits[dq.input[1]].CopyFrom(numpy_helper.from_array(np.full_like(scale, one), dq.input[1]))
    damaged = HERE / "mobilenet_v2.qdq.damaged.onnx"
    onnx.save(model, str(damaged))
    return damaged


def _rank(scores: dict, target: str, higher_is_worse: bool, before: dict) -> tuple[int, int]:
    """(rank of ``target`` by its score, rank by its jump over the layers it reads from), 1 = first."""
    if target not in scores:
        return 0, 0
    sign = 1 if higher_is_worse else -1
    order = sorted(scores, key=lambda k: -sign * scores[k])
    jumps = {k: sign * (scores[k] - max((scores[b] * sign for b in before.get(k, []) if b in scores), default=0) * sign)
             for k in scores}
    by_jump = sorted(jumps, key=lambda k: -jumps[k])
    return order.index(target) + 1, by_jump.index(target) + 1


def _conv_before(model) -> dict:
    """Conv output -> the Conv outputs it reads from (through anything but a Conv)."""
    from fdsub_onnx.graph.model import ancestors

    convs = [n.output[0] for n in model.nodes if n.op_type == "Conv"]
    reach = {}
    for c in convs:
        above = [n.output[0] for n in ancestors(model, [c]) if n.op_type == "Conv" and n.output[0] != c]
        reach[c] = above
    return {c: [a for a in above if not any(a in reach.get(b, []) for b in above)] for c, above in reach.items()}


def damage(counts=(0, 8, 32, 128)) -> dict:
    import onnx
    from onnxruntime.quantization import qdq_loss_debug as dbg

    import fdsub_onnx as fd

    source = HERE / "mobilenet_v2.onnx"
    calibration = _photos(16)
    damaged = _quantized(source, calibration)
    a, b = fd.load_model(str(source)), fd.load_model(str(damaged))
    target = next(n.output[0] for n in a.nodes if n.name == DAMAGED)
    before = _conv_before(a)
    out = {"damaged_layer": target, "rows": []}
    # qdq_loss_debug, data-free: each weight tensor's SQNR (float against dequantized)
    start = time.perf_counter()
    weights = dbg.compute_weight_error(dbg.create_weight_matching(str(source), str(damaged)))
    seconds = time.perf_counter() - start
    conv_of = {n.input[1]: n.output[0] for n in a.nodes if n.op_type == "Conv"}
    sqnr = {conv_of[w]: float(v) for w, v in weights.items() if w in conv_of}
    out["rows"].append({"tool": "qdq_loss_debug weight SQNR", "images": 0, "seconds": seconds,
                        "rank": _rank(sqnr, target, False, before)})
    for count in counts:
        images = _photos(count) if count else None
        start = time.perf_counter()
        report = fd.diff(a, b, images=images, neurons="0-15")
        seconds = time.perf_counter() - start
        drift = {d.layer_a: float(np.mean(d.filter_drift)) for d in report.layers if d.op == "Conv"}
        out["rows"].append({"tool": "fdsub diff filter drift", "images": count, "seconds": seconds,
                            "rank": _rank(drift, target, True, before)})
        if count:
            act = {d.layer_a: float(np.median(d.activation_drift)) for d in report.layers if d.op == "Conv"}
            out["rows"].append({"tool": "fdsub diff activation drift", "images": count, "seconds": seconds,
                                "rank": _rank(act, target, True, before)})
            start = time.perf_counter()
            saved = {}
            for tag, path in (("float", source), ("qdq", damaged)):
                augmented = HERE / f"augmented.{tag}.onnx"
                dbg.modify_model_output_intermediate_tensors(str(path), str(augmented))
                saved[tag] = dbg.collect_activations(str(augmented), _Reader(images))
            errors = dbg.compute_activation_error(dbg.create_activation_matching(saved["qdq"], saved["float"]))
            seconds = time.perf_counter() - start
            # a conv's activation as qdq_loss_debug names it: its output, or (fused with its Clip/Relu in the
            # QDQ model) its activation's output
            after = {n.input[0]: n.output[0] for n in a.nodes if n.op_type in ("Clip", "Relu")}
            xmodel = {}
            for name in drift:
                found = next((t for t in (name, after.get(name)) if t in errors), None)
                if found is not None:
                    xmodel[name] = float(errors[found]["xmodel_err"])
            out["rows"].append({"tool": "qdq_loss_debug activation SQNR (float vs QDQ)", "images": count,
                                "seconds": seconds, "rank": _rank(xmodel, target, False, before)})
    out["conv_layers"] = len(sqnr)
    del onnx
    return out


def speed(images: int = 256) -> dict:
    import fdsub_onnx as fd

    a, b = fd.load_model(str(HERE / "resnet50.onnx")), fd.load_model(str(HERE / "resnet50.fp16.onnx"))
    convs = [la.name for la in fd.inspect_model(a).layers if la.op == "Conv" and la.decodable]
    start = time.perf_counter()
    for _ in fd.iter_decode(a, convs, neurons=dict.fromkeys(convs, "0-15")):
        pass
    one = time.perf_counter() - start
    start = time.perf_counter()
    report = fd.diff(a, b, layers=convs, neurons="0-15")
    free = time.perf_counter() - start
    photos = _photos(images)
    start = time.perf_counter()
    fd.diff(a, b, layers=convs, neurons="0-15", images=photos)
    with_images = time.perf_counter() - start
    worst = max(max(d.filter_drift) for d in report.layers)
    return {"layers": len(convs), "decode_one_s": one, "diff_s": free, "ratio": free / one,
            "diff_with_images_s": with_images, "images": images, "fp16_worst_filter_drift": worst,
            "peak_gib": _peak_gib()}


def run(out: Path | None) -> None:
    result = {"speed": speed()}  # first: its VmHWM is fdsub's (qdq_loss_debug keeps every activation in memory)
    result["damage"] = damage()
    print(f"damaged layer: {result['damage']['damaged_layer']} (one of {result['damage']['conv_layers']} convs)")
    print(f"{'tool':<48} {'images':>6} {'rank':>5} {'rank by jump':>12} {'seconds':>8}")
    for row in result["damage"]["rows"]:
        print(f"{row['tool']:<48} {row['images']:>6} {row['rank'][0]:>5} {row['rank'][1]:>12} {row['seconds']:>8.1f}")
    s = result["speed"]
    print(f"ResNet50 vs its float16 copy, {s['layers']} Conv layers x 16 neurons: decode one "
          f"{s['decode_one_s']:.1f} s, diff {s['diff_s']:.1f} s (ratio {s['ratio']:.2f}), with {s['images']} "
          f"photographs "
          f"{s['diff_with_images_s']:.1f} s; largest filter drift {s['fp16_worst_filter_drift']:.2e}; "
          f"VmHWM {s['peak_gib']:.2f} GiB")
    if out is not None:
        out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("prepare", "run"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.step == "prepare":
        prepare()
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        run(args.out)
