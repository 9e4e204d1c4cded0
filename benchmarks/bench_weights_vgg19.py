"""Benchmark: decode every conv neuron of a VGG19-topology net in ``weights`` mode.

Compares fdsub-onnx's one bottom-up pass (``iter_decode``) with the per-neuron
baseline a Captum user would run: the gradient of the layer's centre neuron with
respect to the input image, one forward + backward per neuron, on the *linearized*
network (ReLU removed, MaxPool 2x2 replaced by AvgPool 2x2). In ``weights`` mode fdsub
treats ReLU as identity and MaxPool as a uniform (average) switch, so both sides
compute the same filters; the benchmark checks that they agree on the sampled neurons.

Run (from the repository root, 2 cores):

    PYTHONPATH=. python benchmarks/bench_weights_vgg19.py            # full run, 224x224
    PYTHONPATH=. python benchmarks/bench_weights_vgg19.py --depth 10 # quick: conv1_1..conv4_2

See benchmarks/README.md for what is measured and how the baseline is set up.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


# Thread counts must be fixed before NumPy (OpenBLAS) and torch are imported.
def _early_threads(argv: list[str]) -> int:
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if arg.startswith("--threads="):
            return int(arg.split("=", 1)[1])
    return 2


_THREADS = _early_threads(sys.argv[1:])
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = str(_THREADS)

import numpy as np  # noqa: E402  (after the thread variables above)
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import fdsub_onnx as fd  # noqa: E402

HERE = Path(__file__).resolve().parent
TOLERANCE = 1e-3  # max relative error allowed between baseline and fdsub filters

# VGG19 feature extractor ("E" configuration): numbers are 3x3 convs (pad 1) + ReLU, "M" a 2x2/2 MaxPool.
VGG19 = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]


# ---------------------------------------------------------------------------------------------
# The network: one list of layers, written out as ONNX (real VGG19: ReLU, MaxPool) and as a
# linearized torch module (no ReLU, AvgPool) from the same weights.


@dataclass
class ConvSpec:
    name: str
    weight: np.ndarray  # [C_out, C_in, 3, 3] float32
    bias: np.ndarray  # [C_out] float32
    pools_before: int  # 2x2 pools between the image and this conv


def vgg19_convs(seed: int) -> list[ConvSpec]:
    """The 16 convs with deterministic He-initialized weights (std sqrt(2 / fan_in)) and small biases."""
    rng = np.random.default_rng(seed)
    convs, c_in, block, index, pools = [], 3, 1, 1, 0
    for item in VGG19:
        if item == "M":
            block, index, pools = block + 1, 1, pools + 1
            continue
        fan_in = c_in * 9
        weight = (rng.standard_normal((item, c_in, 3, 3)) * math.sqrt(2.0 / fan_in)).astype(np.float32)
        bias = rng.uniform(-0.1, 0.1, item).astype(np.float32)
        convs.append(ConvSpec(f"conv{block}_{index}", weight, bias, pools))
        c_in, index = item, index + 1
    return convs


def vgg19_onnx(convs: list[ConvSpec], size: int) -> onnx.ModelProto:
    """VGG19 features as ONNX (Conv, Relu, MaxPool), input ``image`` [1, 3, size, size]."""
    nodes, inits, last, pool = [], [], "image", 0
    by_pools = {}
    for conv in convs:
        by_pools.setdefault(conv.pools_before, []).append(conv)
    for pools in sorted(by_pools):
        while pool < pools:
            pool += 1
            nodes.append(
                helper.make_node(
                    "MaxPool", [last], [f"pool{pool}"], name=f"pool{pool}", kernel_shape=[2, 2], strides=[2, 2]
                )
            )
            last = f"pool{pool}"
        for conv in by_pools[pools]:
            inits += [
                numpy_helper.from_array(conv.weight, f"{conv.name}.weight"),
                numpy_helper.from_array(conv.bias, f"{conv.name}.bias"),
            ]
            nodes.append(
                helper.make_node(
                    "Conv",
                    [last, f"{conv.name}.weight", f"{conv.name}.bias"],
                    [conv.name],
                    name=conv.name,
                    kernel_shape=[3, 3],
                    pads=[1, 1, 1, 1],
                )
            )
            relu = conv.name.replace("conv", "relu")
            nodes.append(helper.make_node("Relu", [conv.name], [relu], name=relu))
            last = relu
    pool += 1
    nodes.append(
        helper.make_node("MaxPool", [last], [f"pool{pool}"], name=f"pool{pool}", kernel_shape=[2, 2], strides=[2, 2])
    )
    graph = helper.make_graph(
        nodes,
        "vgg19_features",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, size, size])],
        [
            helper.make_tensor_value_info(
                f"pool{pool}", TensorProto.FLOAT, [1, convs[-1].weight.shape[0], size >> pool, size >> pool]
            )
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="fdsub-bench")
    onnx.checker.check_model(model)
    return model


def linear_vgg19_torch(convs: list[ConvSpec], upto: str | None = None):
    """The linearized network in torch (ReLU removed, AvgPool 2x2), ending at conv ``upto`` if given.

    Returns (module, {conv name: index of its module}).
    """
    return vgg19_torch(convs, upto, linear=True)


def vgg19_torch(convs: list[ConvSpec], upto: str | None = None, linear: bool = False):
    """VGG19 features in torch from the same arrays as the ONNX model, ending at conv ``upto`` (its output,
    before its ReLU) if given: the real net (Conv + ReLU, MaxPool 2x2) or, with ``linear``, the linearized one
    (no ReLU, AvgPool 2x2, and a last pool when ``upto`` is None). Returns (module, {conv name: module index}).
    """
    import torch

    pool_type = torch.nn.AvgPool2d if linear else torch.nn.MaxPool2d
    layers, where, pool = [], {}, 0
    for conv in convs:
        while pool < conv.pools_before:
            layers.append(pool_type(2, 2))
            pool += 1
        module = torch.nn.Conv2d(conv.weight.shape[1], conv.weight.shape[0], 3, padding=1)
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(conv.weight))
            module.bias.copy_(torch.from_numpy(conv.bias))
        where[conv.name] = len(layers)
        layers.append(module)
        if conv.name == upto:
            break
        if not linear:
            layers.append(torch.nn.ReLU())
    if upto is None:
        layers.append(pool_type(2, 2))
    net = torch.nn.Sequential(*layers).eval()
    return net, where


# ---------------------------------------------------------------------------------------------
# Geometry of the baseline's centre neuron


def centre_window(size: int, pools: int, geom) -> tuple[int, int] | None:
    """(centre output position q, first input row of its window) at input ``size``, or None if it does not fit."""
    height = size >> pools  # 3x3 pad-1 convs keep the size, each 2x2/2 pool floors it by half
    if height < 1:
        return None
    q = (height - 1) // 2
    start = geom.origin[0] + q * geom.stride[0]
    return (q, start) if start >= 0 and start + geom.rf[0] <= size else None


def baseline_size(start: int, pools: int, geom) -> int:
    """Smallest input size >= start whose centre neuron's receptive field lies inside the image."""
    size = max(start, 1)
    while centre_window(size, pools, geom) is None:
        size += 1
    return size


