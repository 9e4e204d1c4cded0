"""Render the README's pictures of the demo model from the library itself, so that they can be reproduced.

    python docs/make_figures.py            # all three, into docs/
    python docs/make_figures.py --only layers

- ``demo-filters.png``: ``filters.png`` of ``fdsub decode models/demo.onnx --layer conv4`` (weights mode).
- ``demo-layers.png``: neurons 0-15 of conv1-conv4 (columns) decoded by ``weights``, ``fds``, ``local`` and
  ``deconvnet`` (rows), top 16 of ``builtin:glyphs:256``: the paper's supplementary figure, layer by layer.
- ``report.png``: the conv4 section of ``fdsub report ... --layers conv4 --neurons 0-15``, rendered by headless
  Chromium (skipped with a note where Chromium is missing).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fdsub_onnx as fd  # noqa: E402  (the checkout's own package)

MODEL = ROOT / "models" / "demo.onnx"
IMAGES = "builtin:glyphs:256"
LAYERS = ("conv1", "conv2", "conv3", "conv4")
MODES = ("weights", "fds", "local", "deconvnet")
NEURONS = "0-15"
TOP = 16
COLUMN = 280  # px per layer in demo-layers.png
MARGIN = 90  # px for the row labels
REPORT_CROP = (0, 555, 1210, 1430)  # the conv4 section in a 1280x1800 screenshot of the one-layer report


def demo_filters(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        fd.save_decoded(fd.decode(fd.load_model(MODEL), "conv4"), Path(tmp) / "conv4")
        shutil.copy(Path(tmp) / "conv4" / "filters.png", out / "demo-filters.png")


def demo_layers(out: Path) -> None:
    model = fd.load_model(MODEL)
    images = fd.open_images(IMAGES, model.input_shape[1:])
    substitution = fd.gather_statistics(model, list(LAYERS), images, top=TOP)
    options = {"weights": {}, "fds": {"substitution": substitution},
               "local": {"images": images, "top": TOP}, "deconvnet": {"images": images, "top": TOP}}
    grids = [[fd.filter_grid(fd.decode(model, layer, neurons=NEURONS, mode=mode, **options[mode]).filters)
              for layer in LAYERS] for mode in MODES]
    grids = [[g.resize((COLUMN, round(g.height * COLUMN / g.width)), Image.Resampling.NEAREST) for g in row]
             for row in grids]
    font = ImageFont.load_default()
    heights = [max(g.height for g in row) for row in grids]
    canvas = Image.new("RGB", (MARGIN + len(LAYERS) * (COLUMN + 6), 20 + sum(h + 6 for h in heights)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, layer in enumerate(LAYERS):
        draw.text((MARGIN + j * (COLUMN + 6) + COLUMN // 2 - 12, 4), layer, fill="black", font=font)
    y = 20
    for mode, row, height in zip(MODES, grids, heights):
        draw.text((6, y + height // 2 - 6), mode, fill="black", font=font)
        for j, grid in enumerate(row):
            canvas.paste(grid, (MARGIN + j * (COLUMN + 6), y))
        y += height + 6
    canvas.save(out / "demo-layers.png", optimize=True)


def report(out: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("note: chromium is not installed; report.png left as it is")
        return
    with tempfile.TemporaryDirectory() as tmp:
        page = fd.report(fd.load_model(MODEL), IMAGES, Path(tmp) / "report", layers="conv4", neurons=NEURONS, top=TOP)
        shot = Path(tmp) / "shot.png"
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--screenshot={shot}", "--window-size=1280,1800", page.as_uri()],
                       check=True, capture_output=True, timeout=120)
        with Image.open(shot) as image:
            section = image.convert("RGB").crop(REPORT_CROP)
        section.quantize(256, method=Image.Quantize.MEDIANCUT).save(out / "report.png", optimize=True)


FIGURES = {"filters": demo_filters, "layers": demo_layers, "report": report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(FIGURES), action="append", help="render only these figures")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="folder for the pictures (default: docs/)")
    args = parser.parse_args()
    for name in args.only or FIGURES:
        FIGURES[name](args.out)
        print(f"rendered {name}")


if __name__ == "__main__":
    main()
