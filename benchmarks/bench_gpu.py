"""Benchmark: the GPU backend (issue 4), in one call, one printed table per part.

1. Ceilings of the machine, measured here: a large FP32 matrix product through CuPy (and the same with
   TF32 allowed, CUPY_TF32=1, in a child process since CuPy reads it at import), and a device-to-device copy.
2. Whole-network ``weights`` decode (``fd.iter_decode``, every decodable layer) of the VGG19 topology at
   224 (benchmarks/bench_weights_vgg19.py's weights) and of the ResNet50 topology of the onnx package
   (weights re-randomized), and ``light_vgg19``: the onnx package's VGG19, every conv layer at
   ``positions="interior"``, the workload of bench_compose.py (issue 27: its spectral route on the GPU): wall
   time on the GPU with the fused shifted accumulation and tap by tap, the matrix-product FLOPs of the
   composition (counted at the backend's ``matmul``) per second as a share of the FP32 GEMM ceiling (target
   >= 50%), and the speed-up over the NumPy backend run in the same process.
3. ``fds`` and ``local`` for all neurons of a deep VGG19 layer (conv4_4 at 64x64, 256 images, top 100)
   against the Captum way on the same GPU: per neuron, one torch CUDA forward + backward through the
   real network on the batch of its 100 instance images (the instances are fdsub's own), sampled neurons
   extrapolated to the layer.

Run on a GPU machine (needs ``pip install -e '.[gpu,bench]'``; about 5 to 10 minutes on an H100):

    PYTHONPATH=. python benchmarks/bench_gpu.py --threads $(nproc)   # everything, results/gpu.json
    PYTHONPATH=. python benchmarks/bench_gpu.py --parts ceilings weights --networks vgg19
    PYTHONPATH=. python benchmarks/bench_gpu.py --smoke              # tiny sizes and the first layers only, on
                                                                     # whatever device is there (a CPU machine
                                                                     # too): checks the script, times nothing useful

tools/gpu_check.sh runs it part by part after the GPU tests, within a short GPU lease.

Without a GPU (and without --smoke) it says so in one line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# Imported first: they fix the thread counts before NumPy and torch are imported.
from bench_fds import neuron_gradients, real_vgg19_torch
from bench_weights_vgg19 import sample_channels, show_table, vgg19_convs, vgg19_onnx

# isort: split
import numpy as np
import onnx

import fdsub_onnx as fd
from fdsub_onnx.compose import backend as _backend
from fdsub_onnx.compose.backend import CupyBackend, NumpyBackend, gpu_unavailable

HERE = Path(__file__).resolve().parent


# ---- timing on either device ------------------------------------------------------------------------
def sync(xp) -> None:
    if xp is not np:
        xp.cuda.Device().synchronize()


def timed(fn, xp, repeat: int = 1) -> float:
    """Best wall seconds of ``repeat`` runs of ``fn()``, the device synchronized around each."""
    best = float("inf")
    for _ in range(repeat):
        sync(xp)
        start = time.perf_counter()
        fn()
        sync(xp)
        best = min(best, time.perf_counter() - start)
    return best


# ---- 1. ceilings ----------------------------------------------------------------------------------
def gemm_ceiling(xp, n: int) -> float:
    """FLOP/s of an n x n x n float32 matrix product (best of 5 after a warm-up)."""
    a = xp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype=np.float32)
    b, c = a.copy(), xp.empty((n, n), np.float32)
    xp.matmul(a, b, out=c)
    return 2 * n**3 / timed(lambda: xp.matmul(a, b, out=c), xp, repeat=5)


def copy_ceiling(xp, nbytes: int) -> float:
    """Bytes/s moved (read + write) by a device-to-device copy of ``nbytes``."""
    src = xp.ones(nbytes // 4, np.float32)
    dst = xp.empty_like(src)
    xp.copyto(dst, src)
    return 2 * src.nbytes / timed(lambda: xp.copyto(dst, src), xp, repeat=5)


def tf32_ceiling(n: int) -> float | None:
    """The FP32 product with TF32 tensor cores allowed: CuPy reads CUPY_TF32 at import, so in a child process."""
    env = dict(os.environ, CUPY_TF32="1")
    code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import cupy; "
            f"from bench_gpu import gemm_ceiling; print(gemm_ceiling(cupy, {n}))")
    done = subprocess.run([sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True)
    return float(done.stdout.split()[-1]) if done.returncode == 0 and done.stdout.split() else None


# ---- 2. whole-network weights decode ------------------------------------------------------------------
class CountingMatmul:
    """Adds 2*m*k*n per matrix product of the backends (the composition's GEMM FLOPs) while active."""

    def __init__(self):
        self.flops = 0

    def __enter__(self):
        self.saved = {cls: cls.matmul for cls in (NumpyBackend, CupyBackend)}
        for cls, original in self.saved.items():
            def counting(backend, a, b, out=None, _original=original):
                self.flops += 2 * a.shape[-2] * a.shape[-1] * b.shape[-1] * int(np.prod(a.shape[:-2], dtype=np.int64))
                return _original(backend, a, b, out=out)
            cls.matmul = counting
        return self

    def __exit__(self, *exc):
        for cls, original in self.saved.items():
            cls.matmul = original


def resnet50_model(folder: Path) -> fd.Model:
    from fdsub_onnx.evaluate.zoo import light_path, randomized

    path = folder / "resnet50.onnx"
    onnx.save(randomized(light_path("resnet50"), seed=0), path)
    return fd.load_model(path)


def vgg19_model(folder: Path, size: int) -> fd.Model:
    path = folder / f"vgg19_{size}.onnx"
    onnx.save(vgg19_onnx(vgg19_convs(0), size), path)
    return fd.load_model(path)


@dataclass
class WeightsRow:
    network: str
    layers: int
    neurons: int
    gpu_s: float = 0.0
    gpu_unfused_s: float = 0.0
    cpu_s: float = 0.0
    gflop: float = 0.0
    tflops: float = 0.0
    ceiling_share: float = 0.0
    speedup: float = 0.0
    max_rel_err: float = 0.0


@dataclass
class Workload:
    """What one row of the weights part decodes: ``layers`` (None: every decodable layer) at ``positions``."""
    model: fd.Model
    layers: list[str] | None = None
    positions: str | None = None


def decode_all(work: Workload, device, fused: bool = True):
    """The workload's layers in one bottom-up walk; returns {layer: filters} (NumPy)."""
    extra = {} if work.positions is None else {"positions": work.positions}
    with _fused(fused):
        return {d.layer: d.filters for d in fd.iter_decode(work.model, layers=work.layers, device=device, **extra)}


class _fused:
    def __init__(self, fused):
        self.fused = fused

    def __enter__(self):
        self.saved = _backend.BACKENDS["cupy"]
        _backend.BACKENDS["cupy"] = lambda: CupyBackend(fused=self.fused)

    def __exit__(self, *exc):
        _backend.BACKENDS["cupy"] = self.saved


def workload(name: str, folder: Path, size: int, smoke: bool) -> Workload:
    """The network ``name`` of ``--networks`` and what is decoded of it (a smoke run: its first four layers)."""
    if name == "light_vgg19":
        from bench_compose import decoded_layers, model_path

        model = fd.load_model(model_path("vgg19"))
        work = Workload(model, decoded_layers(fd, model), "interior")
    else:
        work = Workload(vgg19_model(folder, size) if name == "vgg19" else resnet50_model(folder))
    if smoke:
        work.layers = (work.layers or [layer.name for layer in fd.inspect_model(work.model).layers
                                       if layer.decodable])[:4]
    return work


def bench_weights(work: Workload, name: str, device: str, xp, gemm: float, cpu: bool) -> WeightsRow:
    model = work.model
    first = next(layer.name for layer in fd.inspect_model(model).layers if layer.decodable)
    fd.decode(model, first, device=device)  # warm-up: CUDA context, kernel compilation, cuBLAS handles
    with CountingMatmul() as count:
        start = time.perf_counter()
        result = decode_all(work, device)
        gpu_s = time.perf_counter() - start
    row = WeightsRow(name, len(result), sum(len(f) for f in result.values()), gpu_s=gpu_s, gflop=count.flops / 1e9)
    row.tflops = count.flops / gpu_s / 1e12
    row.ceiling_share = count.flops / gpu_s / gemm
    start = time.perf_counter()
    decode_all(work, device, fused=False)
    row.gpu_unfused_s = time.perf_counter() - start
    if cpu:
        start = time.perf_counter()
        reference = decode_all(work, "cpu")
        row.cpu_s = time.perf_counter() - start
        row.speedup = row.cpu_s / row.gpu_s
        row.max_rel_err = max(float(np.abs(result[k] - v).max() / max(np.abs(v).max(), 1e-30))
                              for k, v in reference.items())
    del result
    return row


# ---- 3. fds / local against torch per-neuron autograd --------------------------------------------------
@dataclass
class DataRow:
    mode: str
    layer: str
    neurons: int
    images: int
    top: int
    fdsub_s: float = 0.0
    baseline_ms_per_neuron: float = 0.0
    baseline_extrapolated_s: float = 0.0
    ratio: float = 0.0


def bench_data(folder: Path, layer: str, size: int, count: int, top: int, sample: int, device: str, torch_device: str,
               modes=("fds", "local")) -> list[DataRow]:
    import torch

    convs = vgg19_convs(0)
    model = vgg19_model(folder, size)
    x = np.random.default_rng(0).standard_normal((count, 3, size, size)).astype(np.float32)
    images = fd.ArrayImages(x)
    found = fd.capture_top(model, layer, images, top=top, device=device)
    rows = []
    for mode in modes:
        start = time.perf_counter()
        decoded = fd.decode(model, layer, mode=mode, images=images, top=top, device=device)
        rows.append(DataRow(mode, layer, len(decoded.neurons), count, top, fdsub_s=time.perf_counter() - start))
    net = real_vgg19_torch(convs, layer).to(torch_device)
    pictures = torch.from_numpy(x).to(torch_device)
    samples = sample_channels(len(found.neurons), sample)

    def one(k):
        keep = found.image_index[k] >= 0
        idx = torch.from_numpy(found.image_index[k][keep]).to(torch_device)
        pos = torch.from_numpy(found.position[k][keep]).to(torch_device)
        neuron_gradients(net, pictures[idx], int(found.neurons[k]), pos[:, 0], pos[:, 1])

    def synced(k):
        one(k)
        if torch_device == "cuda":
            torch.cuda.synchronize()

    synced(samples[0])  # warm-up (cuDNN autotune, allocator)
    times = []
    for k in samples:
        start = time.perf_counter()
        synced(k)
        times.append(time.perf_counter() - start)
    per_neuron = float(np.mean(times))
    for row in rows:
        row.baseline_ms_per_neuron = 1e3 * per_neuron
        row.baseline_extrapolated_s = per_neuron * row.neurons
        row.ratio = row.baseline_extrapolated_s / row.fdsub_s
    return rows


# ---- the run ------------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["ceilings", "weights", "data"],
                        choices=["ceilings", "weights", "data"])
    parser.add_argument("--networks", nargs="+", default=["vgg19", "resnet50"],
                        choices=["vgg19", "resnet50", "light_vgg19"])
    parser.add_argument("--size", type=int, default=224, help="VGG19 input size for the weights part (default 224)")
    parser.add_argument("--no-cpu", action="store_true", help="skip the NumPy-backend run of the weights part")
    parser.add_argument("--layer", default="conv4_4", help="data part: VGG19 layer (default conv4_4)")
    parser.add_argument("--data-size", type=int, default=64, help="data part: input size (default 64)")
    parser.add_argument("--images", type=int, default=256, help="data part: images (default 256)")
    parser.add_argument("--top", type=int, default=100, help="data part: instances per neuron (default 100)")
    parser.add_argument("--sample", type=int, default=8, help="data part: baseline neurons timed (default 8)")
    parser.add_argument("--threads", type=int, default=2,
                        help="threads of NumPy/OpenBLAS, torch CPU and onnxruntime (default 2; give the machine's "
                             "core count on a GPU machine so the NumPy backend is compared at its best)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on any device: checks the script only")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "gpu.json", help="where to write the results")
    args = parser.parse_args(argv)

    why_not = gpu_unavailable()
    if why_not and not args.smoke:
        print(f"error: this benchmark needs a CUDA GPU ({why_not}); --smoke checks the script on a CPU",
              file=sys.stderr)
        return 2
    if args.smoke:
        args.size, args.data_size, args.images, args.top, args.sample = 32, 32, 16, 4, 2
        args.layer = "conv2_2"
    device = "cpu" if why_not else "gpu"
    xp = np if why_not else _backend._import_cupy()
    torch_device = "cpu" if why_not else "cuda"
    results = {"device": device, "smoke": args.smoke, "environment": environment(xp)}

    gemm = None
    if "ceilings" in args.parts or "weights" in args.parts:
        n = 512 if args.smoke else 8192
        gemm = gemm_ceiling(xp, n)
        results["ceilings"] = {"gemm_fp32_flops": gemm, "gemm_n": n,
                               "copy_bytes_per_s": copy_ceiling(xp, (64 << 20) if args.smoke else (2 << 30)),
                               "gemm_tf32_flops": None if why_not else tf32_ceiling(n)}
        c = results["ceilings"]
        tf32 = "-" if c["gemm_tf32_flops"] is None else f"{c['gemm_tf32_flops'] / 1e12:.1f}"
        show_table(f"ceilings on {device}", ["measure", "value"],
                   [[f"FP32 GEMM n={n} (TFLOP/s)", f"{gemm / 1e12:.1f}"], [f"TF32 GEMM n={n} (TFLOP/s)", tf32],
                    ["device-to-device copy (GB/s, read + write)", f"{c['copy_bytes_per_s'] / 1e9:.0f}"]])

    folder = Path(os.environ.get("TMPDIR", "/tmp")) / "fdsub-bench-gpu"
    folder.mkdir(parents=True, exist_ok=True)
    if "weights" in args.parts:
        rows = []
        for name in args.networks:
            work = workload(name, folder, args.size, args.smoke)
            rows.append(bench_weights(work, name, device, xp, gemm, cpu=not args.no_cpu))
            print(f"  {name}: {rows[-1]}", file=sys.stderr)
        results["weights"] = [asdict(r) for r in rows]
        show_table("whole-network weights decode", ["network", "layers", "neurons", "GPU fused (s)",
                                                     "GPU tap by tap (s)", "GEMM TFLOP/s", "share of FP32 ceiling",
                                                     "NumPy (s)", "speed-up", "max rel err"],
                   [[r.network, str(r.layers), str(r.neurons), f"{r.gpu_s:.2f}", f"{r.gpu_unfused_s:.2f}",
                     f"{r.tflops:.1f}", f"{r.ceiling_share:.0%}", f"{r.cpu_s:.1f}" if r.cpu_s else "-",
                     f"{r.speedup:.1f}x" if r.speedup else "-", f"{r.max_rel_err:.1e}"] for r in rows])

    if "data" in args.parts:
        rows = bench_data(folder, args.layer, args.data_size, args.images, args.top, args.sample, device, torch_device)
        results["data"] = [asdict(r) for r in rows]
        show_table(f"{args.layer}, all neurons, top {args.top} of {args.images} images at {args.data_size}px: "
                   f"fdsub vs torch per-neuron autograd on {torch_device}",
                   ["mode", "neurons", "fdsub (s)", "baseline ms/neuron", "baseline extrap. (s)", "ratio"],
                   [[r.mode, str(r.neurons), f"{r.fdsub_s:.2f}", f"{r.baseline_ms_per_neuron:.1f}",
                     f"{r.baseline_extrapolated_s:.1f}", f"{r.ratio:.1f}x"] for r in rows])
    if not args.smoke:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
        print(f"results: {args.json}")
    return 0


def environment(xp) -> dict:
    import onnxruntime as ort

    env = {"numpy": np.__version__, "onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
           "cpus": os.cpu_count()}
    if xp is not np:
        props = xp.cuda.runtime.getDeviceProperties(0)
        env.update(cupy=xp.__version__, gpu=props["name"].decode(), gpu_memory=props["totalGlobalMem"])
    return env


if __name__ == "__main__":
    sys.exit(main())