# ---------------------------------------------------------------------------------------------
# The two sides


@dataclass
class Row:
    layer: str
    channels: int
    rf: int
    stride: int
    fdsub_s: float = 0.0
    baseline_input: int = 0
    baseline_ms_per_neuron: float = 0.0
    baseline_sampled: int = 0
    baseline_extrapolated_s: float = 0.0
    ratio: float = 0.0
    max_rel_err_filter: float = 0.0
    max_rel_err_bias: float = 0.0
    batched_neurons: int = 0  # batched torch autograd (the second column): neurons timed, then extrapolated
    batched_ms_per_neuron: float = 0.0
    batched_how: str = ""
    batched_extrapolated_s: float = 0.0
    ratio_batched: float = 0.0
    max_rel_err_batched: float = 0.0
    samples: list[int] = field(default_factory=list)
    baseline_times_ms: list[float] = field(default_factory=list)


def sample_channels(channels: int, n: int) -> list[int]:
    """n channels spread evenly over the layer (all of them when n >= channels)."""
    if n >= channels:
        return list(range(channels))
    return sorted({round(float(v)) for v in np.linspace(0, channels - 1, n)})


class CpuMonitor:
    """CPU time taken by *other* processes while a phase runs (the machine may be shared).

    others = (busy jiffies of the whole machine - this process's CPU time) / (wall * cpus).
    """

    def __init__(self):
        self.tick = os.sysconf("SC_CLK_TCK")
        self.cpus = os.cpu_count() or 1
        self.wall = self.others = self.steal = 0.0

    def _snapshot(self):
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        steal = v[7] if len(v) > 7 else 0
        own = resource.getrusage(resource.RUSAGE_SELF)
        return (
            time.perf_counter(),
            (sum(v[:8]) - idle - steal) / self.tick,
            steal / self.tick,
            own.ru_utime + own.ru_stime,
        )

    def __enter__(self):
        self._start = self._snapshot()
        return self

    def __exit__(self, *exc):
        end = self._snapshot()
        wall, busy, steal, own = (b - a for a, b in zip(self._start, end))
        self.wall += wall
        self.others += max(busy - own, 0.0)
        self.steal += steal

    def share(self) -> dict:
        """Fractions of the machine's CPU time used by other processes / stolen by the hypervisor."""
        capacity = max(self.wall * self.cpus, 1e-9)
        return {"others": self.others / capacity, "steal": self.steal / capacity}


