"""The HTML report: every decoding of some layers side by side, with fidelity, in one self-contained file.

Everything is computed by ``evaluate.compare`` (decodings, instances, fidelity); this module only
renders that comparison and writes ``index.html``: pictures as ``data:`` URIs, inline CSS and a few lines of
inline JS (mode tabs, sortable tables), nothing fetched from elsewhere. Each picture is stored once
(``_Pictures``): a source image, filter or Neuron Feature is a CSS class that every place showing it
uses, and a top patch is its source image cropped by CSS, so the file grows with the images and
neurons shown, not with how often each is shown. Every name that comes from
the model or the image set goes through ``html.escape`` (text and attributes) or ``_json_island``
(the embedded JSON); the JS reads only the page's own attributes.
"""

from __future__ import annotations

import base64
import io
import json
import os
from html import escape
from pathlib import Path

import numpy as np
from PIL import Image

from ..compose.backend import resolve_device
from ..compose.inspect import Layer, Summary, inspect_model, instance_geometry
from ..data.files import check_result_folder, write_atomically
from ..data.images import SampledImages, open_images
from ..defaults import (
    BENCHMARK_RANKING,
    DEFAULT_BATCH,
    DEFAULT_SELECT,
    DEFAULT_WEIGHTING,
    REPORT_FIDELITY_IMAGES,
    REPORT_TOP,
)
from ..errors import FdsubError
from ..evaluate.compare import (
    LayerComparison,
    choose_report,
    compare_layers,
    dropped_note,
    fitting_sample,
    within_memory,
)
from ..evaluate.fidelity import FIDELITY_MODES
from ..graph.model import Model, describe_position, load_model
from ..modes.fds import parse_select, parse_weighting
from ..neurons import means_all
from .render import GAP, block_mean, displayable, displayed, filter_grid

REPORT_HTML = "index.html"
DEFAULT_TOP = REPORT_TOP
#: the filter column's modes, the first one shown: the one the fidelity benchmark ranks best (benchmarks/README.md)
TABS = tuple(mode for mode in BENCHMARK_RANKING if mode in ("fds", "weights", "local"))
SOURCE_MAX = 256  # longest side (px) a source image is stored at (patches are cut from it by CSS)
THUMB = 128  # about how wide (px) a source image is shown with its receptive field drawn on it
PATCH_MAX = 64  # longest side (px) a Neuron Feature is stored at, and about how wide a detail view shows a patch
PATCH_SHOWN = 24  # about how wide (px) a patch is shown in the table
FILTER_MAX = 160  # longest side (px) a filter is stored at: the detail view's width (deep layers' fields are larger)
GRID_SIDE = 64  # longest side (px) of a filter in the per-layer grids (larger ones are block-averaged)
LABELS = {"weights": "weights", "fds": "fds", "local": "local", "deconvnet": "deconvnet", "nf": "NF"}


