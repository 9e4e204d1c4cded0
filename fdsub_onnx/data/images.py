"""Image sets: where the images that drive data-driven decoding come from.

Every image set is read the same way by capture and decoding: ``len(images)`` images,
``images.sources[i]`` names image ``i`` (a file path, ``array.npy[i]``, ``builtin:glyphs[i]``),
``images.skipped`` lists ``(source, reason)`` for files that could not be used, and
``images.batches(size, start)`` yields ``(first_index, float32 array [B, C, H, W])`` in
source order, already preprocessed for the model.

Files and builtins are decoded lazily, one batch at a time, so a large folder never has to fit
in memory; which images are usable is decided upfront (a cheap header check) so that
``sources`` is final before the first batch.
"""

from __future__ import annotations

import contextlib
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from ..defaults import MAX_BUILTIN_IMAGES, require_memory
from ..errors import FdsubError
from .files import require_regular_file

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
DEFAULT_BUILTIN_COUNT = 256
SPEC_HELP = ("give a folder of JPEG/PNG, one image file, a .npy/.npz array [N, C, H, W], "
             "or builtin:glyphs|gratings|blobs")
ARRAY_SAMPLE = 64  # images of an integer array checked for 0..255 values
_GRAY = np.array([0.299, 0.587, 0.114])  # the weights of Pillow's convert("L"), so builtins match files


@dataclass(frozen=True)
class Preset:
    """The input a model family expects: ``(x[rgb or bgr] * scale - mean) / std`` from 0..1 RGB ``x``.

    ``mean`` and ``std`` are in the channel order of the output (BGR when ``bgr``).
    """

    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    bgr: bool = False