def make_neuron_fn(kind: str, convs, spec: ConvSpec, q: int):
    """A function (x, k) -> (input gradient, neuron value) doing one forward + one backward."""
    import torch

    if kind == "captum":
        from captum.attr import NeuronGradient

        net, where = linear_vgg19_torch(convs)  # the whole network: captum runs the full forward
        attr = NeuronGradient(net, net[where[spec.name]])
        seen = {}
        net[where[spec.name]].register_forward_hook(lambda m, i, o: seen.__setitem__("out", o))

        def neuron(x, k):
            grad = attr.attribute(x, neuron_selector=(k, q, q))
            return grad, seen["out"][0, k, q, q].item()

        return neuron

    net, _ = linear_vgg19_torch(convs, upto=spec.name)  # only the layers below the neuron
    for p in net.parameters():
        p.requires_grad_(False)

    def neuron(x, k):
        out = net(x)[0, k, q, q]
        (grad,) = torch.autograd.grad(out, x)
        return grad, out.item()

    return neuron


def run_baseline(kind: str, convs, spec: ConvSpec, row: Row, geom, start_size: int, kept):
    """Time one forward + backward per sampled neuron; check the gradient window against fdsub."""
    import torch

    size = baseline_size(start_size, spec.pools_before, geom)
    q, y0 = centre_window(size, spec.pools_before, geom)
    r = geom.rf[0]
    neuron = make_neuron_fn(kind, convs, spec, q)
    x = torch.zeros(1, 3, size, size, requires_grad=True)  # the network is affine: any image gives the same gradient
    neuron(x, row.samples[0])  # warm-up (allocator, oneDNN primitives), not timed
    times, err_f, err_b = [], 0.0, 0.0
    filters, biases = kept if kept is not None else (None, None)
    for i, k in enumerate(row.samples):
        t = time.perf_counter()
        grad, value = neuron(x, k)
        window = grad[0, :, y0 : y0 + r, y0 : y0 + r].numpy()  # square input, square RF
        times.append(time.perf_counter() - t)
        if filters is not None:
            ref = filters[i]
            err_f = max(err_f, float(np.abs(window - ref).max() / max(np.abs(ref).max(), 1e-30)))
            # zero image: the neuron's value is its effective bias
            err_b = max(err_b, abs(value - float(biases[i])) / max(float(np.abs(biases).max()), 1e-6))
            outside = float(grad.abs().sum()) - float(np.abs(window).sum())
            err_f = max(err_f, outside / max(float(np.abs(ref).sum()), 1e-30))
    row.baseline_input = size
    row.baseline_sampled = len(times)
    row.baseline_times_ms = [1e3 * t for t in times]
    row.baseline_ms_per_neuron = 1e3 * float(np.mean(times))
    row.baseline_extrapolated_s = row.baseline_ms_per_neuron / 1e3 * row.channels
    row.max_rel_err_filter, row.max_rel_err_bias = err_f, err_b