def report(model: Model | str | os.PathLike, images, out: str | os.PathLike, layers=None, neurons=None,
           top: int = DEFAULT_TOP, holdout=None, select: str = DEFAULT_SELECT, progress=None, device="cpu",
           note=None, batch_size: int = DEFAULT_BATCH, client=None, weighting: str = DEFAULT_WEIGHTING,
           fidelity_images: int | str | None = REPORT_FIDELITY_IMAGES) -> Path:
    """Decode ``layers`` in every mode, measure fidelity and write ``out/index.html``; return its path.

    ``model`` is a ``Model`` or an .onnx path; ``images`` (and ``holdout``) an image set or an
    ``open_images`` spec. ``layers``: names (output tensors or nodes) or a comma-separated string, ``"all"``
    for every decodable Conv layer. ``neurons``: a selector (``parse_neurons``, ``"all"`` for every neuron)
    applied to each layer, keeping the indices the layer has. By default a sample (``choose_report``):
    ``REPORT_LAYERS`` Conv layers from the first to the deepest, the first ``REPORT_NEURONS`` neurons of each,
    said on the page and to ``note``. ``top`` instances per neuron feed the data modes and are
    shown; fds uses ``select`` and ``weighting``. Fidelity is measured on ``holdout`` when given, else on
    ``images``, on ``fidelity_images`` of them evenly spaced (``"all"`` or None: every one; said on the page and
    to ``note``): scoring deep layers costs ~0.1 s per image and decoding. ``progress(done, total)`` counts steps.
    ``device`` ("cpu", "gpu", "auto") as for ``decode``; ``batch_size`` images per onnxruntime run.
    Unless named, layers too deep to decode in the memory left are left out, said on the page and to
    ``note(text)``; named ``layers`` must all fit. A hold-out set no larger than ``top`` (every top-N share
    would be 1) is also said to ``note``.
    The file is written atomically (nothing is left behind on failure). A Dask ``client`` runs the passes over
    images on the cluster (``compare_layers``).

    >>> fd.report(fd.load_model("demo.onnx"), "builtin:glyphs:256", "report/", layers="conv1,conv4")  # doctest: +SKIP
    PosixPath('report/index.html')
    """
    out = Path(out)
    check_result_folder(out, "report")
    if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 1:
        raise FdsubError(f"top must be a positive integer, got {top!r}")
    parse_select(select)
    parse_weighting(weighting)
    device = resolve_device(device)
    model = model if isinstance(model, Model) else load_model(model)
    images = _image_set(images, model)
    held = _image_set(holdout, model) if holdout is not None else None
    scored, sample = fidelity_sample(held if held is not None else images, fidelity_images)
    if sample is not None and note is not None:
        note(sample)
    if note is not None and len(scored) <= top:
        note(f"the fidelity set has {len(scored)} images, not more than top {top}: "
             "every top-N share is 1.00 (give --holdout more images, or a lower --top)")
    summary = inspect_model(model)
    choice = choose_report(model, layers, neurons, summary)
    if choice.note is not None and note is not None:
        note(choice.note)
    named = layers is not None and not means_all(layers)
    chosen, left_out = within_memory(model, choice.layers, choice.picks, named, device)
    kept = {layer.name for layer in chosen}
    picks = [pick for layer, pick in zip(choice.layers, choice.picks) if layer.name in kept]
    if left_out and note is not None:
        note(f"left out {', '.join(left_out)}: no route decodes them in the memory left")
    chosen, picks, dropped, _ = fitting_sample(model, chosen, picks, named, len(images), top, len(scored),
                                               FIDELITY_MODES, batch_size)  # as the plan (estimate_compare) counts it
    if dropped and note is not None:
        note(dropped_note(dropped))
    left_out = left_out + dropped
    steps = 2 + 3 * len(chosen)  # compare_layers' 1 + 3 per layer, then the page

    def compared(done, total):  # compare_layers counts its estimated seconds: the same share of the steps
        if progress is not None:
            progress((steps - 1) * done / total if total else 0.0, steps)

    compared_layers = compare_layers(model, chosen, picks, images, scored, top=top, select=select, progress=compared,
                                     device=device, batch_size=batch_size, client=client, weighting=weighting)
    page = render_report(model, summary, compared_layers, images, held, top, select, left_out, weighting=weighting,
                         sample=choice.note, fidelity_sample=sample,
                         progress=None if progress is None else lambda done, total: progress(steps - 1 + done / total,
                                                                                            steps))
    paths = write_atomically(out, [REPORT_HTML], lambda tmp: (tmp / REPORT_HTML).write_text(page, encoding="utf-8"),
                             kind="report")
    if progress is not None:
        progress(steps, steps)
    return paths[0]


def render_report(model: Model, summary: Summary, compared: list[LayerComparison], images, held, top: int,
                  select: str, left_out: list[str], progress=None, weighting: str = DEFAULT_WEIGHTING,
                  sample: str | None = None, fidelity_sample: str | None = None) -> str:
    """The page of a comparison: one section per layer (computes nothing; every figure comes from ``compared``);
    ``sample`` says what a default sample left out (``ReportChoice.note``), ``fidelity_sample`` which images the
    fidelity figures were scored on when not all (``fidelity_sample``)."""
    sections, data = [], []
    pictures = _Pictures()
    pixels = _Pixels(images, pictures)
    for index, lc in enumerate(compared):
        pixels.load(lc.found.image_index)
        sections.append(_layer_section(model, index, lc, pixels, images, pictures))
        data.append({"layer": lc.layer.name, "neurons": lc.found.neurons.tolist(),
                     "mean_top_activation": lc.mean_top_activation, "fidelity": lc.scores})
        if progress is not None:
            progress(index + 1, len(compared))
    setup = {"model": model.path, "images": _describe(images), "holdout": None if held is None else _describe(held),
             "top": int(top), "select": select, "weighting": weighting, "left_out": left_out,
             "sample": sample, "fidelity_sample": fidelity_sample}
    chosen = [lc.layer for lc in compared]
    return _page(setup, summary, chosen, sections, {"setup": setup, "summary": summary.to_json(), "layers": data},
                 pictures)


# ---- what to report --------------------------------------------------------------------------
def fidelity_sample(images, count: int | str | None):
    """(the images fidelity is scored on, the sentence saying so or None when it is every image): ``count`` of
    ``images`` evenly spaced (``SampledImages``); ``"all"`` or None for every one."""
    if count is None or means_all(count):
        return images, None
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise FdsubError(f"fidelity_images must be a positive integer or 'all', got {count!r}")
    if len(images) <= count:
        return images, None
    return SampledImages(images, int(count)), (f"fidelity scored on {int(count)} of the {len(images)} images, evenly "
                                               "spaced; --fidelity-images all for every one")


