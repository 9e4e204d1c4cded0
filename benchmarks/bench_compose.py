"""Benchmark: the composition routes of all-neuron bottom-up decodes, this tree against an earlier commit (issue 27).

Each model's every Conv layer is decoded, every neuron, ``positions="interior"``, float32, by ``fd.iter_decode``
(the planner's routes, as a user gets them), in a process of its own, alternating the baseline tree (``git archive``
of ``--baseline``) and this one ``--rounds`` times; the best time of each is kept. Printed beside the times:

- GFLOP/s achieved: the direct (kn2row) FLOP count of the compositions over the time, so that every route is scored
  on the same work, and the machine's single-precision GEMM rate (a 4096^3 sgemm timed in the same run);
- the peak memory of each process (VmHWM) and its CPU time in the kernel (page faults, mostly);
- how far this tree's filters are from the baseline's: max |difference| over max |filter|, per layer (16 neurons of
  every layer compared, all their pixels).

    .venv/bin/python benchmarks/bench_compose.py [--baseline 55f0d0f] [--models vgg19,resnet50,densenet121]
        [--rounds 2] [--prewarm-gib 0] [--out benchmarks/results/compose.json]
    .venv/bin/python benchmarks/bench_compose.py --convs [--models ...] [--layers-from RESULTS.json] [--reps 3]
        (each layer's own composition timed alone, the trees alternating)
    .venv/bin/python benchmarks/bench_compose.py steps [vgg19] [--out STEPS.json]
        (one decode of this tree, the spectral route's time by step, and the CPU time in the kernel)

VGG19 is the onnx package's ``light_vgg19`` (no download); ResNet50 and DenseNet121 are torchvision's (random init)
exported by ``bench_drift.py prepare`` and ``bench_compose.py prepare`` into ``~/.cache/fdsub-bench``.
"""

from __future__ import annotations

import argparse
import functools
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