def run_batched(convs, spec: ConvSpec, row: Row, geom, start_size: int, count: int, kept):
    """Batched torch autograd on the linearized net truncated at the layer: ``count`` neurons (the sampled ones
    first) in one vmapped backward (``is_grads_batched``) or one backward over a batch of input copies, the faster
    of the two; checked against fdsub on the sampled neurons."""
    import torch

    size = baseline_size(start_size, spec.pools_before, geom)
    q, y0 = centre_window(size, spec.pools_before, geom)
    r = geom.rf[0]
    net, _ = linear_vgg19_torch(convs, upto=spec.name)
    for p in net.parameters():
        p.requires_grad_(False)
    picked = (row.samples + [k for k in range(row.channels) if k not in row.samples])[: min(count, row.channels)]
    best, grads = None, None
    for how in ("is_grads_batched", "input_batch"):
        t = time.perf_counter()
        if how == "is_grads_batched":
            x = torch.zeros(1, 3, size, size, requires_grad=True)
            y = net(x)
            seeds = torch.zeros(len(picked), *y.shape)
            for i, k in enumerate(picked):
                seeds[i, 0, k, q, q] = 1.0
            (g,) = torch.autograd.grad(y, x, seeds, is_grads_batched=True)
            g = g[:, 0]
        else:
            x = torch.zeros(len(picked), 3, size, size, requires_grad=True)
            y = net(x)
            seeds = torch.zeros(y.shape)
            for i, k in enumerate(picked):
                seeds[i, k, q, q] = 1.0
            (g,) = torch.autograd.grad(y, x, seeds)
        elapsed = time.perf_counter() - t
        if best is None or elapsed < best[0]:
            best, grads = (elapsed, how), g
    row.batched_neurons, row.batched_how = len(picked), best[1]
    row.batched_ms_per_neuron = 1e3 * best[0] / len(picked)
    row.batched_extrapolated_s = best[0] / len(picked) * row.channels
    if kept is not None:
        filters = kept[0]
        windows = grads[: len(row.samples), :, y0 : y0 + r, y0 : y0 + r].numpy()
        row.max_rel_err_batched = float(np.abs(windows - filters).max() / max(np.abs(filters).max(), 1e-30))


# ---------------------------------------------------------------------------------------------
# Report


def print_table(rows: list[Row], total: dict, title: str):
    header = [
        "layer",
        "channels",
        "RF",
        "fdsub (s)",
        "baseline ms/neuron",
        "baseline extrap. (s)",
        "ratio",
        "batched torch extrap. (s)",
        "ratio vs batched",
        "base input",
        "max rel err",
    ]
    body = [
        [
            r.layer,
            str(r.channels),
            str(r.rf),
            f"{r.fdsub_s:.3f}",
            f"{r.baseline_ms_per_neuron:.1f}",
            f"{r.baseline_extrapolated_s:.1f}",
            f"{r.ratio:.0f}x",
            f"{r.batched_extrapolated_s:.1f}",
            f"{r.ratio_batched:.1f}x",
            str(r.baseline_input),
            f"{max(r.max_rel_err_filter, r.max_rel_err_bias, r.max_rel_err_batched):.1e}",
        ]
        for r in rows
    ]
    foot = [
        "total",
        str(total["channels"]),
        "",
        f"{total['fdsub_s']:.3f}",
        "",
        f"{total['baseline_extrapolated_s']:.1f}",
        f"{total['ratio']:.0f}x",
        f"{total['batched_extrapolated_s']:.1f}",
        f"{total['ratio_batched']:.1f}x",
        "",
        f"{total['max_rel_err']:.1e}",
    ]
    show_table(title, header, body, foot)


def show_table(title: str, header: list[str], body: list[list[str]], foot: list[str] | None = None):
    """A rich table (plain text without rich): first column left-aligned, a bold total row if ``foot``."""
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for i, h in enumerate(header):
            table.add_column(h, justify="left" if i == 0 else "right")
        for line in body:
            table.add_row(*line)
        if foot is not None:
            table.add_section()
            table.add_row(*foot, style="bold")
        Console(width=160).print(table)
    except ImportError:
        lines = [header, *body] + ([foot] if foot is not None else [])
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        print(title)
        for line in lines:
            print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))))


def openblas_core() -> str | None:
    """The kernel family NumPy's bundled OpenBLAS picked at run time (e.g. Haswell = AVX2, SkylakeX = AVX-512)."""
    import ctypes
    import glob

    root = os.path.dirname(os.path.dirname(np.__file__))
    for lib in glob.glob(os.path.join(root, "numpy.libs", "*openblas*")) + glob.glob(
        os.path.join(os.path.dirname(np.__file__), ".dylibs", "*openblas*")
    ):
        try:
            handle = ctypes.CDLL(lib)
        except OSError:
            continue
        for name in (
            "scipy_openblas_get_corename64_",
            "scipy_openblas_get_corename",
            "openblas_get_corename64_",
            "openblas_get_corename",
        ):
            if hasattr(handle, name):
                fn = getattr(handle, name)
                fn.restype = ctypes.c_char_p
                return fn().decode()
    return None