def _image_set(images, model):
    return open_images(images, model.input_shape[1:]) if isinstance(images, str) else images


def _describe(images) -> str:
    sources = list(images.sources)
    shown = ", ".join(sources[:2]) + (", ..." if len(sources) > 2 else "")
    return f"{len(sources)} image{'s' if len(sources) != 1 else ''} ({shown})"


# ---- pictures --------------------------------------------------------------------------------
class _Pixels:
    """The images holding instances as displayable uint8 [H, W, 3] (the preprocessing undone), read once each,
    and each one's picture class on the page."""

    def __init__(self, images, pictures: _Pictures):
        self.images, self.pictures, self.rgb, self.classes = images, pictures, {}, {}

    def load(self, image_index: np.ndarray) -> None:
        needed = np.unique(image_index[image_index >= 0])
        self.rgb |= displayed(self.images, needed[[int(i) not in self.rgb for i in needed]])

    def __getitem__(self, index: int) -> np.ndarray:
        return self.rgb[int(index)]

    def picture(self, index: int) -> str:
        """The CSS class showing image ``index`` (stored once, at most SOURCE_MAX px, lossy when that is smaller)."""
        index = int(index)
        if index not in self.classes:
            image = _shrunk(Image.fromarray(self.rgb[index], "RGB"), SOURCE_MAX)
            self.classes[index] = self.pictures.add(image, photo=True)
        return self.classes[index]


def _shrunk(image: Image.Image, side: int) -> Image.Image:
    if max(image.size) <= side:
        return image
    factor = side / max(image.size)
    return image.resize((max(1, round(image.width * factor)), max(1, round(image.height * factor))),
                        Image.Resampling.BILINEAR)


class _Pictures:
    """Every picture of the page, stored once: a CSS class whose background is the picture as a ``data:`` URI.

    Why: one filter shows in the table and in its neuron's detail, one source image under every instance it
    holds (framed, and cropped to each patch); repeating the URI in each <img> made the demo report 4x larger.
    """

    def __init__(self):
        self.classes: dict[str, str] = {}  # data URI -> class name

    def add(self, image: Image.Image, photo: bool = False) -> str:
        """The class showing ``image`` (a new one, or the one of an identical picture). ``photo``: store it
        as JPEG when that is smaller than PNG (photographs; drawings and filters stay lossless)."""
        uri = _data_uri(image, photo)
        return self.classes.setdefault(uri, f"p{len(self.classes)}")

    def style(self) -> str:
        return "\n".join(f".{name}{{background-image:url({uri})}}" for uri, name in self.classes.items())


def _data_uri(image: Image.Image, photo: bool = False) -> str:
    """``image`` as a ``data:`` URI: PNG, or JPEG (quality 90) for a photo when that is smaller."""
    encoded = []
    for kind, options in (("png", {}), ("jpeg", {"quality": 90})) if photo else (("png", {}),):
        buffer = io.BytesIO()
        image.save(buffer, format=kind.upper(), **options)
        encoded.append((len(buffer.getvalue()), kind, buffer.getvalue()))
    _, kind, data = min(encoded)
    return f"data:image/{kind};base64," + base64.b64encode(data).decode("ascii")


def _img(image: Image.Image, width: int, alt: str, cls: str = "") -> str:
    """An <img> of ``image`` shown ``width`` px wide (pixelated when enlarged): for pictures shown once."""
    height = max(1, round(image.height * width / image.width))
    klass = f' class="{escape(cls)}"' if cls else ""
    return f'<img{klass} src="{_data_uri(image)}" width="{width}" height="{height}" alt="{escape(alt)}">'


def _pic(picture: str, size: tuple[int, int], width: int, label: str, cls: str = "", style: str = "",
         inner: str = "") -> str:
    """A box ``width`` px wide showing the picture class ``picture`` of ``size`` (w, h), stretched to fit."""
    height = max(1, round(size[1] * width / size[0]))
    klass = " ".join(c for c in ("pic", picture, cls) if c)
    return (f'<span class="{klass}" role="img" aria-label="{escape(label)}" '
            f'style="width:{width}px;height:{height}px{style}">{inner}</span>')


def _crop(picture: str, image_size: tuple[int, int], box: tuple[int, int, int, int], width: int, label: str) -> str:
    """The window ``box`` (y0, x0, ry, rx) of a source image of ``image_size`` (h, w) shown ``width`` px wide,
    cut out of the image's picture class by CSS; dark gray (``.crop`` in _CSS) where the window leaves the image."""
    (h, w), (y0, x0, ry, rx) = image_size, box
    scale = width / rx
    style = (f";background-size:{w * scale:.6g}px {h * scale:.6g}px;"
             f"background-position:{-x0 * scale:.6g}px {-y0 * scale:.6g}px")
    return _pic(picture, (rx, ry), width, label, "crop", style)


