"""Pictures of decoded filters: plain arrays in, a Pillow image out; nothing else computed."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..compose.inspect import instance_geometry
from ..data.images import read_indices
from ..errors import FdsubError
from ..modes.windows import cut, inside

GAP = 2  # pixels between cells and around the grid
BACKGROUND = (24, 24, 24)
LABEL_COLOR = (220, 220, 220)
LABEL_HEIGHT = 12


def filter_grid(filters: np.ndarray, labels: Sequence[str] | None = None, cell: int = 48,
                columns: int | None = None, scaled: bool = True) -> Image.Image:
    """A grid of filters [K, C, R_y, R_x], each normalized symmetrically around 0.

    0 maps to mid-gray and each filter's largest |value| to black or white. 3 channels
    are shown as RGB, 1 channel as gray, any other count as the gray mean over channels.
    Filters are enlarged by nearest neighbour so a cell is at least ``cell`` pixels, and
    laid out in a grid as square as possible (or ``columns`` wide); ``labels`` (one per filter) go under each cell.
    ``scaled=False`` draws values already in [-1, 1] as they are (image patches), not each scaled to its peak.
    The image never passes PIL's ``Image.MAX_IMAGE_PIXELS`` (``grid_fit``): cells get smaller, then only the
    first ``grid_cells`` filters are drawn, and a single filter too large even at 1 pixel is block-averaged.
    """
    filters = np.asarray(filters)
    if filters.ndim != 4 or 0 in filters.shape:
        raise ValueError(f"filter_grid expects a non-empty [K, C, R_y, R_x] array, got shape {filters.shape}")
    if labels is not None and len(labels) != len(filters):
        raise ValueError(f"filter_grid got {len(labels)} labels for {len(filters)} filters")
    lh = LABEL_HEIGHT if labels is not None else 0
    count, scale = grid_fit(len(filters), filters.shape[2:], cell, labels is not None)
    filters, labels = filters[:count], None if labels is None else list(labels)[:count]
    factor, side = 1, max(filters.shape[2:])
    while factor < side and _pixels(1, -(-filters.shape[2] // factor), -(-filters.shape[3] // factor), lh) > _limit():
        factor += 1
    tiles = _to_rgb8(block_mean(filters, factor), scaled)  # [K, R_y, R_x, 3]
    count, ry, rx = tiles.shape[:3]
    tiles = tiles.repeat(scale, axis=1).repeat(scale, axis=2)
    cols = min(columns, count) if columns else math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    th, tw = ry * scale, rx * scale
    canvas = np.empty((GAP + rows * (th + lh + GAP), GAP + cols * (tw + GAP), 3), np.uint8)
    canvas[:] = BACKGROUND
    for k, tile in enumerate(tiles):
        y, x = GAP + (k // cols) * (th + lh + GAP), GAP + (k % cols) * (tw + GAP)
        canvas[y : y + th, x : x + tw] = tile
    image = Image.fromarray(canvas, "RGB")
    if labels is not None:
        _draw_labels(image, labels, cols, th, tw, lh)
    return image


def grid_fit(count: int, field: Sequence[int], cell: int = 48, labelled: bool = True) -> tuple[int, int]:
    """How many of ``count`` filters of ``field`` (R_y, R_x) ``filter_grid`` draws, and its scale (screen pixels
    per filter pixel): the least that makes a cell ``cell`` pixels, lowered until the grid fits under PIL's
    ``Image.MAX_IMAGE_PIXELS`` (read now; None: no limit); when even 1-pixel cells do not fit, the first filters
    that do (at least one: ``filter_grid`` block-averages a filter larger than the limit).

    >>> grid_fit(512, (435, 435))  # resnet18's last conv: 1 pixel per filter pixel, 441 cells under 89.5 Mpixel
    (441, 1)
    """
    ry, rx = (int(v) for v in field)
    lh = LABEL_HEIGHT if labelled else 0
    scale = max(1, math.ceil(cell / max(ry, rx)))
    if count < 1:
        return 0, scale
    while scale > 1 and _pixels(count, ry * scale, rx * scale, lh) > _limit():
        scale -= 1
    if _pixels(count, ry, rx, lh) <= _limit():
        return count, scale
    fit, over = 1, count  # the grid of ``fit`` cells fits or is the one cell; ``over`` cells do not fit
    while over - fit > 1:
        mid = (fit + over) // 2
        fit, over = (mid, over) if _pixels(mid, ry, rx, lh) <= _limit() else (fit, mid)
    return fit, 1


def grid_cells(count: int, field: Sequence[int], most: int | None = None, labelled: bool = True) -> int:
    """How many cells a grid of the first ``most`` (None: all) of ``count`` filters of ``field`` shows."""
    return grid_fit(count if most is None else min(count, most), field, labelled=labelled)[0]


def block_mean(filters: np.ndarray, factor: int) -> np.ndarray:
    """Filters [K, C, R_y, R_x] averaged over ``factor`` x ``factor`` blocks (the last ones padded with 0)."""
    if factor == 1:
        return filters
    ry, rx = filters.shape[2:]
    padded = np.pad(filters, ((0, 0), (0, 0), (0, -ry % factor), (0, -rx % factor)))
    k, c, h, w = padded.shape
    return padded.reshape(k, c, h // factor, factor, w // factor, factor).mean(axis=(3, 5))


def _limit() -> float:
    """PIL's limit on an image's pixels, past which it warns (DecompressionBombWarning); inf when unset."""
    return math.inf if Image.MAX_IMAGE_PIXELS is None else Image.MAX_IMAGE_PIXELS


def _pixels(count: int, th: int, tw: int, lh: int) -> int:
    """Pixels of a grid of ``count`` cells of th x tw (labels lh high), laid out as ``filter_grid`` does."""
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    return (GAP + rows * (th + lh + GAP)) * (GAP + cols * (tw + GAP))


def _to_rgb8(filters: np.ndarray, scaled: bool = True) -> np.ndarray:
    """[K, C, R_y, R_x] to [K, R_y, R_x, 3] uint8, symmetric per filter (0 -> 128; ``scaled``: each filter's
    largest |value| to black or white, else values in [-1, 1] as they are)."""
    f = np.nan_to_num(filters.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if f.shape[1] not in (1, 3):
        f = f.mean(axis=1, keepdims=True)
    if scaled:
        peak = np.abs(f).max(axis=(1, 2, 3), keepdims=True)
        f = f / np.where(peak > 0, peak, 1.0)
    levels = np.clip(np.rint(127.5 + 127.5 * f), 0, 255).astype(np.uint8)
    if levels.shape[1] == 1:
        levels = levels.repeat(3, axis=1)
    return levels.transpose(0, 2, 3, 1)


def _draw_labels(image: Image.Image, labels, cols: int, th: int, tw: int, lh: int) -> None:
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    for k, label in enumerate(labels):
        y, x = GAP + (k // cols) * (th + lh + GAP) + th, GAP + (k % cols) * (tw + GAP)
        draw.text((x + 1, y), str(label), fill=LABEL_COLOR, font=font)


def displayable(batch: np.ndarray, preset) -> np.ndarray:
    """Model-input pixels [B, C, H, W] back to uint8 RGB [B, H, W, 3]: the preset undone, then 0..1 shown as is.

    Values far outside 0..1 (arrays preprocessed by the user) are stretched per image instead.
    """
    x = np.asarray(batch, np.float64)
    if preset is not None:
        std, mean = (np.asarray(v, np.float64).reshape(1, -1, 1, 1) for v in (preset.std, preset.mean))
        x = (x * std + mean) / preset.scale
        if preset.bgr:
            x = x[:, ::-1]
    if x.shape[1] not in (1, 3):
        x = x.mean(axis=1, keepdims=True)
    if x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)
    lo, hi = x.min(axis=(1, 2, 3), keepdims=True), x.max(axis=(1, 2, 3), keepdims=True)
    odd = ((lo < -0.05) | (hi > 1.05)) & (hi > lo)
    x = np.where(odd, (x - lo) / np.where(hi > lo, hi - lo, 1.0), x)
    return np.clip(np.rint(x * 255), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def displayed(images, indices) -> dict:
    """Image index -> uint8 RGB [H, W, 3] of the images ``indices`` of ``images``, as ``displayable`` shows them;
    each read once, 32 at a time."""
    shown = {}
    for first, batch in read_indices(images, np.asarray(indices), 32):
        for i, image in enumerate(displayable(batch, getattr(images, "preset", None))):
            shown[first + i] = image
    return shown


#: the gray where a receptive field leaves the image (as the report shows it)
OUTSIDE_GRAY = 64


def patch_grid(model, top, images, neuron: int, cell: int = 64, most: int | None = None) -> Image.Image:
    """The top patches of ``neuron`` (a row of ``top``, a ``TopN`` captured on ``images``): each instance's receptive
    field cut from its image as the model saw it (the preprocessing undone; dark gray where the field leaves the
    image), best first, each labelled with its rank and activation. For a notebook: ``fd.patch_grid(model, top,
    images, 3)`` is a PIL image."""
    row = int(np.flatnonzero(np.asarray(top.neurons) == neuron)[0]) if neuron in list(top.neurons) else None
    if row is None:
        raise FdsubError(f"neuron {neuron} is not in this top-N result (it holds {list(map(int, top.neurons))[:8]}...)")
    geom = instance_geometry(model, top.layer)
    filled = np.flatnonzero(top.image_index[row] >= 0)[: most or top.top]
    if not len(filled):
        raise FdsubError(f"neuron {neuron} has no instance in this top-N result; capture it over more images")
    ry, rx = geom.rf if geom.stride[0] else model.input_shape[2:]  # a per-position layer: its field is the image
    pixels = displayed(images, np.unique(top.image_index[row, filled]))
    maps = np.stack([pixels[int(i)] for i in top.image_index[row, filled]]).transpose(0, 3, 1, 2)  # [M, 3, H, W]
    corners = geom.corner(top.position[row, filled]) if geom.stride[0] else np.zeros((len(filled), 2), np.int64)
    seen = inside(corners, (ry, rx), maps.shape[2:])[:, None]  # dark gray where a field leaves its image
    patches = np.where(seen > 0, cut(maps, corners, (ry, rx)), OUTSIDE_GRAY)
    cells = patches.astype(np.float64) / 127.5 - 1.0  # filter_grid's scale: -1..1
    labels = [f"{rank + 1}: {float(top.values[row, slot]):.3g}" for rank, slot in enumerate(filled)]
    return filter_grid(cells, labels=labels, cell=cell, scaled=False)


def neuron_card(model, decoded, top, images, neuron: int, cell: int = 64, most: int = 8) -> Image.Image:
    """One neuron at a glance: its decoded filter (``decoded``, any mode) beside its ``most`` top patches."""
    rows = list(map(int, decoded.neurons))
    if neuron not in rows:
        raise FdsubError(f"neuron {neuron} is not in this decoding (it holds {rows[:8]}...)")
    left = filter_grid(decoded.filters[rows.index(neuron) : rows.index(neuron) + 1],
                       labels=[f"{decoded.mode} {neuron}"], cell=2 * cell)
    right = patch_grid(model, top, images, neuron, cell=cell, most=most)
    card = Image.new("RGB", (left.width + right.width + GAP, max(left.height, right.height)), "white")
    card.paste(left, (0, 0))
    card.paste(right, (left.width + GAP, 0))
    return card
