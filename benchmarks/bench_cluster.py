"""`top` on a Dask cluster: images/s of `capture_top` in one process, on `local:1` and on `local:2` (scaling and the
scheduler's overhead), the results checked bit for bit, and the plan for the 1.28M ImageNet training images on N
workers from the measured per-image cost.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_cluster.py [--images 128] [--batch 16] [--layer r68] [--repeat 3]

Model: the onnx package's light ResNet50 topology, weights re-randomized (``fdsub_onnx.evaluate.zoo``), input
[1, 3, 224, 224], captured at ``--layer`` (r68: a conv of res3, 128 neurons on 28x28; r168: the last conv,
2048 neurons on 7x7). Images: standard-normal arrays in a .npy file, which workers map by path. Each configuration
is run ``--repeat`` times in the same process: the first cluster run includes each worker's model load and
onnxruntime session ("cold"), later ones reuse them ("warm"); a one-process run always makes its session. Cluster
start-up is timed apart. Peak memory: the largest resident set of this process and of each worker process.
Busy: the share of the machine's CPU time used while the runs ran, by these processes and by others.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time

import numpy as np
import onnx
from rich.console import Console
from rich.table import Table

import fdsub_onnx as fd
from fdsub_onnx.data.topn import top_arrays
from fdsub_onnx.evaluate.zoo import light_path, randomized
from fdsub_onnx.runtime.cluster import MAX_BLOCK_BATCHES, plan_blocks

IMAGENET_TRAIN = 1_281_167


def cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine so far (from /proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - (v[4] if len(v) > 4 else 0)) / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_mib() -> float:
    """This process's peak resident set (VmHWM: unlike ru_maxrss, not inherited from the process that spawned it)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def run(model, layer, images, top, batch, client):
    """One timed capture: (seconds, result, CPU seconds of this process and the workers, machine busy seconds)."""
    workers_before = sum(client.run(own_cpu).values()) if client is not None else 0.0
    machine, own, start = cpu_seconds(), own_cpu(), time.perf_counter()
    result = fd.capture_top(model, layer, images, top=top, batch_size=batch, client=client)
    wall = time.perf_counter() - start
    ours = own_cpu() - own + ((sum(client.run(own_cpu).values()) - workers_before) if client is not None else 0.0)
    return wall, result, ours, cpu_seconds() - machine


def same(a, b) -> bool:
    return all(x.tobytes() == y.tobytes() for x, y in zip(top_arrays(a).values(), top_arrays(b).values()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--layer", default="r68")
    parser.add_argument("--top", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--clusters", default="local:1,local:2")
    parser.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "cluster.json"))
    args = parser.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="fdsub-bench-cluster-")
    path = os.path.join(folder, "resnet50.onnx")
    onnx.save(randomized(light_path("resnet50")), path)
    model = fd.load_model(path)
    array = os.path.join(folder, "images.npy")
    np.save(array, np.random.default_rng(0).standard_normal((args.images, 3, 224, 224)).astype(np.float32))
    images = fd.open_images(array, model.input_shape[1:])
    cpus = len(os.sched_getaffinity(0))
    rows, reference = [], None

    def record(name, client, startup):
        nonlocal reference
        for attempt in range(args.repeat):
            wall, result, ours, busy = run(model, args.layer, images, args.top, args.batch, client)
            reference = reference if reference is not None else result
            workers = client.run(peak_mib) if client is not None else {}
            rows.append({"config": name, "run": "cold" if client is not None and attempt == 0 else "warm"
                         if client is not None else f"#{attempt + 1}", "seconds": wall,
                         "images_per_s": args.images / wall, "identical": same(reference, result),
                         "startup_s": startup, "client_peak_mib": peak_mib(),
                         "worker_peak_mib": max(workers.values()) if workers else None,
                         "ours_busy": ours / (wall * cpus), "others_busy": max(busy - ours, 0.0) / (wall * cpus)})

    record("1 process", None, None)
    for spec in args.clusters.split(","):
        start = time.perf_counter()
        with fd.connect(spec) as client:
            record(spec, client, time.perf_counter() - start)

    base = max(r["images_per_s"] for r in rows if r["config"] == "1 process")
    table = Table(title=f"capture_top of ResNet50 {args.layer} (top {args.top}, all neurons), {args.images} images "
                        f"224x224, batch {args.batch}, {cpus} cores")
    for column in ("configuration", "run", "seconds", "images/s", "vs 1 process", "start-up (s)",
                   "peak MiB client / worker", "busy: ours / others", "identical"):
        table.add_column(column, justify="left" if column in ("configuration", "run") else "right")
    for r in rows:
        table.add_row(r["config"], r["run"], f"{r['seconds']:.2f}", f"{r['images_per_s']:.1f}",
                      f"{r['images_per_s'] / base:.2f}x", "-" if r["startup_s"] is None else f"{r['startup_s']:.1f}",
                      f"{r['client_peak_mib']:.0f} / " + ("-" if r["worker_peak_mib"] is None
                                                          else f"{r['worker_peak_mib']:.0f}"),
                      f"{r['ours_busy']:.0%} / {r['others_busy']:.0%}", "yes" if r["identical"] else "NO")
    console = Console() if Console().is_terminal else Console(width=200)
    console.print(table)

    # the plan on paper, from the per-image cost of one worker with this machine's cores: the one-process rate
    # (no scheduler) and the warm local:1 rate (what a worker of a cluster did here)
    rates = {name: min(r["seconds"] for r in rows if r["config"] == name and r["run"] != "cold") / args.images
             for name in ("1 process", "local:1") if any(r["config"] == name for r in rows)}
    batch = 32
    blocks = plan_blocks(0, IMAGENET_TRAIN, batch, 64)
    shape = model.shapes[fd.find_layer(model, args.layer).output[0]]
    partial_mib = shape[1] * args.top * (4 + 8 + 16) / 2**20
    console.print(f"plan for {IMAGENET_TRAIN:,} images (batch {batch}): blocks of at most {MAX_BLOCK_BATCHES * batch} "
                  f"images ({len(blocks):,} blocks with 64 workers), each returning a {partial_mib:.1f} MiB partial "
                  "top-N; cost per image of one worker with this machine's cores: "
                  + ", ".join(f"{name} {cost * 1e3:.0f} ms" for name, cost in rates.items()))
    plan = []
    for workers in (1, 16, 64, 256):
        hours = {name: IMAGENET_TRAIN * cost / workers / 3600 for name, cost in rates.items()}
        plan.append({"workers": workers, "hours": hours})
        console.print(f"  {workers:>4} workers like this machine: "
                      + ", ".join(f"{h:.2f} h at the {name} rate" for name, h in hours.items()))
    identical = all(r["identical"] for r in rows)
    with open(args.json, "w") as f:
        json.dump({"args": vars(args), "cpus": cpus, "rows": rows, "per_image_s": rates, "plan": plan,
                   "blocks_1_28M": len(blocks), "partial_mib": partial_mib}, f, indent=2)
    console.print(f"written {args.json}; results identical to one process: {'yes' if identical else 'NO'}")
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