def _framed(picture: str, image_size: tuple[int, int], box: tuple[int, int, int, int], width: int, label: str) -> str:
    """The whole source image shown ``width`` px wide with the receptive field ``box`` drawn on it as a frame
    (clipped to the image, so that all its sides show)."""
    (h, w), (y0, x0, ry, rx) = image_size, box
    top, left = max(y0, 0), max(x0, 0)
    bottom, right = min(y0 + ry, h), min(x0 + rx, w)
    frame = (f'<span class="frame" style="left:{100 * left / w:.4g}%;top:{100 * top / h:.4g}%;'
             f'width:{100 * max(right - left, 0) / w:.4g}%;height:{100 * max(bottom - top, 0) / h:.4g}%"></span>')
    return _pic(picture, (w, h), width, label, "framed", inner=frame)


def _filter_image(filters: np.ndarray) -> Image.Image:
    """One filter [C, R_y, R_x] as the library draws it (``filter_grid``), without the grid's frame; shrunk to
    FILTER_MAX px when larger."""
    grid = filter_grid(filters[None], cell=1)
    return _shrunk(grid.crop((GAP, GAP, grid.width - GAP, grid.height - GAP)), FILTER_MAX)


def _block_mean(filters: np.ndarray, side: int) -> np.ndarray:
    """Filters [K, C, R_y, R_x] averaged over f x f blocks (f the least that brings both sides to at most ``side``)."""
    return block_mean(filters, -(-max(filters.shape[2:]) // side))


def _scaled_width(width: int, target: int) -> int:
    """A display width near ``target`` that is a whole multiple of a picture's ``width`` (crisp pixels)."""
    return width * max(1, round(target / width)) if width < target else target


# ---- HTML ------------------------------------------------------------------------------------
def _layer_section(model, index: int, compared: LayerComparison, pixels: _Pixels, images, pictures: _Pictures
                   ) -> str:
    layer, decoded, found, scores = compared.layer, compared.decoded, compared.found, compared.scores
    lid = f"L{index}"
    name = escape(layer.name)
    neurons = found.neurons
    activation = compared.mean_top_activation
    # a layer decoded per position (tokens): each instance reads the whole image; the filters hold at one position
    geometry = instance_geometry(model, layer.name) if layer.per_position else decoded["weights"].geometry
    (ry, rx), (sy, sx), (oy, ox) = geometry.rf, geometry.stride, geometry.origin
    rows, details = [], []
    for k, neuron in enumerate(neurons):
        nid = f"{lid}-n{int(neuron)}"
        boxes = []
        for n in range(found.top):
            i = int(found.image_index[k, n])
            if i < 0:
                continue
            qy, qx = (int(v) for v in found.position[k, n])
            y0, x0 = (int(v) for v in geometry.corner((qy, qx)))
            boxes.append((n, i, describe_position(model, layer.name, (qy, qx)), (y0, x0, ry, rx)))
        shown = {mode: _filter_image(decoded[mode].filters[k]) for mode in ("weights", "fds", "local", "deconvnet")}
        shown["nf"] = _shrunk(Image.fromarray(displayable(decoded["nf"].filters[k : k + 1],
                                                           getattr(images, "preset", None))[0]), PATCH_MAX)
        shown = {mode: (pictures.add(image), image.size) for mode, image in shown.items()}
        r = {mode: scores["decodings"][mode]["correlation"][k] for mode in FIDELITY_MODES}
        small = {mode: _pic(*shown[mode], _scaled_width(shown[mode][1][0], 48), f"{LABELS[mode]} filter",
                            f"m m-{mode}" if mode in TABS else "") for mode in shown}
        cells = [f'<td data-v="{int(neuron)}"><a href="#{nid}" title="details of neuron {int(neuron)}">'
                 f'{int(neuron)}</a></td>',
                 "<td>" + "".join(small[mode] for mode in TABS) + "</td>",
                 f"<td>{small['deconvnet']}</td>", f"<td>{small['nf']}</td>"]
        patch_width = _scaled_width(rx, PATCH_SHOWN)
        cells.append('<td class="patches">' + ("".join(
            _crop(pixels.picture(i), pixels[i].shape[:2], box, patch_width, f"patch #{n + 1}")
            for n, i, _, box in boxes) or "no instance") + "</td>")
        cells.append(_number_cell(activation[k]))
        cells.extend(_number_cell(r[mode]) for mode in FIDELITY_MODES)
        rows.append("<tr>" + "".join(cells) + "</tr>")
        details.append(_detail(lid, nid, layer, int(neuron), k, decoded, shown, scores, found, boxes, pixels, images,
                               geometry.rf))
    grids = {mode: filter_grid(_block_mean(decoded[mode].filters, GRID_SIDE), labels=[str(int(n)) for n in neurons],
                               cell=32)
             for mode in TABS}
    same = {}  # identical grids (fds and weights at a first layer) stored once, shown under each of their tabs
    for mode, grid in grids.items():
        same.setdefault(grid.tobytes() + repr(grid.size).encode(), []).append(mode)
    grids = "".join(_img(grids[modes[0]], grids[modes[0]].width, f"{' and '.join(modes)} filters of every neuron",
                         " ".join(["m", *(f"m-{mode}" for mode in modes)]))
                    for modes in same.values())
    tabbed = "".join(f'<span class="m m-{m}">{m}</span>' for m in TABS)
    filled = int((found.image_index >= 0).sum(axis=1).max(initial=0))  # fewer images than the top asked: as many
    head = ["neuron", f"filter {tabbed}", "deconvnet", "NF", f"top {min(found.top, filled)} patches", "mean<br>act.",
            *(f"r<br>{LABELS[m]}" for m in FIDELITY_MODES)]
    sortable = {0, 5, 6, 7, 8, 9, 10}
    header = "".join(f'<th data-sort="1" title="click to sort">{h}</th>' if c in sortable else f"<th>{h}</th>"
                     for c, h in enumerate(head))
    means = "".join(
        f"<tr><td>{LABELS[m]}</td>{_number_cell(scores['decodings'][m]['mean_correlation'])}"
        f"{_number_cell(scores['decodings'][m]['mean_top_share'], 2)}"
        f"{_number_cell(scores['decodings'][m]['mean_two_choice'])}"
        f"{_degenerate_cell(scores['decodings'][m]['degenerate'], neurons)}</tr>" for m in FIDELITY_MODES)
    tabs = "".join(f'<button type="button" data-mode="{m}"{" class=on" if m == TABS[0] else ""}>{m}</button>'
                   for m in TABS)
    return f"""
<section class="layer" id="{lid}" data-show="{TABS[0]}">
<h2>{name} <small>{escape(layer.op)} node {escape(layer.node)}</small></h2>
<p class="geom">{_geometry_line(model, layer, decoded["weights"], len(neurons), (ry, rx), (sy, sx), (oy, ox))}</p>
<div class="row">
<table class="means"><caption>fidelity on {scores['images']} images (mean over neurons)</caption>
<thead><tr><th>decoding</th><th>Pearson r</th><th>top-{scores['top']} share</th><th>two-choice</th>
<th>degenerate</th></tr></thead>\
<tbody>{means}</tbody></table>
<div class="grids"><div class="tabs">filters: {tabs}</div>{grids}</div>
</div>
<table class="neurons sortable"><thead><tr>{header}</tr></thead><tbody>
{"".join(rows)}
</tbody></table>
{"".join(details)}
</section>"""


def _geometry_line(model, layer, weights, shown: int, rf, stride, origin) -> str:
    """The layer's geometry in one line: a map's stride, field and origin, or where a per-position layer's filters
    were decoded (a token: its patch) and that every instance reads the whole image."""
    (ry, rx), (sy, sx), (oy, ox) = rf, stride, origin
    if layer.per_position:
        tokens = ""
        if layer.patch_grid:
            extra, rows, columns = layer.patch_grid
            tokens = f" &middot; tokens of a {rows}&times;{columns} patch grid" + (
                f" and {extra} before it (a class token)" if extra else "")
        at = describe_position(model, layer.name, weights.position) if weights.position is not None else "one position"
        return (f"{shown} of {layer.channels} neurons{tokens} &middot; decoded one position at a time: the filters "
                f"and fidelity are at {escape(at)}; each instance reads the whole {ry}&times;{rx} image")
    return (f"{shown} of {layer.channels} neurons &middot; stride {sy}&times;{sx} &middot; receptive field {ry}&times;"
            f"{rx} &middot; origin ({oy}, {ox}) &middot; the neuron at output (q<sub>y</sub>, q<sub>x</sub>) reads "
            f"image rows {oy}+{sy}q<sub>y</sub> &hellip; and columns {ox}+{sx}q<sub>x</sub> &hellip;")


def _detail(lid, nid, layer, neuron, k, decoded, shown, scores, found, boxes, pixels, images, field) -> str:
    """A neuron's detail panel: ``shown`` maps each mode to its (picture class, size); ``boxes`` are its instances."""
    figures = []
    for mode in ("weights", "fds", "local", "deconvnet", "nf"):
        picture, size = shown[mode]
        r = scores["decodings"][mode]["correlation"][k]
        share = scores["decodings"][mode]["top_share"][k]
        figures.append(f"<figure>{_pic(picture, size, _scaled_width(size[0], FILTER_MAX), f'{LABELS[mode]} filter')}"
                       f"<figcaption><b>{LABELS[mode]}</b><br>bias {float(decoded[mode].bias[k]):.3g}<br>r {_fmt(r)}"
                       f" &middot; top share {_fmt(share, 2)}"
                       f"{_why(scores['decodings'][mode]['degenerate'][k])}</figcaption></figure>")
    cards = []
    for n, i, where, box in boxes:
        y0, x0, ry, rx = box
        source = escape(str(images.sources[i]))
        (h, w), picture = pixels[i].shape[:2], pixels.picture(i)
        framed = _framed(picture, (h, w), box, _scaled_width(w, THUMB), "receptive field on " + images.sources[i])
        cards.append(
            f'<figure class="instance">{framed}'
            f"{_crop(picture, (h, w), box, _scaled_width(rx, PATCH_MAX), 'patch')}"
            f"<figcaption>#{n + 1} &middot; activation "
            f"{float(found.values[k, n]):.4g}<br><span class=\"src\" title=\"{source}\">{source}</span><br>"
            f"{escape(where)} &rarr; rows {y0}&ndash;{y0 + ry - 1}, columns {x0}&ndash;{x0 + rx - 1}"
            "</figcaption></figure>")
    return f"""<div class="detail" id="{nid}"><div class="panel">
<p class="close"><a href="#{lid}">close &times;</a></p>
<h3>{escape(layer.name)} &middot; neuron {neuron}</h3>
<p>Filters over the {field[0]}&times;{field[1]} receptive field; r is the Pearson
correlation of <code>sum(filter &times; patch) + bias</code> with the activation, the top share how many of the true
top-{scores['top']} images the filter also ranks top.</p>
<div class="figures">{"".join(figures)}</div>
<h4>Top {len(boxes)} instances</h4>
<div class="instances">{"".join(cards) or "<p>no instance</p>"}</div>
</div></div>"""


def _summary(summary: Summary, chosen: list[Layer], left_out: list[str]) -> str:
    reported = {layer.name: i for i, layer in enumerate(chosen)}
    rows = []
    for layer in summary.layers:
        name = escape(layer.name)
        if layer.name in reported:
            name = f'<a href="#L{reported[layer.name]}">{name}</a>'
        geometry = ("", "", "") if not layer.decodable or layer.stride is None else (
            "&times;".join(map(str, layer.stride)), "&times;".join(map(str, layer.receptive_field)),
            ", ".join(map(str, layer.origin)))
        state = ("per position" if layer.per_position else "yes") if layer.decodable else (
            f"no: {escape(str(layer.reason))}")
        rows.append(f'<tr class="{"ok" if layer.decodable else "blocked"}"><td>{name}</td><td>{escape(layer.node)}</td>'
                    f"<td>{escape(layer.op)}</td><td>{'' if layer.channels is None else layer.channels}</td>"
                    f"<td>{geometry[0]}</td><td>{geometry[1]}</td><td>{geometry[2]}</td><td>{state}</td></tr>")
    decodable = sum(layer.decodable for layer in summary.layers)
    blocked = [layer for layer in summary.layers if not layer.decodable]
    why = "".join(f"<li>{escape(layer.name)} ({escape(layer.op)}): {escape(str(layer.reason))}</li>"
                  for layer in blocked)
    left = (f"<p class='why'>Not reported, too large to decode in the memory left (name them with --layers to see "
            f"what they need): {escape(', '.join(left_out))}</p>") if left_out else ""
    return f"""<section id="summary"><h2>Model</h2>
<p>Input {escape(summary.input_name)} {escape(str(list(summary.input_shape)))} &middot;
{decodable} of {len(summary.layers)} layers decodable{"" if not blocked else "; not decodable:"}</p>
{f"<ul class='why'>{why}</ul>" if blocked else ""}{left}
<table class="summary"><thead><tr><th>layer</th><th>node</th><th>op</th><th>channels</th><th>stride</th>
<th>receptive field</th><th>origin</th><th>decodable</th></tr></thead><tbody>{"".join(rows)}</tbody></table>
</section>"""


def _page(setup: dict, summary: Summary, chosen: list[Layer], sections: list[str], data: dict,
          pictures: _Pictures) -> str:
    nav = " ".join(f'<a href="#L{i}">{escape(layer.name)}</a>' for i, layer in enumerate(chosen))
    fidelity_on = (f"held-out {escape(setup['holdout'])}" if setup["holdout"] is not None else
                   "the same images (in-sample: the data-driven modes were fitted on them; give --holdout)")
    if setup.get("fidelity_sample"):
        fidelity_on += f" ({escape(setup['fidelity_sample'])})"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>fdsub report: {escape(os.path.basename(setup['model']))}</title>
<style>{_CSS}
{pictures.style()}</style></head>
<body>
<header><h1>Filter decoding report: {escape(os.path.basename(setup['model']))}</h1>
<p>Model <code>{escape(setup['model'])}</code>. Top {setup['top']} instances per neuron from {escape(setup['images'])};
fds select rule <code>{escape(setup['select'])}</code>, weighting <code>{escape(setup['weighting'])}</code>.
Fidelity on {fidelity_on}.</p>{_sample_line(setup["sample"])}
<p>Filters: 0 is mid-gray, each scaled so its largest |value| is black or white. NF (neuron feature) and patches are
image pixels (dark gray where a receptive field leaves the image). Click a neuron for its details, a column header
to sort.</p>
<nav><a href="#summary">model</a> {nav}</nav></header>
{_summary(summary, chosen, setup["left_out"])}
{"".join(sections)}
<script type="application/json" id="fdsub-data">{_json_island(data)}</script>
<script>{_JS}</script>
</body></html>
"""


def diff_page(report, picture: Image.Image | None = None) -> str:
    """A ``DiffReport`` as one self-contained HTML page: the gate's verdict and failures, the matched layers (most
    changed first, every measure's worst neuron), the unmatched ones with their reasons, and ``picture`` (drift.png:
    the most changed neurons' filters in A and B, their difference, their Neuron Features)."""
    images = report.images > 0
    instances = any(d.nf_drift is not None for d in report.layers)
    head = ["layer (A)", "layer (B)", "matched by", "neurons", "filter drift max", "cosine min", "bias drift max"]
    head += ["activation drift max", "top overlap min", "spearman min"] if images else []
    head += ["NF drift max", "local drift max"] if instances else []

    def worst(values, pick=max, digits=3):
        finite = [v for v in values or [] if v is not None and np.isfinite(v)]
        return _fmt(pick(finite), digits) if finite else "-"

    rows = []
    for d in report.layers:
        cells = [escape(d.layer_a), escape(d.layer_b), d.matched_by, str(len(d.neurons)),
                 worst(d.filter_drift), worst(d.cosine, min, 4), worst(d.bias_drift)]
        if images:
            cells += [worst(d.activation_drift), worst(d.top_overlap, min, 2), worst(d.spearman, min)]
        if instances:
            cells += [worst(d.nf_drift), worst(d.local_drift)]
        rows.append(f'<tr class="{"fail" if d.failures else "pass"}">' + "".join(f"<td>{c}</td>" for c in cells)
                    + "</tr>")
    unmatched = "".join(f"<li>{side}: <code>{escape(u['layer'])}</code>: {escape(u['reason'])}</li>"
                        for side, listed in (("A", report.unmatched_a), ("B", report.unmatched_b)) for u in listed)
    failures = "".join(f"<li>{escape(line)}</li>" for line in report.failures)
    shown = ""
    if picture is not None and report.shown is not None:
        shown = (f"<h2>The most changed neurons of <code>{escape(report.shown['layer_a'])}</code></h2>"
                 "<p>Each row: the neuron's weights filter in A, in B, their difference (each scaled on its own)"
                 + (", and its Neuron Feature (the mean of its top patches) in A and in B" if "features_a"
                    in report.shown else "") + f'.</p><img src="{_data_uri(picture)}" alt="drift.png">')
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>fdsub diff: {escape(os.path.basename(report.model_b))}</title>
<style>{_CSS}
tr.fail td {{ background: #fdd; }}</style></head>
<body>
<header><h1>What changed: <code>{escape(report.model_b)}</code> against <code>{escape(report.model_a)}</code></h1>
<p>{report.status.upper()}: {len(report.layers)} layers matched, {len(report.unmatched_a)} of A and
{len(report.unmatched_b)} of B unmatched{f"; {report.images} images" if images else ", data-free"}.
Filter drift: ||F_B - F_A|| / ||F_A|| of each neuron's weights filter; the measures: docs/drift.md.</p>
{f"<ul>{failures}</ul>" if failures else ""}</header>
<table><thead><tr>{"".join(f"<th>{h}</th>" for h in head)}</tr></thead><tbody>{"".join(rows)}</tbody></table>
{f"<h2>Unmatched layers</h2><ul>{unmatched}</ul>" if unmatched else ""}
{shown}
</body></html>
"""


def _sample_line(sample: str | None) -> str:
    """The default sample's note, as a sentence of the header (nothing when every layer and neuron is shown)."""
    if sample is None:
        return ""
    return f'\n<p class="sample">{escape(sample[0].upper() + sample[1:])}.</p>'


def _json_island(data) -> str:
    """JSON safe inside <script>: no '<', '>' or '&' can end the element or open a comment."""
    text = json.dumps(data, allow_nan=False, default=_plain)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _plain(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON: {type(value).__name__}")


def _degenerate_cell(kinds: list, neurons) -> str:
    """How many neurons' filters are degenerate (named in the cell's title), never left out silently."""
    bad = [f"{int(n)}: {kind}" for n, kind in zip(neurons, kinds) if kind is not None]
    title = f' title="{escape("; ".join(bad))}"' if bad else ""
    return f'<td class="num"{title} data-v="{len(bad)}">{len(bad)}</td>'


def _why(kind) -> str:
    return "" if kind is None else f"<br><b>degenerate: {escape(kind)}</b> (not scored)"


def _number_cell(value, digits: int = 3) -> str:
    v = "" if value is None or not np.isfinite(value) else repr(float(value))
    return f'<td class="num" data-v="{v}">{_fmt(value, digits)}</td>'


def _fmt(value, digits: int = 3) -> str:
    """``digits`` decimals; a value too small for them in as many significant digits (a mean activation of 1.5e-4
    read 0.000 on every neuron of a layer)."""
    if value is None or not np.isfinite(value):
        return "&ndash;"
    value = float(value)
    return f"{value:.{digits}g}" if 0 < abs(value) < 0.5 * 10.0**-digits else f"{value:.{digits}f}"


_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 24px 48px;color:#222;background:#fafafa}
h1{font-size:22px;margin:16px 0 4px}h2{font-size:19px;margin:0 0 4px}\
h2 small{font-weight:normal;color:#666;font-size:13px}
header p{margin:4px 0;max-width:1100px}nav{margin:8px 0 16px}nav a{margin-right:10px}
section{background:#fff;border:1px solid #ddd;border-radius:6px;padding:12px 16px;margin:16px 0}
table{border-collapse:collapse}th,td{padding:3px 8px;border-bottom:1px solid #eee;vertical-align:middle;text-align:left}
th{background:#f0f0f0;font-weight:600;white-space:nowrap}td.num{text-align:right;font-variant-numeric:tabular-nums}
th[data-sort]{cursor:pointer}th[data-sort]:hover{background:#e0e8f5}th.asc::after{content:" \\25B2"}\
th.desc::after{content:" \\25BC"}
tr.blocked td{color:#a33}.why{color:#a33;margin:4px 0}
img,.pic{image-rendering:pixelated;vertical-align:middle}
.pic{display:inline-block;background-size:100% 100%;background-repeat:no-repeat}
.crop{background-color:rgb(60,60,60);margin-right:1px}.framed{position:relative;margin-right:4px}
.frame{position:absolute;box-sizing:border-box;border:2px solid #ffe600;box-shadow:0 0 0 1px #000}\
.geom{color:#555;margin:2px 0 8px}
.row{display:flex;gap:24px;align-items:flex-start;flex-wrap:wrap;margin-bottom:12px}
.means caption{text-align:left;font-weight:600;padding-bottom:4px}\
.grids img{max-width:100%;height:auto;background:#181818}
.tabs{margin-bottom:6px}\
.tabs button{font:inherit;padding:2px 10px;margin-right:4px;border:1px solid #999;background:#fff;
border-radius:4px;cursor:pointer}.tabs button.on{background:#2a5db0;color:#fff;border-color:#2a5db0}
.layer .m{display:none}.layer[data-show=fds] .m-fds,.layer[data-show=weights] .m-weights,
.layer[data-show=local] .m-local{display:inline-block}
table.neurons td .pic{margin-right:2px}td.patches{max-width:640px;line-height:0}
.detail{display:none}.detail:target{display:block;position:fixed;inset:0;background:rgba(0,0,0,.45);z-index:10;overflow:auto}
.panel{background:#fff;margin:3vh auto;max-width:1100px;padding:12px 20px;border-radius:6px}
.close{float:right;margin:0}.figures,.instances{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;font-size:12px}figure.instance{width:200px}figcaption{margin-top:2px}
.src{display:inline-block;max-width:196px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap;vertical-align:bottom}
"""

_JS = """
document.querySelectorAll('.tabs button').forEach(function (button) {
  button.addEventListener('click', function () {
    var section = button.closest('section');
    section.setAttribute('data-show', button.getAttribute('data-mode'));
    section.querySelectorAll('.tabs button').forEach(function (b) { b.classList.toggle('on', b === button); });
  });
});
document.querySelectorAll('table.sortable th[data-sort]').forEach(function (th) {
  th.addEventListener('click', function () {
    var table = th.closest('table'), body = table.tBodies[0], column = th.cellIndex;
    var descending = !th.classList.contains('desc');
    table.querySelectorAll('th').forEach(function (h) { h.classList.remove('asc', 'desc'); });
    th.classList.add(descending ? 'desc' : 'asc');
    var value = function (row) {
      var v = parseFloat(row.cells[column].getAttribute('data-v'));
      return isNaN(v) ? null : v;
    };
    Array.from(body.rows).sort(function (a, b) {
      var x = value(a), y = value(b);
      if (x === null || y === null) { return (x === null) - (y === null); }
      return descending ? y - x : x - y;
    }).forEach(function (row) { body.appendChild(row); });
  });
});
"""