def environment(args) -> dict:
    import torch

    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.processor())
    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "fdsub_onnx": fd.__version__,
        "cpu": cpu,
        "cpus_visible": os.cpu_count(),
        "threads": args.threads,
        "torch_threads": torch.get_num_threads(),
        "openblas_core": openblas_core(),
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--size",
        type=int,
        default=224,
        help="input size of the ONNX model, and the smallest baseline input (default 224)",
    )
    parser.add_argument(
        "--sample", type=int, default=4, help="neurons per layer timed in the baseline, then extrapolated (default 4)"
    )
    parser.add_argument(
        "--depth", type=int, default=16, help="decode only the first N conv layers (quick runs; default all 16)"
    )
    parser.add_argument("--threads", type=int, default=2, help="threads for NumPy/OpenBLAS and torch (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    parser.add_argument(
        "--baseline",
        choices=("torch", "captum"),
        default="torch",
        help="torch: plain autograd on the net truncated at the layer (default, cheapest); "
        "captum: captum.attr.NeuronGradient on the whole net (needs captum)",
    )
    parser.add_argument(
        "--fit",
        choices=("image", "rf"),
        default="image",
        help="baseline input: image = --size, enlarged where the centre neuron's RF does not fit (default); "
        "rf = the smallest input holding the centre neuron's RF",
    )
    parser.add_argument(
        "--order",
        choices=("interleaved", "sequential"),
        default="interleaved",
        help="interleaved (default): each layer's baseline neurons run right after fdsub yields that layer, "
        "so both sides see the same machine load; sequential: the whole fdsub pass, then the baseline",
    )
    parser.add_argument(
        "--json", type=Path, default=HERE / "results" / "vgg19_weights.json", help="where to write the results"
    )
    parser.add_argument("--no-check", action="store_true", help="skip the correctness cross-check (timing only)")
    parser.add_argument("--batched", type=int, default=32,
                        help="neurons per layer in the batched torch autograd column, then extrapolated (0: skip)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    all_convs = vgg19_convs(args.seed)
    convs = all_convs[: args.depth]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "vgg19.onnx")
        onnx.save(vgg19_onnx(all_convs, args.size), path)
        t = time.perf_counter()
        model = fd.load_model(path)
        load_s = time.perf_counter() - t
    t = time.perf_counter()
    layers = {layer.name: layer for layer in fd.inspect_model(model).layers}
    inspect_s = time.perf_counter() - t

    rows, geometry = {}, {}
    for conv in convs:
        layer = layers[conv.name]
        geometry[conv.name] = fd.Geometry(tuple(layer.stride), tuple(layer.receptive_field), tuple(layer.origin))
        rows[conv.name] = Row(
            conv.name,
            layer.channels,
            layer.receptive_field[0],
            layer.stride[0],
            samples=sample_channels(layer.channels, args.sample),
        )
    names = [c.name for c in convs]
    min_size = args.size if args.fit == "image" else (2 ** VGG19.count("M") if args.baseline == "captum" else 1)
    specs = {c.name: c for c in convs}
    fd_cpu, base_cpu = CpuMonitor(), CpuMonitor()

    def baseline(name, kept):
        with base_cpu:
            run_baseline(
                args.baseline,
                all_convs,
                specs[name],
                rows[name],
                geometry[name],
                min_size,
                None if args.no_check else kept,
            )
            if args.batched:
                run_batched(all_convs, specs[name], rows[name], geometry[name], min_size, args.batched,
                            None if args.no_check else kept)
        r = rows[name]
        print(
            f"  baseline {r.layer}: input {r.baseline_input}, {r.baseline_ms_per_neuron:.1f} ms/neuron, "
            f"batched {r.batched_ms_per_neuron:.1f} ms/neuron ({r.batched_how}), "
            f"max rel err {max(r.max_rel_err_filter, r.max_rel_err_bias, r.max_rel_err_batched):.1e}",
            flush=True,
        )

    print(
        f"fdsub: iter_decode over {len(names)} conv layers ({sum(r.channels for r in rows.values())} neurons), "
        f"float32, {args.threads} threads (OpenBLAS kernel {openblas_core()}); baseline: {args.baseline}, "
        f"{args.sample} neurons/layer; order {args.order}",
        flush=True,
    )
    # the interior filters (the baseline's centre neuron is interior on its enlarged input): bottom-up for all
    decoder = fd.iter_decode(model, layers=names, dtype="float32", positions="interior")
    pending = []
    while True:
        with fd_cpu:
            t = time.perf_counter()
            decoded = next(decoder, None)
            elapsed = time.perf_counter() - t
        if decoded is None:
            break
        row = rows[decoded.layer]
        row.fdsub_s = elapsed
        kept = (decoded.filters[row.samples].copy(), decoded.bias[row.samples].copy())
        del decoded
        print(f"  fdsub    {row.layer}: {elapsed:.3f} s", flush=True)
        if args.order == "interleaved":
            baseline(row.layer, kept)
        else:
            pending.append((row.layer, kept))
    del decoder, model
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for name, kept in pending:
        baseline(name, kept)

    for r in rows.values():
        r.ratio = r.baseline_extrapolated_s / r.fdsub_s if r.fdsub_s else float("inf")
        r.ratio_batched = r.batched_extrapolated_s / r.fdsub_s if r.fdsub_s else float("inf")
    ordered = [rows[n] for n in names]
    total = {
        "channels": sum(r.channels for r in ordered),
        "fdsub_s": sum(r.fdsub_s for r in ordered),
        "baseline_extrapolated_s": sum(r.baseline_extrapolated_s for r in ordered),
        "max_rel_err": max(max(r.max_rel_err_filter, r.max_rel_err_bias, r.max_rel_err_batched) for r in ordered),
        "batched_extrapolated_s": sum(r.batched_extrapolated_s for r in ordered),
    }
    total["ratio"] = total["baseline_extrapolated_s"] / total["fdsub_s"]
    total["ratio_batched"] = total["batched_extrapolated_s"] / total["fdsub_s"]
    title = (
        f"VGG19 (random He weights) at {args.size}, weights mode, all conv neurons, {args.threads} threads; "
        f"baseline: {args.baseline}, {args.sample} neurons/layer, extrapolated"
    )
    print_table(ordered, total, title)
    wall = time.perf_counter() - wall
    load = {"fdsub": fd_cpu.share(), "baseline": base_cpu.share()}
    print(
        f"wall: total {wall:.1f} s (fdsub pass {fd_cpu.wall:.1f} s, baseline measured {base_cpu.wall:.1f} s "
        f"incl. warm-ups, model load {load_s:.2f} s, inspect {inspect_s:.2f} s); peak RSS {peak_rss:.0f} MiB"
    )
    print(
        f"machine load from other processes: {100 * load['fdsub']['others']:.0f}% of the CPUs during fdsub, "
        f"{100 * load['baseline']['others']:.0f}% during the baseline (steal {100 * load['fdsub']['steal']:.0f}% / "
        f"{100 * load['baseline']['steal']:.0f}%)"
    )
    if max(v["others"] + v["steal"] for v in load.values()) > 0.10:
        print(
            "WARNING: other processes used more than 10% of the CPUs: the timings are disturbed; "
            "rerun on a quiet machine"
        )
    print(
        f"overall: fdsub {total['fdsub_s']:.1f} s vs baseline {total['baseline_extrapolated_s']:.0f} s (extrapolated) "
        f"-> {total['ratio']:.0f}x; target >= 100x: {'met' if total['ratio'] >= 100 else 'NOT met'}; "
        f"vs batched torch autograd {total['batched_extrapolated_s']:.0f} s (extrapolated) "
        f"-> {total['ratio_batched']:.1f}x"
    )

    args.json.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "vgg19_weights",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": environment(args),
        "rows": [asdict(r) for r in ordered],
        "total": total,
        "wall_s": {
            "total": wall,
            "fdsub_pass": fd_cpu.wall,
            "baseline_measured": base_cpu.wall,
            "load": load_s,
            "inspect": inspect_s,
        },
        "other_processes_cpu_share": load,
        "peak_rss_mib": peak_rss,
        "tolerance": TOLERANCE,
    }
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")

    if not args.no_check and total["max_rel_err"] > TOLERANCE:
        bad = [r.layer for r in ordered if max(r.max_rel_err_filter, r.max_rel_err_bias) > TOLERANCE]
        print(
            f"FAIL: baseline gradient and fdsub filter differ by more than {TOLERANCE:g} (relative) in "
            f"{', '.join(bad)}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