def child(tree: str, model_file: str, out: str, prewarm_gib: float = 0.0, layers_file: str | None = None) -> None:
    """One decode in this process, with the fdsub_onnx of ``tree``: prints its figures as JSON. ``prewarm_gib``:
    that much memory written and freed just before the decode, so that its pages are backed by the host when the
    decode takes them (``--prewarm-gib``). ``layers_file``: the layers to decode (JSON), default those this tree's
    plan takes within the budget."""
    import resource

    sys.path.insert(0, tree)
    import fdsub_onnx as fd
    from fdsub_onnx.compose.engine import Engine
    from fdsub_onnx.defaults import budget

    spent = [0.0]  # seconds inside Engine.conv: a layer's own composition, without the frees and copies around it
    conv = Engine.conv

    def timed_conv(self, *args, **kwargs):
        begin = time.perf_counter()
        try:
            return conv(self, *args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - begin

    Engine.conv = timed_conv
    model = fd.load_model(model_file)
    layers = json.loads(Path(layers_file).read_text()) if layers_file else decoded_layers(fd, model)
    rng = np.random.default_rng(0)
    kept, seconds, routes, own = {}, {}, {}, {}
    if prewarm_gib:
        np.ones(int(prewarm_gib * 2**30) // 4, np.float32)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_stime
    start = last = time.perf_counter()
    with budget(BUDGET):  # ResNet50's layer4 banks need 4.6 GiB, over the 4 GiB default
        for decoded in fd.iter_decode(model, layers=layers, dtype="float32", positions="interior"):
            now = time.perf_counter()
            seconds[decoded.layer], last = now - last, now
            own[decoded.layer], spent[0] = spent[0], 0.0
            routes[decoded.layer] = decoded.plan.route if decoded.plan is not None else "bottom-up"
            pick = np.sort(rng.choice(len(decoded.neurons), min(SAMPLED, len(decoded.neurons)), replace=False))
            kept[decoded.layer] = decoded.filters[pick]
            del decoded
    total = time.perf_counter() - start
    kernel = resource.getrusage(resource.RUSAGE_SELF).ru_stime - before
    np.savez(out, **{f"f{i}": kept[name] for i, name in enumerate(layers)})
    print(json.dumps({"seconds": total, "layers": layers, "per_layer": seconds, "conv_seconds": own, "routes": routes,
                      "peak_gib": _vmhwm_gib(), "kernel_s": kernel, "neurons": None,
                      "planned": _planned(fd, model, layers)}))


def _planned(fd, model, layers) -> float | None:
    """The seconds the tree's cost plan gives this decode (its bottom-up composition stage, as ``--plan`` prints
    it), or None where the tree has no such plan."""
    from fdsub_onnx.defaults import budget

    try:
        from fdsub_onnx.modes.cost import compose_stage
    except ImportError:
        return None
    targets = [fd.find_layer(model, name).output[0] for name in layers]
    with budget(BUDGET):
        return sum(stage.seconds for stage in compose_stage(model, targets, None, "float32", "weights"))


def steps(model_name: str, out: str | None) -> dict:
    """One decode of this tree with the spectral route's steps timed (through their calls, so the total runs a
    little over a plain decode): the phases' split and their transforms, the weights' operands and the products'
    GEMMs (with their GFLOP/s), the inverses, the interleaving into the output banks, each interleaving done a second
    time at once (its cost on warm memory: the first time's excess is the banks' fresh pages), and the process's
    user and kernel CPU time over the decode."""
    import resource

    sys.path.insert(0, str(ROOT))
    import fdsub_onnx as fd
    from fdsub_onnx.compose import backend, spectral
    from fdsub_onnx.defaults import budget

    spent = dict.fromkeys(["split", "forward", "weights", "products", "inverse", "interleave", "interleave_again",
                           "compose"], 0.0)
    product_flops = [0.0]
    matmul, inside = backend.NumpyBackend.matmul, [None]

    def timed_matmul(self, a, b, out=None):
        begin = time.perf_counter()
        try:
            return matmul(self, a, b, out=out)
        finally:
            # the steps timed whole (_inverse_y's GEMMs, the weights' operands in _products) are not counted here
            step = {"_phase_spectrum": "forward", "compose": "inverse"}.get(inside[0])
            if inside[0] == "_products" and np.ndim(a) == 3:
                step = "products"
                product_flops[0] += 2.0 * np.shape(a)[0] * np.shape(a)[1] * np.shape(a)[2] * np.shape(b)[2]
            if step:
                spent[step] += time.perf_counter() - begin

    def wrapped(name, step):
        original = getattr(spectral, name)

        def run(*args, **kwargs):
            outer, inside[0] = inside[0], name
            begin = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent[step] += time.perf_counter() - begin
                inside[0] = outer
                if name == "_interleave":
                    again = time.perf_counter()
                    original(*args, **kwargs)
                    spent["interleave_again"] += time.perf_counter() - again

        setattr(spectral, name, run)

    backend.NumpyBackend.matmul = timed_matmul
    for name, step in (("_phase_spectrum", "split"), ("_products", "weights"), ("_inverse_y", "inverse"),
                       ("_interleave", "interleave"), ("compose", "compose")):
        wrapped(name, step)
    model = fd.load_model(str(model_path(model_name)))
    layers = decoded_layers(fd, model)
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    with budget(BUDGET):
        for decoded in fd.iter_decode(model, layers=layers, dtype="float32", positions="interior"):
            del decoded
    total, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    spent["split"] -= spent["forward"]  # _phase_spectrum's own time, less its transforms' GEMMs
    spent["weights"] -= spent["products"]  # _products' time, less the products' GEMMs
    spent["compose"] -= spent["interleave_again"]
    result = {"model": model_name, "seconds": total - spent["interleave_again"], "user_s": after.ru_utime -
              before.ru_utime, "sys_s": after.ru_stime - before.ru_stime, "peak_gib": _vmhwm_gib(),
              "steps_s": spent, "product_gflop": product_flops[0] / 1e9,
              "product_gflops": product_flops[0] / max(spent["products"], 1e-9) / 1e9}
    print(f"{model_name}: {result['seconds']:.2f} s (user {result['user_s']:.2f} s, kernel {result['sys_s']:.2f} s "
          f"of CPU), VmHWM {result['peak_gib']:.2f} GiB")
    for step, seconds in spent.items():
        print(f"  {step:17s} {seconds:6.2f} s")
    print(f"  products: {result['product_gflop']:.0f} GFLOP at {result['product_gflops']:.0f} GFLOP/s")
    _write_results(result, out)
    return result


def decoded_layers(fd, model) -> list[str]:
    """The Conv layers whose interior filters, every neuron, fit the budget (ResNet50's layer4 needs ~12 GiB):
    each one planned alone, in this tree (``run`` gives every child the first one's list)."""
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


def _baseline_tree(commit: str) -> Path:
    """``git archive`` of ``commit``'s fdsub_onnx into a temporary folder."""
    base = Path(tempfile.mkdtemp(prefix="fdsub-base-"))
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "fdsub_onnx"], check=True,
                             capture_output=True).stdout
    with tempfile.TemporaryFile() as f:
        f.write(archive)
        f.seek(0)
        tarfile.open(fileobj=f).extractall(base, filter="data")
    return base