PRESETS: dict[str, Preset] = {
    "raw": Preset(1.0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "torchvision": Preset(1.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "caffe": Preset(255.0, (103.939, 116.779, 123.68), (1.0, 1.0, 1.0), bgr=True),
    "tf": Preset(2.0, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0)),
}


def _per_channel(name: str, values: float | Sequence[float], channels: int) -> tuple[float, ...]:
    """``values`` as one float per channel: a scalar is broadcast, 3 values for a gray model are averaged."""
    try:
        vals = [float(v) for v in np.atleast_1d(np.asarray(values, dtype=np.float64)).ravel()]
    except (TypeError, ValueError):
        raise FdsubError(f"{name} must be a number or a list of numbers, got {values!r}") from None
    _finite(name, vals)
    if len(vals) == 1:
        return tuple(vals) * channels
    if len(vals) == 3 and channels == 1:
        return (sum(vals) / 3,)
    if len(vals) != channels:
        raise FdsubError(f"{name} has {len(vals)} values but the model takes {channels} channels: give 1 or {channels}")
    return tuple(vals)


def resolve_preset(
    preset: str,
    channels: int,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    scale: float | None = None,
    bgr: bool | None = None,
) -> Preset:
    """The preset ``preset`` with explicit overrides applied, ``mean``/``std`` given per model channel."""
    if preset not in PRESETS:
        raise FdsubError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    base = PRESETS[preset]
    if scale is not None:
        _finite("scale", [scale])
    resolved = Preset(
        scale=float(base.scale if scale is None else scale),
        mean=_per_channel("mean", base.mean if mean is None else mean, channels),
        std=_per_channel("std", base.std if std is None else std, channels),
        bgr=bool(base.bgr if bgr is None else bgr) and channels == 3,
    )
    if 0.0 in resolved.std:
        raise FdsubError(f"std must not be 0, got {list(resolved.std)}")
    return resolved


def _finite(name: str, values) -> None:
    """Preprocessing by NaN or infinity turns every activation into NaN: refuse it (--mean, --std, --scale)."""
    try:
        bad = [v for v in values if not np.isfinite(float(v))]
    except (TypeError, ValueError):
        raise FdsubError(f"--{name} must be a number, got {values!r}") from None
    if bad:
        raise FdsubError(f"--{name} must be a finite number, got {bad[0]}; give a value such as 0.5")


def is_identity(preset: Preset) -> bool:
    """True when applying ``preset`` would leave the values as they are."""
    c = len(preset.mean)
    return preset == Preset(1.0, (0.0,) * c, (1.0,) * c, False)


def apply_preset(preset: Preset, x: np.ndarray) -> np.ndarray:
    """Preprocess a [B, C, H, W] batch of 0..1 images; arithmetic in float64 so presets are exact to float32."""
    x = np.asarray(x, dtype=np.float64)
    if preset.bgr:
        x = x[:, ::-1]
    mean = np.asarray(preset.mean).reshape(1, -1, 1, 1)
    std = np.asarray(preset.std).reshape(1, -1, 1, 1)
    return ((x * preset.scale - mean) / std).astype(np.float32)


class _ImageSet:
    """The batching shared by every image set; subclasses provide ``sources`` and ``_load(first, stop)``."""

    sources: list[str]
    skipped: list[tuple[str, str]]
    preset: Preset | None = None

    def __len__(self) -> int:
        return len(self.sources)

    def _load(self, first: int, stop: int) -> np.ndarray:
        raise NotImplementedError

    def batches(self, size: int, start: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first_index, float32 [B, C, H, W])`` for images ``start..len-1`` in order, ``B <= size``."""
        if size < 1 or start < 0:
            raise FdsubError(f"batch size must be >= 1 and start >= 0, got size {size}, start {start}")
        for first in range(start, len(self), size):
            batch = self._load(first, min(first + size, len(self)))
            if self.preset is not None:
                batch = apply_preset(self.preset, batch)
            yield first, np.asarray(batch, dtype=np.float32)


class ArrayImages(_ImageSet):
    """Images held in one [N, C, H, W] array (values used as they are unless a preset is given)."""

    mapped: str | None = None  # the .npy file the array was opened from: pickled as that path (cluster workers)

    def __init__(
        self, array: np.ndarray, sources: list[str] | None = None, name: str = "array", preset: Preset | None = None
    ):
        self.array = np.asarray(array, dtype=np.float32)
        self.sources = sources if sources is not None else [f"{name}[{i}]" for i in range(len(self.array))]
        self.skipped = []
        self.preset = None if preset is None or is_identity(preset) else preset

    def _load(self, first: int, stop: int) -> np.ndarray:
        return self.array[first:stop]

    def __getstate__(self):
        """A set opened from a .npy file travels as its path, however large; an array in memory as itself."""
        state = dict(self.__dict__)
        if self.mapped is not None:
            del state["array"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.mapped is not None:
            if not Path(self.mapped).is_file():
                raise FdsubError(f"no image file {self.mapped} here: cluster workers read the images at the same "
                                 "paths as the client; copy it there")
            self.array = np.asarray(np.load(self.mapped, mmap_mode="r", allow_pickle=False), dtype=np.float32)


class LazyImages(_ImageSet):
    """Images decoded or rendered one at a time by ``load(i) -> float32 [C, H, W]`` in 0..1 RGB (or gray)."""

    def __init__(
        self,
        sources: list[str],
        load: Callable[[int], np.ndarray],
        preset: Preset,
        skipped: list[tuple[str, str]] | None = None,
    ):
        self.sources = sources
        self.skipped = skipped or []
        self.preset = preset
        self._load_one = load

    def _load(self, first: int, stop: int) -> np.ndarray:
        return np.ascontiguousarray(np.stack([self._load_one(i) for i in range(first, stop)]))


class SampledImages(_ImageSet):
    """``count`` images of ``base`` evenly spaced over it (its first and last included), in order: a sample that
    stands for the whole set where scoring every image would cost more than it tells (the report's fidelity)."""

    def __init__(self, base: _ImageSet, count: int):
        self.base = base
        self.indices = np.unique(np.round(np.linspace(0, len(base) - 1, min(count, len(base)))).astype(np.int64))
        self.sources = [base.sources[i] for i in self.indices]
        self.skipped = list(base.skipped)
        self.preset = None  # the base's batches apply its own

    def _load(self, first: int, stop: int) -> np.ndarray:
        return np.concatenate([batch for _, batch in read_indices(self.base, self.indices[first:stop], stop - first)])


def open_images(
    spec: str,
    input_shape: tuple[int, int, int],
    preset: str = "raw",
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    scale: float | None = None,
    bgr: bool | None = None,
) -> ArrayImages | LazyImages:
    """Open the images named by ``spec``, sized and preprocessed for a model taking ``input_shape`` (C, H, W).

    ``spec`` is a folder (every .jpg/.jpeg/.png below it, sorted by relative path; each is resized so
    it covers H x W, then centre-cropped), one such image file, a ``.npy``/``.npz`` array [N, C, H, W]
    (not resized; integer arrays must hold 0..1, not 0..255), or
    ``builtin:glyphs``, ``builtin:gratings``, ``builtin:blobs`` with an optional count
    (``builtin:glyphs:200``, default 256), rendered deterministically.

    ``preset`` is one of ``raw`` (0..1), ``torchvision``, ``caffe``, ``tf`` (see ``PRESETS``);
    ``mean``, ``std``, ``scale`` and ``bgr`` override its values. Arrays count as 0..1 RGB and are
    left untouched under ``raw``.

    >>> images = open_images("builtin:gratings:8", (3, 32, 32), preset="torchvision")
    >>> len(images), next(images.batches(4))[1].shape
    (8, (4, 3, 32, 32))
    """
    channels, height, width = _check_shape(input_shape)
    pre = resolve_preset(preset, channels, mean=mean, std=std, scale=scale, bgr=bgr)
    if spec.startswith("builtin:"):
        return _open_builtin(spec, (channels, height, width), pre)
    path = Path(spec)
    if not path.exists():
        raise FdsubError(f"no such file or folder: {spec}")
    require_regular_file(path, "image file or folder")
    if path.is_dir():
        return _open_folder(path, (channels, height, width), pre)
    if path.suffix.lower() in (".npy", ".npz"):
        return _open_array(path, (channels, height, width), pre)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return _open_files([path], (channels, height, width), pre, f"at {path}")
    raise FdsubError(f"cannot read images from {spec}: {SPEC_HELP}")


def _check_shape(input_shape) -> tuple[int, int, int]:
    """The model's (C, H, W) as ints; images need a fixed size to be made."""
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape):
        raise FdsubError(f"images need a fixed model input (C, H, W), got {shape}")
    c, h, w = (int(d) for d in shape)
    require_memory(8.0 * c * h * w, f"one image of the model's input size {c}x{h}x{w}",
                   "give a smaller --input-shape (or a model with a smaller input)")
    return c, h, w


def _need_rgb_or_gray(channels: int, what: str) -> None:
    """Files and builtins make RGB or gray pictures; other channel counts need an array."""
    if channels not in (1, 3):
        raise FdsubError(f"{what} give 3 (RGB) or 1 (gray) channels but the model takes {channels}: give a .npy/.npz")


# --- arrays -----------------------------------------------------------------------------------------------


def _open_array(path: Path, shape: tuple[int, int, int], preset: Preset) -> ArrayImages:
    """An in-memory [N, C, H, W] array; .npy is memory-mapped so a large file is read batch by batch."""
    try:
        if path.suffix.lower() == ".npy":
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as npz:
                if not npz.files:
                    raise FdsubError(f"{path} holds no arrays: save the images under the key 'images'")
                array = npz["images" if "images" in npz.files else npz.files[0]]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # a truncated .npz is a bad zip
        raise FdsubError(f"cannot read {path}: {exc}; save the images again (np.save / np.savez)") from None
    expected = f"[N, {shape[0]}, {shape[1]}, {shape[2]}]"
    if array.ndim != 4 or tuple(array.shape[1:]) != shape:
        raise FdsubError(
            f"{path} has shape {list(array.shape)} but the model needs {expected}; arrays are not resized, "
            "give them at the model's size"
        )
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise FdsubError(f"{path} holds {array.dtype} values; give real numbers {expected}")
    if len(array) == 0:
        raise FdsubError(f"{path} holds no images (shape {list(array.shape)})")
    if array.dtype.kind in "iub":
        top = int(np.max(array[:ARRAY_SAMPLE]))
        if top > 1:
            raise FdsubError(f"{path} holds {array.dtype} values up to {top} but arrays are read as 0..1 (the preset "
                             "scales from there); save x / 255 as float32, or a folder of images")
    images = ArrayImages(array, name=str(path), preset=preset)
    if path.suffix.lower() == ".npy":
        images.mapped = str(path.resolve())
    return images


# --- folders ----------------------------------------------------------------------------------------------


def _open_folder(folder: Path, shape: tuple[int, int, int], preset: Preset) -> LazyImages:
    """Every JPEG/PNG below ``folder``, in relative-path order; unreadable ones go to ``skipped``."""
    found = sorted(
        (p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    return _open_files(found, shape, preset, f"in {folder}")


def _open_files(found: list[Path], shape: tuple[int, int, int], preset: Preset, where: str) -> LazyImages:
    """The files of ``found`` that Pillow can read, in order; the others go to ``skipped``."""
    _need_rgb_or_gray(shape[0], "image files")
    usable, skipped = [], []
    for p in found:
        reason = _unreadable(p)
        if reason is None:
            usable.append(p)
        else:
            skipped.append((str(p), reason))
    if not usable:
        detail = f"{len(skipped)} could not be read: {skipped[0][1]}" if skipped else "found none"
        raise FdsubError(f"no usable JPEG/PNG image {where} ({detail})")
    files = [p.absolute() for p in usable]  # read from anywhere: a cluster's workers have working folders of their own
    return LazyImages([str(p) for p in usable], lambda i: _read_image(files[i], shape), preset, skipped)


@contextlib.contextmanager
def _opened(path: Path):
    """``Image.open(path)``, without Pillow's DecompressionBombWarning on stderr: an image between its two limits
    (89 and 179 megapixels) is a large photograph, read and resized like any other; one over the upper limit is
    refused with Pillow's reason (DecompressionBombError), which the callers report."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            yield image


def _unreadable(path: Path) -> str | None:
    """Why Pillow cannot read ``path`` (a cheap header/structure check), or None when it can."""
    try:
        with _opened(path) as image:
            image.verify()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return (str(exc).splitlines() or [type(exc).__name__])[0][:120]
    return None


#: Pillow's modes of 16-bit gray images (a 16-bit PNG opens as I;16, some readers give I)
WIDE_GRAY = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _read_image(path: Path, shape: tuple[int, int, int]) -> np.ndarray:
    """Decode one file to float32 [C, H, W] in 0..1, upright, covering H x W and centre-cropped."""
    channels, height, width = shape
    try:
        with _opened(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode in WIDE_GRAY:  # 16-bit gray: Pillow's convert to 8 bits clips it at 255, not scales it
                image, full = Image.fromarray(np.asarray(image, np.float32)), 65535.0
            else:
                image, full = image.convert("L" if channels == 1 else "RGB"), 255.0
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise FdsubError(f"cannot read image {path}: {exc}") from None
    pixels = np.clip(np.asarray(_cover_crop(image, height, width), dtype=np.float32) / full, 0.0, 1.0)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None].repeat(1 if channels == 1 else 3, axis=2)
    # C-contiguous: a transposed view stacked into a batch stays transposed, and onnxruntime (and every window
    # cut) would copy each batch again (8 ms of a 32-image batch at 260 px, a quarter of a stem capture's time)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def _cover_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """Resize (bilinear) so the image just covers height x width, then cut out the centre.

    For a square target this makes the shorter side equal to the target, e.g. 200x100 -> 100x50 -> 50x50.
    """
    factor = max(height / image.height, width / image.width)
    new_w = max(width, round(image.width * factor))
    new_h = max(height, round(image.height * factor))
    resized = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return resized.crop((left, top, left + width, top + height))


# --- builtins ---------------------------------------------------------------------------------------------


def _open_builtin(spec: str, shape: tuple[int, int, int], preset: Preset) -> LazyImages:
    """``builtin:KIND[:COUNT]``: synthetic images rendered on demand, image i from its own seeded RNG."""
    _need_rgb_or_gray(shape[0], "builtin images")
    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[1] not in BUILTINS:
        raise FdsubError(f"cannot read images from {spec}: {SPEC_HELP}")
    kind = parts[1]
    count = DEFAULT_BUILTIN_COUNT
    if len(parts) == 3:
        if not parts[2].isascii() or not parts[2].isdigit() or int(parts[2]) < 1:
            raise FdsubError(f"the count in {spec} must be a positive integer, e.g. builtin:{kind}:200")
        count = int(parts[2])
        if count > MAX_BUILTIN_IMAGES:
            raise FdsubError(f"the count in {spec} is too large: builtin sets hold at most {MAX_BUILTIN_IMAGES:,} "
                             "images; give a smaller count or a folder of your own images")
    return LazyImages([f"builtin:{kind}[{i}]" for i in range(count)], lambda i: render_builtin(kind, i, shape), preset)


def render_builtin(kind: str, index: int, shape: tuple[int, int, int]) -> np.ndarray:
    """Image ``index`` of builtin set ``kind`` as float32 [C, H, W] in 0..1; the same on every run."""
    channels, height, width = shape
    rng = np.random.default_rng([zlib.crc32(kind.encode()), index])
    rgb = np.clip(BUILTINS[kind](rng, height, width), 0.0, 1.0)
    if channels == 1:
        return (rgb @ _GRAY).astype(np.float32)[None]
    return rgb.astype(np.float32).transpose(2, 0, 1)


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x), each [H, W]."""
    return np.mgrid[0:height, 0:width].astype(np.float64) + 0.5


def _gratings(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """An oriented sinusoidal grating between two contrasting colours, 1 to min/4 cycles across the image."""
    y, x = _grid(height, width)
    side = min(height, width)
    cycles = np.exp(rng.uniform(0.0, np.log(max(side / 4, 1.5))))
    theta, phase = rng.uniform(0.0, np.pi), rng.uniform(0.0, 2 * np.pi)
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * cycles / side * (x * np.cos(theta) + y * np.sin(theta)) + phase)
    c0 = rng.uniform(0.0, 1.0, 3)
    c1 = np.clip(1.0 - c0 + rng.uniform(-0.2, 0.2, 3), 0.0, 1.0)
    return c0 + (c1 - c0) * wave[..., None]


def _blobs(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """1 to 6 coloured anisotropic Gaussian blobs painted over a dark background."""
    y, x = _grid(height, width)
    side = min(height, width)
    image = np.broadcast_to(rng.uniform(0.0, 0.4, 3), (height, width, 3)).copy()
    for _ in range(rng.integers(1, 7)):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        sy, sx = rng.uniform(0.04, 0.25, 2) * side
        alpha = np.exp(-((y - cy) ** 2 / (2 * sy**2) + (x - cx) ** 2 / (2 * sx**2)))[..., None]
        image = image * (1 - alpha) + rng.uniform(0.0, 1.0, 3) * alpha
    return image


_GLYPH_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def _glyphs(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """1 to 3 letters/digits of several sizes in a colour that contrasts with a solid or graded background."""
    image, light_background = glyph_background(rng, height, width)
    for _ in range(rng.integers(1, 4)):
        paste_glyph(rng, image, _GLYPH_CHARS[rng.integers(len(_GLYPH_CHARS))], light_background)
    return image


def glyph_background(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, bool]:
    """A solid or graded colour background [H, W, 3], and whether it is light (glyphs then go dark).

    Shared with models/train_demo.py, which draws its training images the way ``builtin:glyphs`` does."""
    y, x = _grid(height, width)
    c0, c1 = rng.uniform(0.0, 1.0, (2, 3))
    if rng.random() < 0.5:
        c1 = c0
    angle = rng.uniform(0.0, 2 * np.pi)
    ramp = x * np.cos(angle) + y * np.sin(angle)
    ramp = (ramp - ramp.min()) / max(np.ptp(ramp), 1e-9)
    return c0 + (c1 - c0) * ramp[..., None], bool((c0 + c1) @ _GRAY / 2 > 0.5)


def paste_glyph(rng: np.random.Generator, image: np.ndarray, char: str, light_background: bool) -> None:
    """Draw ``char`` into ``image`` (in place) 30-80 % of its height, at a random place, in a contrasting colour."""
    height, width = image.shape[:2]
    mask = _glyph_mask(char, max(4, int(rng.uniform(0.3, 0.8) * min(height, width))))
    colour = rng.uniform(0.0, 0.35, 3) if light_background else rng.uniform(0.65, 1.0, 3)
    top = rng.integers(0, max(1, height - mask.shape[0] + 1))
    left = rng.integers(0, max(1, width - mask.shape[1] + 1))
    alpha = mask[: height - top, : width - left, None]
    region = image[top : top + alpha.shape[0], left : left + alpha.shape[1]]
    region[...] = region * (1 - alpha) + colour * alpha


@lru_cache(maxsize=1024)
def _glyph_mask(char: str, size: int) -> np.ndarray:
    """Coverage (0..1) of ``char`` cropped to its ink and scaled to ``size`` pixels high."""
    font = _font(size)
    left, top, right, bottom = font.getbbox(char)
    canvas = Image.new("L", (right - left + 2, bottom - top + 2), 0)
    ImageDraw.Draw(canvas).text((1 - left, 1 - top), char, fill=255, font=font)
    ink = canvas.getbbox()
    if ink is not None:
        canvas = canvas.crop(ink)
    resized = canvas.resize((max(1, round(canvas.width * size / canvas.height)), size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float64) / 255.0


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's default font at ``size``; on Pillow < 10.1 its small bitmap font, which _glyph_mask scales up."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


BUILTINS: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "glyphs": _glyphs,
    "gratings": _gratings,
    "blobs": _blobs,
}


def read_indices(images, needed: np.ndarray, batch_size: int):
    """Yield ``(first, batch)`` covering exactly the image indices ``needed`` (sorted): runs of consecutive ones."""
    start = 0
    while start < len(needed):
        stop = start + 1
        while stop < len(needed) and stop - start < batch_size and needed[stop] == needed[stop - 1] + 1:
            stop += 1
        yield next(iter(images.batches(stop - start, int(needed[start]))))
        start = stop
