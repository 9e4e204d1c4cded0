"""Benchmark: the composition routes of all-neuron bottom-up decodes, this tree against an earlier commit (issue 27).

Each model's every Conv layer is decoded, every neuron, ``positions="interior"``, float32, by ``fd.iter_decode``
(the planner's routes, as a user gets them), in a process of its own, alternating the baseline tree (``git archive``
of ``--baseline``) and this one ``--rounds`` times; the best time of each is kept. Printed beside the times:

- GFLOP/s achieved: the direct (kn2row) FLOP count of the compositions over the time, so that every route is scored
  on the same work, and the machine's single-precision GEMM rate (a 4096^3 sgemm timed in the same run);
- the peak memory of each process (VmHWM);
- how far this tree's filters are from the baseline's: max |difference| over max |filter|, per layer (16 neurons of
  every layer compared, all their pixels).

    .venv/bin/python benchmarks/bench_compose.py [--baseline 55f0d0f] [--models vgg19,resnet50,densenet121]
        [--rounds 2] [--out benchmarks/results/compose.json]

VGG19 is the onnx package's ``light_vgg19`` (no download); ResNet50 and DenseNet121 are torchvision's (random init)
exported by ``bench_drift.py prepare`` and ``bench_compose.py prepare`` into ``~/.cache/fdsub-bench``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

CACHE = Path(os.environ.get("FDSUB_BENCH_CACHE", Path.home() / ".cache" / "fdsub-bench"))
ROOT = Path(__file__).resolve().parent.parent
SAMPLED = 16  # neurons of every layer whose filters are compared
BUDGET = "12G"  # the memory budget of each decode (both trees)


def model_path(name: str) -> Path:
    if name == "vgg19":
        import onnx

        return Path(onnx.__file__).parent / "backend/test/data/light/light_vgg19.onnx"
    if name.endswith(".onnx"):  # any other export, by its path
        return Path(name).expanduser()
    if name == "resnet50":
        return CACHE / "drift" / "resnet50.onnx"
    if name in EXPORTED:
        return CACHE / "compose" / f"{name}.onnx"
    raise SystemExit(f"unknown model {name!r}: vgg19, resnet50, {', '.join(EXPORTED)} or a path to an .onnx file")


#: torchvision architectures ``prepare`` exports (random init, 224 px): the modern zoo's at full size
EXPORTED = ("densenet121", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny",
            "shufflenet_v2_x1_0", "regnet_y_400mf")


def prepare(names=EXPORTED) -> None:
    """Export ``names`` (torchvision, random init, 224 px); run with the bench venv's python (torch,
    torchvision)."""
    import torch
    import torchvision

    for name in names:
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None).eval()
        path = model_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.onnx.export(model, (torch.randn(1, 3, 224, 224),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"])
        print(f"wrote {path}")


def _vmhwm_gib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 2**20


def child(tree: str, model_file: str, out: str) -> None:
    """One decode in this process, with the fdsub_onnx of ``tree``: prints its figures as JSON."""
    sys.path.insert(0, tree)
    import fdsub_onnx as fd
    from fdsub_onnx.defaults import budget

    model = fd.load_model(model_file)
    layers = decoded_layers(fd, model)
    rng = np.random.default_rng(0)
    kept, seconds, routes = {}, {}, {}
    start = last = time.perf_counter()
    with budget(BUDGET):  # ResNet50's layer4 banks need 4.6 GiB, over the 4 GiB default
        for decoded in fd.iter_decode(model, layers=layers, dtype="float32", positions="interior"):
            now = time.perf_counter()
            seconds[decoded.layer], last = now - last, now
            routes[decoded.layer] = decoded.plan.route if decoded.plan is not None else "bottom-up"
            pick = np.sort(rng.choice(len(decoded.neurons), min(SAMPLED, len(decoded.neurons)), replace=False))
            kept[decoded.layer] = decoded.filters[pick]
            del decoded
    total = time.perf_counter() - start
    np.savez(out, **{f"f{i}": kept[name] for i, name in enumerate(layers)})
    print(json.dumps({"seconds": total, "layers": layers, "per_layer": seconds, "routes": routes,
                      "peak_gib": _vmhwm_gib(), "neurons": None}))


def decoded_layers(fd, model) -> list[str]:
    """The Conv layers whose interior filters, every neuron, fit the budget (ResNet50's layer4 needs ~12 GiB):
    each one planned alone, in this tree (the same list for both sides)."""
    from fdsub_onnx.defaults import budget

    names = [layer.name for layer in fd.inspect_model(model).layers if layer.op == "Conv" and layer.decodable]
    kept = []
    with budget(BUDGET):
        for name in names:
            try:
                fd.plan_decode(model, [name], positions={name: "interior"})
            except fd.FdsubError:
                continue
            kept.append(name)
    return kept


def direct_flops(model_file: str) -> float:
    """The kn2row FLOP count of the bottom-up compositions of every Conv layer (this tree's walker)."""
    sys.path.insert(0, str(ROOT))
    import fdsub_onnx as fd
    from fdsub_onnx.compose.walker import walk
    from fdsub_onnx.modes.plan import Costs

    class Direct(Costs):
        def conv(self, bank, weight, bias, groups, step, out_rf, rows=None):
            k, cig, ky, kx = np.shape(weight)
            n = k if rows is None else len(rows)
            r_in = [r - (t - 1) * s for r, t, s in zip(out_rf, (ky, kx), step)]
            self.flops += 2.0 * n * cig * ky * kx * self.image_channels * r_in[0] * r_in[1]

    model = fd.load_model(model_file)
    layers = decoded_layers(fd, model)
    engine = Direct("float32")
    for _ in walk(model, engine, targets=layers, compose=True):
        pass
    return engine.flops


def sgemm_rate() -> float:
    a = np.random.default_rng(0).standard_normal((4096, 4096), dtype=np.float32)
    a @ a
    best = min(_timed(lambda: a @ a) for _ in range(3))
    return 2 * 4096**3 / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run(args) -> dict:
    base = Path(tempfile.mkdtemp(prefix="fdsub-base-"))
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline, "fdsub_onnx"], check=True,
                             capture_output=True).stdout
    with tempfile.TemporaryFile() as f:
        f.write(archive)
        f.seek(0)
        tarfile.open(fileobj=f).extractall(base, filter="data")
    rate = sgemm_rate()
    print(f"sgemm 4096^3: {rate / 1e9:.0f} GFLOP/s; baseline {args.baseline} in {base}", flush=True)
    results = {"sgemm_gflops": rate / 1e9, "baseline": args.baseline, "models": {}}
    for name in args.models.split(","):
        path = model_path(name)
        flops = direct_flops(str(path))
        runs = {"baseline": [], "this": []}
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.rounds):
                order = ("baseline", "this") if r % 2 == 0 else ("this", "baseline")
                for side in order:
                    tree = str(base) if side == "baseline" else str(ROOT)
                    out = os.path.join(tmp, f"{side}.npz")
                    proc = subprocess.run([sys.executable, __file__, "child", tree, str(path), out], check=True,
                                          capture_output=True, text=True)
                    figures = json.loads(proc.stdout.strip().splitlines()[-1])
                    runs[side].append(figures)
                    print(f"  {name} {side}: {figures['seconds']:.2f} s, VmHWM {figures['peak_gib']:.2f} GiB",
                          flush=True)
            old, new = np.load(os.path.join(tmp, "baseline.npz")), np.load(os.path.join(tmp, "this.npz"))
            layers = runs["this"][0]["layers"]
            diffs = {layer: float(np.abs(new[f"f{i}"] - old[f"f{i}"]).max() / max(np.abs(old[f"f{i}"]).max(), 1e-30))
                     for i, layer in enumerate(layers)}
        best = {side: min(runs[side], key=lambda f: f["seconds"]) for side in runs}
        row = {
            "conv_layers": len(layers),
            "direct_gflop": flops / 1e9,
            "baseline_s": best["baseline"]["seconds"],
            "this_s": best["this"]["seconds"],
            "speedup": best["baseline"]["seconds"] / best["this"]["seconds"],
            "baseline_gflops": flops / best["baseline"]["seconds"] / 1e9,
            "this_gflops": flops / best["this"]["seconds"] / 1e9,
            "baseline_peak_gib": max(f["peak_gib"] for f in runs["baseline"]),
            "this_peak_gib": max(f["peak_gib"] for f in runs["this"]),
            "max_rel_diff": max(diffs.values()),
            "per_layer": {layer: (min(f["per_layer"][layer] for f in runs["baseline"]),  # each layer's best round
                                  min(f["per_layer"][layer] for f in runs["this"]), best["this"]["routes"][layer],
                                  diffs[layer]) for layer in layers},
            "all_seconds": {side: [f["seconds"] for f in runs[side]] for side in runs},
        }
        slower = [(layer, b, t) for layer, (b, t, _, _) in row["per_layer"].items() if t > 1.1 * b and b > 0.05]
        row["layers_over_10pct_slower"] = slower
        results["models"][Path(name).stem if name.endswith(".onnx") else name] = row
        if args.out:  # after each model: a long run stopped halfway keeps what it measured
            partial = Path(args.out).with_suffix(".partial")
            partial.write_text(json.dumps(results, indent=1))
            os.replace(partial, args.out)
    print(f"\n| model | conv layers | direct GFLOP | {args.baseline} s | this s | speedup | GFLOP/s {args.baseline} / "
          f"this (sgemm {rate / 1e9:.0f}) | VmHWM GiB {args.baseline} / this | max rel diff |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results["models"].items():
        print(f"| {name} | {r['conv_layers']} | {r['direct_gflop']:.0f} | {r['baseline_s']:.2f} | {r['this_s']:.2f} | "
              f"{r['speedup']:.2f}x | {r['baseline_gflops']:.0f} / {r['this_gflops']:.0f} | "
              f"{r['baseline_peak_gib']:.2f} / {r['this_peak_gib']:.2f} | {r['max_rel_diff']:.1e} |")
        for layer, b, t in r["layers_over_10pct_slower"]:
            print(f"  {name} {layer}: {b:.2f} s -> {t:.2f} s (over 10% slower; times under 0.05 s are not counted)")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("prepare")
    p.add_argument("names", nargs="*", default=list(EXPORTED))
    c = sub.add_parser("child")
    c.add_argument("tree")
    c.add_argument("model")
    c.add_argument("out")
    parser.add_argument("--baseline", default="55f0d0f")
    parser.add_argument("--models", default="vgg19,resnet50,densenet121")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args.names)
    elif args.command == "child":
        child(args.tree, args.model, args.out)
    else:
        run(args)  # writes --out after each model
    return 0


if __name__ == "__main__":
    sys.exit(main())