def run(args) -> dict:
    base = _baseline_tree(args.baseline)
    rate = sgemm_rate()
    print(f"sgemm 4096^3: {rate / 1e9:.0f} GFLOP/s; baseline {args.baseline} in {base}", flush=True)
    results = {"sgemm_gflops": rate / 1e9, "baseline": args.baseline, "models": {}}
    for name in args.models.split(","):
        path = model_path(name)
        flops = direct_flops(str(path))
        runs = {"baseline": [], "this": []}
        with tempfile.TemporaryDirectory() as tmp:
            listed = os.path.join(tmp, "layers.json")  # the baseline's first run's layers, decoded by every run:
            for r in range(args.rounds):  # a tree whose plan takes more layers within the budget does the same work
                order = ("baseline", "this") if r % 2 == 0 else ("this", "baseline")
                for side in order:
                    tree = str(base) if side == "baseline" else str(ROOT)
                    out = os.path.join(tmp, f"{side}.npz")
                    given = ["--layers", listed] if os.path.exists(listed) else []
                    proc = subprocess.run([sys.executable, __file__, "child", tree, str(path), out,
                                           "--prewarm-gib", str(args.prewarm_gib), *given], check=True,
                                          capture_output=True, text=True)
                    figures = json.loads(proc.stdout.strip().splitlines()[-1])
                    if not given:
                        Path(listed).write_text(json.dumps(figures["layers"]))
                    runs[side].append(figures)
                    print(f"  {name} {side}: {figures['seconds']:.2f} s (kernel CPU {figures['kernel_s']:.2f} s), "
                          f"VmHWM {figures['peak_gib']:.2f} GiB", flush=True)
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
            "kernel_s": {side: [f["kernel_s"] for f in runs[side]] for side in runs},
            "prewarm_gib": args.prewarm_gib,
            "max_rel_diff": max(diffs.values()),
            "per_layer": {layer: (min(f["per_layer"][layer] for f in runs["baseline"]),  # each layer's best round
                                  min(f["per_layer"][layer] for f in runs["this"]), best["this"]["routes"][layer],
                                  diffs[layer]) for layer in layers},
            # each layer's own composition (inside Engine.conv), best round: what a route change makes faster or
            # slower, where a step's time also holds the frees and copies of other nodes' banks
            "per_layer_conv": {layer: (min(f["conv_seconds"][layer] for f in runs["baseline"]),
                                       min(f["conv_seconds"][layer] for f in runs["this"])) for layer in layers},
            "all_seconds": {side: [f["seconds"] for f in runs[side]] for side in runs},
            "planned_s": {side: runs[side][0].get("planned") for side in runs},  # what each tree's --plan says
        }
        slower = [(layer, b, t) for layer, (b, t, _, _) in row["per_layer"].items() if t > 1.1 * b and b > 0.05]
        row["layers_over_10pct_slower"] = slower
        row["convs_over_10pct_slower"] = [(layer, b, t) for layer, (b, t) in row["per_layer_conv"].items()
                                          if t > 1.1 * b and b > 0.05]
        results["models"][Path(name).stem if name.endswith(".onnx") else name] = row
        _write_results(results, args.out)
    print(f"\n| model | conv layers | direct GFLOP | {args.baseline} s | this s | speedup | GFLOP/s {args.baseline} / "
          f"this (sgemm {rate / 1e9:.0f}) | VmHWM GiB {args.baseline} / this | max rel diff | planned s "
          f"{args.baseline} / this |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results["models"].items():
        planned = " / ".join("-" if r["planned_s"][side] is None else f"{r['planned_s'][side]:.1f}"
                             for side in ("baseline", "this"))
        print(f"| {name} | {r['conv_layers']} | {r['direct_gflop']:.0f} | {r['baseline_s']:.2f} | {r['this_s']:.2f} | "
              f"{r['speedup']:.2f}x | {r['baseline_gflops']:.0f} / {r['this_gflops']:.0f} | "
              f"{r['baseline_peak_gib']:.2f} / {r['this_peak_gib']:.2f} | {r['max_rel_diff']:.1e} | {planned} |")
        for layer, b, t in r["layers_over_10pct_slower"]:
            print(f"  {name} {layer}: step {b:.2f} s -> {t:.2f} s (over 10% slower; under 0.05 s not counted)")
        for layer, b, t in r["convs_over_10pct_slower"]:
            print(f"  {name} {layer}: its conv {b:.2f} s -> {t:.2f} s (over 10% slower; under 0.05 s not counted)")
    return results


def _write_results(results: dict, out: str | None) -> None:
    """``results`` written to ``out`` (when given) at once, after each model: a long run stopped halfway keeps what
    it measured."""
    if out:
        partial = Path(out).with_suffix(".partial")
        partial.write_text(json.dumps(results, indent=1))
        os.replace(partial, out)


def record_convs(model_file: str, wanted: list[str], out: str) -> None:
    """Each of ``wanted``'s Engine.conv call as this tree's walker makes it (its weights, groups, step, rows and the
    input bank's shape; geometry only, nothing composed), pickled into ``out`` for ``conv_child``."""
    sys.path.insert(0, str(ROOT))
    import pickle

    import fdsub_onnx as fd
    from fdsub_onnx.compose.walker import walk
    from fdsub_onnx.modes.plan import Costs

    class Recorder(Costs):
        last = None

        def conv(self, bank, weight, bias, groups, step, out_rf, rows=None):
            r_in = [r - (t - 1) * s for r, t, s in zip(out_rf, np.shape(weight)[2:], step)]
            shape = (np.shape(weight)[1] * groups, self.image_channels, *r_in)
            self.last = dict(shape=shape, weight=np.asarray(weight), bias=None if bias is None else np.asarray(bias),
                             groups=groups, step=tuple(step), out_rf=tuple(out_rf), rows=rows)
            return super().conv(bank, weight, bias, groups, step, out_rf, rows)

    model, engine, calls = fd.load_model(model_file), Recorder("float32"), {}
    for node, _ in walk(model, engine, targets=wanted, compose=True):
        if node.output[0] in wanted and engine.last is not None:
            calls[node.output[0]], engine.last = engine.last, None
    with open(out, "wb") as f:
        pickle.dump([(name, calls[name]) for name in wanted if name in calls], f)


def conv_child(tree: str, recorded: str, reps: int) -> None:
    """Each recorded conv run ``reps`` times on a random bank of its shape with the fdsub_onnx of ``tree``: prints
    the best time of each as JSON."""
    sys.path.insert(0, tree)
    import pickle

    from fdsub_onnx.compose.backend import get_backend
    from fdsub_onnx.compose.engine import Bank, Engine

    with open(recorded, "rb") as f:
        calls = pickle.load(f)
    engine, rng, best = Engine(get_backend("numpy"), "float32"), np.random.default_rng(0), {}
    for name, call in calls:
        bank = Bank(rng.standard_normal(call["shape"], dtype=np.float32), np.zeros(call["shape"][0], np.float32))
        args = (bank, call["weight"], call["bias"], call["groups"], call["step"], call["out_rf"], call["rows"])
        best[name] = min(_timed(functools.partial(engine.conv, *args)) for _ in range(reps))
        del bank
    print(json.dumps(best))


def run_convs(args) -> dict:
    """Layer by layer: each layer's own composition (Engine.conv on a random bank of its input's shape, best of
    ``--reps`` in a process, processes of the two trees alternating ``--rounds`` times), for the layers of
    ``--models`` that ``--layers-from`` (an earlier ``--out``) shows not 10% faster (all layers without it)."""
    base = _baseline_tree(args.baseline)
    earlier = json.loads(Path(args.layers_from).read_text()) if args.layers_from else {}
    earlier = {**earlier.get("models", {}), **earlier.get("modern", {})}
    results = {"baseline": args.baseline, "layers": {}}
    for name in args.models.split(","):
        path = str(model_path(name))
        if name in earlier:
            wanted = [layer for layer, (b, t, *_) in earlier[name]["per_layer"].items() if b >= 0.05 and t > 0.9 * b]
        else:
            sys.path.insert(0, str(ROOT))
            import fdsub_onnx as fd

            wanted = decoded_layers(fd, fd.load_model(path))
        if not wanted:
            print(f"  {name}: every layer was at least 10% faster in --layers-from", flush=True)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            recorded = os.path.join(tmp, "convs.pkl")
            subprocess.run([sys.executable, __file__, "record", path, recorded, *wanted], check=True)
            times = {"baseline": [], "this": []}
            for r in range(args.rounds):
                for side in (("baseline", "this") if r % 2 == 0 else ("this", "baseline")):
                    tree = str(base) if side == "baseline" else str(ROOT)
                    proc = subprocess.run([sys.executable, __file__, "conv-child", tree, recorded, str(args.reps)],
                                          check=True, capture_output=True, text=True)
                    times[side].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                    print(f"  {name} {side}: {sum(times[side][-1].values()):.2f} s in {len(wanted)} convs", flush=True)
        for layer in times["this"][0]:
            b, t = (min(run[layer] for run in times[side]) for side in ("baseline", "this"))
            results["layers"][f"{name} {layer}"] = (b, t)
        _write_results(results, args.out)
    print(f"\n| layer | {args.baseline} s | this s | this / {args.baseline} |\n| --- | --- | --- | --- |")
    for layer, (b, t) in results["layers"].items():
        print(f"| {layer} | {b:.3f} | {t:.3f} | {t / b:.2f}{' **over 10% slower**' if t > 1.1 * b else ''} |")
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
    c.add_argument("--prewarm-gib", type=float, default=0.0)
    c.add_argument("--layers", help="a JSON list of the layers to decode")
    r = sub.add_parser("record")
    r.add_argument("model")
    r.add_argument("out")
    r.add_argument("layers", nargs="*")
    st = sub.add_parser("steps", help="one decode of this tree, the spectral route's time by step")
    st.add_argument("name", nargs="?", default="vgg19")
    st.add_argument("--out", dest="steps_out", help="the figures as JSON")
    cc = sub.add_parser("conv-child")
    cc.add_argument("tree")
    cc.add_argument("recorded")
    cc.add_argument("reps", type=int)
    parser.add_argument("--convs", action="store_true", help="layer by layer: each layer's own composition")
    parser.add_argument("--layers-from", help="with --convs: the layers an earlier --out shows not 10%% faster")
    parser.add_argument("--reps", type=int, default=2, help="with --convs: runs of each conv in a process")
    parser.add_argument("--baseline", default="55f0d0f")
    parser.add_argument("--models", default="vgg19,resnet50,densenet121")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prewarm-gib", type=float, default=0.0,
                        help="write and free this much memory just before each decode (pages backed by the host)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args.names)
    elif args.command == "child":
        child(args.tree, args.model, args.out, args.prewarm_gib, args.layers)
    elif args.command == "record":
        record_convs(args.model, args.layers, args.out)
    elif args.command == "steps":
        steps(args.name, args.steps_out or args.out)
    elif args.command == "conv-child":
        conv_child(args.tree, args.recorded, args.reps)
    elif args.convs:
        run_convs(args)
    else:
        run(args)  # writes --out after each model
    return 0


if __name__ == "__main__":
    sys.exit(main())
