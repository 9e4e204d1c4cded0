"""Benchmark (issue 13): decoding the deepest layers, and `local` mode, against the strongest torch baselines.

Rows, each run in its own process (time and peak resident memory of that process):

- the deepest conv of ResNet50, DenseNet121 (fc6_1, after the global pool) and Inception v2 (the onnx package's
  light topologies, weights re-randomized), 16 neurons and all neurons, at the centre of the map:
  fdsub's planner (``decode``), today's bottom-up route (``route="bottom-up"``; refused where its banks do not
  fit), and batched torch autograd on the linearized network (``torch.autograd.grad(..., is_grads_batched=True)``:
  one backward pass per batch of one-hot output gradients, the network executed by torch from the same ONNX
  nodes: Conv, BatchNormalization, pooling, Add, Concat...);
- ``local`` mode on the demo model (conv4, top 100 of builtin:glyphs:256, all 128 neurons): fdsub now, the
  previous version (``--today-root``, a checkout of it), and batched torch autograd on the real (nonlinear)
  network, one forward per image and one batched backward for that image's instances.

"All neurons" rows of the adjoint route and of torch are measured on ``--chunk`` neurons and scaled to the layer
(both costs are linear in the neurons); the table says so. Filters are cross-checked against torch's gradients.

    PYTHONPATH=. python benchmarks/bench_deep.py                 # everything (long: about half an hour on 2 cores)
    PYTHONPATH=. python benchmarks/bench_deep.py --only local --today-root /tmp/fdsub-previous
    PYTHONPATH=. python benchmarks/bench_deep.py --only resnet50 --skip-bottom-up
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

THREADS = "2"
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, THREADS)

import numpy as np  # noqa: E402  (after the thread variables above)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEEP = {"resnet50": "r168", "densenet121": "fc6_1", "inception_v2": "r497"}
FEW = 16
TOLERANCE = 1e-3  # relative, float32 filters against torch's float32 gradients


# ---- torch: the same ONNX nodes executed by torch ------------------------------------------------------
def torch_program(model, nodes, upto: str):
    """A function image -> the tensor ``upto``, running ``nodes`` (a Model's, linearized or not) with torch ops."""
    import torch
    import torch.nn.functional as F

    from fdsub_onnx.graph.geometry import Window
    from fdsub_onnx.graph.model import ancestors, attributes

    wanted = {id(n) for n in ancestors(model, [upto])}
    program = [n for n in nodes if id(n) in wanted]
    const = {name: torch.from_numpy(np.array(v, np.float32)) for name, v in model.constants.items()
             if np.asarray(v).dtype.kind == "f"}

    def padded(x, window, value=0.0):
        (bt, bl), (et, el) = window.begin, window.end
        return F.pad(x, (bl, el, bt, et), value=value) if any((bt, bl, et, el)) else x

    def run(image):
        env = {model.input_name: image}
        value = lambda name: env[name] if name in env else const[name]  # noqa: E731
        for node in program:
            a, op = attributes(node), node.op_type
            x = value(node.input[0])
            if op == "Conv":
                w = const[node.input[1]]
                window = Window.of(a, tuple(x.shape[2:]), tuple(w.shape[2:]))
                b = const[node.input[2]] if len(node.input) > 2 and node.input[2] else None
                y = F.conv2d(padded(x, window), w, b, window.strides, 0, window.dilations, int(a.get("group", 1)))
            elif op in ("MaxPool", "AveragePool"):
                window = Window.of(a, tuple(x.shape[2:]))
                if op == "MaxPool":
                    y = F.max_pool2d(padded(x, window, -float("inf")), window.kernel, window.strides, 0,
                                     window.dilations, bool(a.get("ceil_mode", 0)))
                else:  # a sum over the padded window, divided as onnxruntime does (taps inside the map)
                    ceil = bool(a.get("ceil_mode", 0))
                    total = F.avg_pool2d(padded(x, window), window.kernel, window.strides, 0, ceil, True)
                    inside = torch.ones_like(x[:1, :1]) if not a.get("count_include_pad", 0) else None
                    y = total if inside is None else total / F.avg_pool2d(padded(inside, window), window.kernel,
                                                                         window.strides, 0, ceil, True)
            elif op == "GlobalAveragePool":
                y = x.mean(dim=(2, 3), keepdim=True)
            elif op == "BatchNormalization":
                gamma, beta, mean, var = (const[n] for n in node.input[1:5])
                scale = gamma / torch.sqrt(var + a.get("epsilon", 1e-5))
                y = x * scale[None, :, None, None] + (beta - mean * scale)[None, :, None, None]
            elif op in ("Add", "Sum"):
                y = x
                for name in node.input[1:]:
                    y = y + value(name)
            elif op == "Sub":
                y = x - value(node.input[1])
            elif op == "Mul":
                y = x * value(node.input[1])
            elif op == "Div":
                y = x / value(node.input[1])
            elif op == "Concat":
                y = torch.cat([value(n) for n in node.input], dim=int(a["axis"]))
            elif op == "Relu":
                y = F.relu(x)
            elif op == "LRN":
                y = F.local_response_norm(x, int(a["size"]), a.get("alpha", 1e-4), a.get("beta", 0.75),
                                          a.get("bias", 1.0))
            elif op in ("Identity", "Dropout"):
                y = x
            else:
                raise NotImplementedError(f"torch_program: {op}")
            env[node.output[0]] = y
        return env[upto]

    return run


def torch_gradients(run, shape, neurons, position, chunk: int, how: str = "is_grads_batched"):
    """Batched autograd: the input gradients [K, C, H, W] of ``neurons`` at ``position`` of ``run``'s output.

    ``is_grads_batched``: one forward, then one vmapped backward per chunk of one-hot output gradients;
    ``input_batch``: the (affine) network run on a batch of ``chunk`` copies of the input, one backward with
    instance i's one-hot on copy i (GEMM-shaped convolutions for both passes, at the cost of the forwards)."""
    import torch

    grads = []
    if how == "is_grads_batched":
        x = torch.zeros(1, *shape, requires_grad=True)
        y = run(x)
    for start in range(0, len(neurons), chunk):
        picked = neurons[start : start + chunk]
        if how == "input_batch":
            x = torch.zeros(len(picked), *shape, requires_grad=True)
            y = run(x)
            seeds = torch.zeros(y.shape)
            for i, k in enumerate(picked):
                seeds[(i, k, *position) if y.ndim == 4 else (i, k)] = 1.0
            (g,) = torch.autograd.grad(y, x, seeds)
            grads.append(g.numpy())
            continue
        seeds = torch.zeros(len(picked), *y.shape)
        for i, k in enumerate(picked):
            seeds[(i, 0, k, *position) if y.ndim == 4 else (i, 0, k)] = 1.0
        (g,) = torch.autograd.grad(y, x, seeds, retain_graph=True, is_grads_batched=True)
        grads.append(g[:, 0].numpy())
    return np.concatenate(grads)


# ---- jobs (each in its own process) ----------------------------------------------------------------------
def _rss_mib() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: at exec Linux carries the parent's high-water
    mark into ru_maxrss (a job started by a parent holding 3.4 GB reported 3.4 GB before doing anything)."""
    try:
        status = Path("/proc/self/status").read_text()
        return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def job_deep(spec: dict) -> dict:
    import fdsub_onnx as fd
    from fdsub_onnx.compose.linear_model import linear_model

    model = fd.load_model(spec["path"], (1, 3, 224, 224))
    layer, neurons = spec["layer"], np.arange(spec["count"])
    loaded = _rss_mib()
    shape = model.shapes[layer]
    position = tuple(((n - 1) // 2) for n in shape[2:4]) if len(shape) == 4 else (0, 0)
    result = {"loaded_mib": loaded}
    if spec["side"] == "torch":
        import torch

        torch.set_num_threads(int(THREADS))
        linear = linear_model(model)
        run = torch_program(linear, linear.nodes, layer)
        for how in ("is_grads_batched", "input_batch"):  # the faster of the two counts
            t = time.perf_counter()
            grads = torch_gradients(run, model.input_shape[1:], list(neurons), position, spec["chunk"], how)
            seconds = time.perf_counter() - t
            result[how] = seconds
            if seconds <= result.get("seconds", np.inf):
                result["seconds"], result["how"] = seconds, how
        if spec.get("compare"):
            saved = np.load(spec["compare"])
            canvas = _on_image(saved, model.input_shape[2:])
            scale = np.abs(grads).max()
            result["max_rel_err"] = float(np.abs(canvas[: len(grads)] - grads).max() / scale)
    else:
        estimate = fd.estimate_decode(model, layer, neurons, "weights", position=position, route=spec["route"])
        result["estimate_mib"] = estimate.peak_bytes / 2**20  # the cost plan's peak, made before the decode
        t = time.perf_counter()
        decoded = fd.decode(model, layer, neurons=neurons, route=spec["route"], position=position)
        result["seconds"] = time.perf_counter() - t
        result["plan"] = decoded.plan.describe()
        if spec.get("save"):
            corner = np.asarray(decoded.origin) + np.asarray(position) * np.asarray(decoded.stride)
            np.savez(spec["save"], filters=decoded.filters, corner=corner)
    result["peak_mib"] = _rss_mib()
    return result


def _on_image(saved, size) -> np.ndarray:
    """fdsub filters [K, C, R, R] placed on the image at their corner, cut to it (the gradient torch gives)."""
    filters, (y, x) = saved["filters"], saved["corner"]
    canvas = np.zeros((len(filters), filters.shape[1], *size), np.float32)
    ys, xs = max(0, -y), max(0, -x)
    ye, xe = min(filters.shape[2], size[0] - y), min(filters.shape[3], size[1] - x)
    canvas[:, :, y + ys : y + ye, x + xs : x + xe] = filters[:, :, ys:ye, xs:xe]
    return canvas


def job_local(spec: dict) -> dict:
    if spec.get("root"):
        sys.path.insert(0, spec["root"])
    import fdsub_onnx as fd

    model = fd.load_model(str(ROOT / "models" / "demo.onnx"))
    images = fd.open_images("builtin:glyphs:256", model.input_shape[1:])
    found = fd.capture_top(model, "conv4", images, top=spec["top"])
    from bench_weights_vgg19 import CpuMonitor  # noqa: E402  (the benchmarks' shared steal counter)

    loaded = _rss_mib()
    with CpuMonitor() as monitor:  # the share of the CPU the VM host gives other guests: wall time grows with it
        t = time.perf_counter()
        if spec["side"] == "torch":
            import torch

            torch.set_num_threads(int(THREADS))
            run = torch_program(model, model.nodes, "conv4")
            rows, cols = np.nonzero(found.image_index >= 0)
            for image in np.unique(found.image_index[rows, cols]):
                mine = found.image_index[rows, cols] == image
                x = torch.from_numpy(np.ascontiguousarray(images.batches(1, start=int(image)).__next__()[1][:1]))
                x.requires_grad_(True)
                y = run(x)
                seeds = torch.zeros(int(mine.sum()), *y.shape)
                for i, (r, c) in enumerate(zip(rows[mine], cols[mine])):
                    seeds[(i, 0, found.neurons[r], *found.position[r, c])] = 1.0
                torch.autograd.grad(y, x, seeds, is_grads_batched=True)
            result = {}
        else:
            decoded = fd.decode_instances(model, "conv4", images, instances=found, rule="local")
            np.save(spec["save"], decoded.filters)
            result = {}
        seconds = time.perf_counter() - t
    result.update(seconds=seconds, loaded_mib=loaded, peak_mib=_rss_mib(),
                  instances=int((found.image_index >= 0).sum()), stolen=monitor.share()["steal"])
    return result


def run_job(spec: dict) -> dict:
    """One job in a fresh process: its time and peak memory are its own."""
    out = subprocess.run([sys.executable, __file__, "--job", json.dumps(spec)], capture_output=True, text=True,
                         env=os.environ | {"PYTHONPATH": spec.get("root") or str(ROOT)})
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- the report -------------------------------------------------------------------------------------------
def deep_rows(name: str, args, folder: Path) -> list[dict]:
    import onnx

    from fdsub_onnx.evaluate.zoo import light_path, randomized

    path = folder / f"{name}.onnx"
    if not path.exists():
        onnx.save(randomized(light_path(name), 0), str(path))
    import fdsub_onnx as fd

    model = fd.load_model(str(path), (1, 3, 224, 224))
    layer = DEEP[name]
    channels = int(model.shapes[layer][1])
    rows = []
    for label, count in (("16 neurons", FEW), ("all neurons", channels)):
        measured = count if count <= args.chunk else args.chunk
        scale = count / measured
        base = {"path": str(path), "layer": layer, "count": measured}
        saved = str(folder / f"{name}-{count}.npz")
        ours = run_job(base | {"side": "fdsub", "route": "auto", "save": saved})
        torch_side = run_job(base | {"side": "torch", "chunk": min(measured, 32), "compare": saved})
        if args.skip_bottom_up:
            bottom = {"error": "skipped (--skip-bottom-up)"}
        else:
            bottom = run_job(base | {"count": count, "side": "fdsub", "route": "bottom-up"})
        rows.append({"model": name, "layer": layer, "neurons": label, "count": count, "measured": measured,
                     "scale": scale, "fdsub": ours, "bottom_up": bottom, "torch": torch_side})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def local_rows(args, folder: Path) -> list[dict]:
    spec = {"top": args.top}
    now = run_job(spec | {"side": "fdsub", "save": str(folder / "local-now.npy")})
    today = ({"error": "no --today-root"} if not args.today_root else
             run_job(spec | {"side": "fdsub", "root": args.today_root, "save": str(folder / "local-today.npy")}))
    if "error" not in today and "error" not in now:
        a, b = np.load(folder / "local-today.npy"), np.load(folder / "local-now.npy")
        now["max_rel_diff_vs_today"] = float(np.abs(a - b).max() / np.abs(a).max())
    torch_side = run_job(spec | {"side": "torch"})
    row = {"now": now, "today": today, "torch": torch_side}
    print(json.dumps(row), flush=True)
    return [row]


def plan_rows(folder: Path) -> list[dict]:
    """Every decodable layer of every light-zoo topology, all neurons, planned at its centre (geometry only): the
    routes taken, the largest peak estimate, and the layers no route decodes in the memory left (none, on 24 GiB)."""
    import onnx

    import fdsub_onnx as fd
    from fdsub_onnx.evaluate.zoo import light_name, light_paths, randomized

    rows = []
    for light in light_paths():
        name = light_name(light)
        path = folder / f"{name}.onnx"
        if not path.exists():
            onnx.save(randomized(light, 0), str(path))
        model = fd.load_model(str(path), (1, 3, 224, 224))
        layers = [layer.name for layer in fd.inspect_model(model).layers if layer.decodable]
        routes, peak, refused, t = {}, 0.0, [], time.perf_counter()
        for layer in layers:
            try:
                plan = fd.plan_decode(model, [layer])[layer]
            except fd.FdsubError as exc:
                refused.append(f"{layer}: {exc}")
                continue
            routes[plan.route] = routes.get(plan.route, 0) + 1
            peak = max(peak, plan.peak_bytes)
        rows.append({"model": name, "layers": len(layers), "routes": routes, "peak_gib": peak / 2**30,
                     "refused": refused, "plan_seconds": time.perf_counter() - t})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _cell(result: dict, scale: float = 1.0) -> tuple[str, str]:
    if "error" in result:
        return ("-", result["error"][:60])
    return (f"{result['seconds'] * scale:.2f}" + (" *" if scale != 1 else ""), f"{result['peak_mib'] / 1024:.2f}")


def print_tables(deep: list[dict], local: list[dict], plans: list[dict]):
    from bench_weights_vgg19 import show_table  # noqa: E402  (the benchmarks' shared table)

    if plans:
        show_table("every decodable layer, all neurons, planned at its centre on this machine's free memory",
                   ["model", "layers", "routes", "largest peak GiB", "refused", "planning s"],
                   [[r["model"], str(r["layers"]), ", ".join(f"{k} {v}" for k, v in sorted(r["routes"].items())),
                     f"{r['peak_gib']:.2f}", str(len(r["refused"])), f"{r['plan_seconds']:.1f}"] for r in plans])
    if deep:
        body = []
        for r in deep:
            ours, bottom, torch_side = _cell(r["fdsub"], r["scale"]), _cell(r["bottom_up"]), _cell(r["torch"],
                                                                                               r["scale"])
            ratio = ("-" if "error" in r["fdsub"] or "error" in r["torch"] else
                     f"{r['torch']['seconds'] / r['fdsub']['seconds']:.2f}x")
            route = r["fdsub"].get("plan", "").split(" (")[0].split(": ", 1)[-1]
            body.append([f"{r['model']} {r['layer']}", r["neurons"], route, *ours, *bottom, *torch_side, ratio,
                         f"{r['torch'].get('max_rel_err', float('nan')):.1e}"])
        show_table("deepest convs, weights mode at the centre (* measured on --chunk neurons, scaled)",
                   ["layer", "neurons", "route", "fdsub s", "GiB", "bottom-up s", "GiB", "torch batched s", "GiB",
                    "torch / fdsub", "max rel err"], body)
    for r in local:
        sides = (("fdsub now", "now"), ("fdsub before", "today"), ("torch batched (real net)", "torch"))
        body = [[side, *_cell(r[key]), f"{100 * r[key].get('stolen', float('nan')):.0f}%"] for side, key in sides]
        show_table(f"local mode, demo conv4, top 100 of builtin:glyphs:256, {r['now'].get('instances', '?')} "
                   f"instances; now vs before: max rel diff {r['now'].get('max_rel_diff_vs_today', float('nan')):.1e}",
                   ["side", "seconds", "peak GiB", "CPU stolen by the VM host"], body)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--only", default="resnet50,densenet121,inception_v2,local,plan",
                        help="comma-separated: resnet50, densenet121, inception_v2, local, plan (every zoo layer)")
    parser.add_argument("--chunk", type=int, default=128, help="neurons measured for the all-neurons rows")
    parser.add_argument("--top", type=int, default=100, help="local: instances per neuron")
    parser.add_argument("--today-root", help="local: a checkout of the previous version to time against")
    parser.add_argument("--skip-bottom-up", action="store_true", help="leave out the bottom-up column (slow)")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "deep.json")
    args = parser.parse_args(argv)
    if args.job:
        spec = json.loads(args.job)
        print(json.dumps(job_local(spec) if "top" in spec else job_deep(spec)))
        return 0
    only = args.only.split(",")
    deep, local, plans = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if "plan" in only:
            plans = plan_rows(folder)
        for name in DEEP:
            if name in only:
                deep += deep_rows(name, args, folder)
        if "local" in only:
            local = local_rows(args, folder)
    print_tables(deep, local, plans)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"deep": deep, "local": local, "plan": plans, "threads": THREADS}, indent=1)
                         + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
