"""Pictures of decoded filters: plain arrays in, a Pillow image out; nothing else computed."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

GAP = 2  # pixels between cells and around the grid
BACKGROUND = (24, 24, 24)
LABEL_COLOR = (220, 220, 220)
LABEL_HEIGHT = 12


def filter_grid(filters: np.ndarray, labels: Sequence[str] | None = None, cell: int = 48) -> Image.Image:
    """A grid of filters [K, C, R_y, R_x], each normalized symmetrically around 0.

    0 maps to mid-gray and each filter's largest |value| to black or white. 3 channels
    are shown as RGB, 1 channel as gray, any other count as the gray mean over channels.
    Filters are enlarged by nearest neighbour so a cell is at least ``cell`` pixels, and
    laid out in a grid as square as possible; ``labels`` (one per filter) go under each cell.
    """
    filters = np.asarray(filters)
    if filters.ndim != 4 or 0 in filters.shape:
        raise ValueError(f"filter_grid expects a non-empty [K, C, R_y, R_x] array, got shape {filters.shape}")
    if labels is not None and len(labels) != len(filters):
        raise ValueError(f"filter_grid got {len(labels)} labels for {len(filters)} filters")
    tiles = _to_rgb8(filters)  # [K, R_y, R_x, 3]
    count, ry, rx = tiles.shape[:3]
    scale = max(1, math.ceil(cell / max(ry, rx)))
    tiles = tiles.repeat(scale, axis=1).repeat(scale, axis=2)
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    th, tw = ry * scale, rx * scale
    lh = LABEL_HEIGHT if labels is not None else 0
    canvas = np.empty((GAP + rows * (th + lh + GAP), GAP + cols * (tw + GAP), 3), np.uint8)
    canvas[:] = BACKGROUND
    for k, tile in enumerate(tiles):
        y, x = GAP + (k // cols) * (th + lh + GAP), GAP + (k % cols) * (tw + GAP)
        canvas[y : y + th, x : x + tw] = tile
    image = Image.fromarray(canvas, "RGB")
    if labels is not None:
        _draw_labels(image, labels, cols, th, tw, lh)
    return image


def _to_rgb8(filters: np.ndarray) -> np.ndarray:
    """[K, C, R_y, R_x] to [K, R_y, R_x, 3] uint8, symmetric per filter (0 -> 128)."""
    f = np.nan_to_num(filters.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if f.shape[1] not in (1, 3):
        f = f.mean(axis=1, keepdims=True)
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
