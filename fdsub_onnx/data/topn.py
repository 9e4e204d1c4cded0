"""The instances of each neuron (``TopN``) and their file contract: top.npz, top.json and capture checkpoints.

The instances of a neuron are ranked by one total order: higher activation first, then lower image
index, then lower position (row-major); ``runtime.capture`` keeps them, this module stores them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..defaults import html_view, require_memory
from ..errors import FdsubError
from .files import require_regular_file, write_atomically, write_file_atomically

TOP_NPZ = "top.npz"

TOP_JSON = "top.json"

NPZ_KEYS = ("values", "image_index", "position", "neurons", "layer", "per_image")
SLOT_BYTES = 4 + 8 + 16  # one instance: value, image index, position
#: what np.load and json raise on a file that is not what it claims to be
UNREADABLE = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, RecursionError)


@dataclass
class TopN:
    """The best instances of each selected neuron; row k belongs to neuron ``neurons[k]``.

    ``values`` float32 [K, N] descending per row (-inf where unfilled), ``image_index`` int64
    [K, N] (-1 where unfilled), ``position`` int64 [K, N, 2] (row, col in the layer's output map;
    (0, 0) for a rank-2 layer), ``sources`` names every image of the set (image indices refer to
    it), ``images_done`` counts the images scanned, ``per_image`` the instances allowed per image,
    ``ranges`` the ``[first, stop)`` blocks of image indices scanned (one per shard merged; None while a scan
    is unfinished, and for files of older versions that did not record them).
    """

    values: np.ndarray
    image_index: np.ndarray
    position: np.ndarray
    neurons: np.ndarray
    layer: str
    sources: list[str]
    images_done: int = 0
    per_image: int = 1
    skipped: list = field(default_factory=list)
    ranges: list | None = None

    @property
    def top(self) -> int:
        return self.values.shape[1]

    def __repr__(self) -> str:
        """One screen in a notebook: what was kept, not the arrays."""
        k = len(self.neurons)
        filled = int((self.image_index >= 0).sum())
        shown = ", ".join(str(int(n)) for n in self.neurons[:8]) + (", ..." if k > 8 else "")
        best = self.values[:, 0] if self.values.size else np.zeros(0)
        best = best[np.isfinite(best)]
        return "\n".join([
            f"TopN(layer {self.layer!r}: {k} neurons [{shown}], top {self.top}, {self.per_image} per image)",
            f"  {filled} of {k * self.top} slots filled over {self.images_done} of {len(self.sources)} images",
            *([f"  best activations in [{float(best.min()):.4g}, {float(best.max()):.4g}]"] if best.size else []),
            *([f"  {len(self.skipped)} images skipped"] if self.skipped else [])])

    def _repr_html_(self) -> str | None:
        """The notebook view: a summary table of the best instances (``present/notebook.py``)."""
        return html_view(self)

def instance_weights(top: TopN) -> np.ndarray:
    """Instance weights for activation-weighted means: w = max(activation, 0) per filled slot (NaN and unfilled: 0);
    equal weights for a neuron whose are all 0."""
    filled = top.image_index >= 0
    weights = np.where(filled & (top.values > 0), top.values, 0).astype(np.float64)
    zero = weights.sum(axis=1) == 0
    weights[zero] = filled[zero]
    return weights


def sources_digest(sources) -> str:
    """A short digest of the image names: shards of one image set carry the same one."""
    return hashlib.sha256(json.dumps(list(sources)).encode()).hexdigest()[:16]


def start_top(neurons, layer, images, per_image, top) -> TopN:
    """An empty state: every slot unfilled (``images`` None: no image names, a cluster block's partial result);
    refused before it is made when it (and the copies a merge of candidates makes) would not fit in memory."""
    k = len(neurons)
    require_memory(3.0 * k * top * SLOT_BYTES, f"keeping the top {top} instances of {k} neurons",
                   "ask for fewer instances (--top) or neurons (--neurons)")
    return TopN(np.full((k, top), -np.inf, np.float32), np.full((k, top), -1, np.int64),
                 np.zeros((k, top, 2), np.int64), np.asarray(neurons, np.int64), layer,
                 [] if images is None else list(images.sources), 0, per_image, [])


def union_notes(*lists) -> list:
    """Concatenation without repeats, order kept (skipped-image notes from several runs)."""
    seen, out = set(), []
    for items in lists:
        for item in items:
            item = list(item) if isinstance(item, (list, tuple)) else item
            key = json.dumps(item)
            if key not in seen:
                seen.add(key)
                out.append(item)
    return out


def short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def rows_of(top: TopN, neurons) -> TopN:
    """The instances of ``neurons`` only, in that order."""
    index = [int(np.flatnonzero(top.neurons == n)[0]) for n in neurons]
    return dataclasses.replace(top, values=top.values[index], image_index=top.image_index[index],
                               position=top.position[index], neurons=np.asarray(neurons, np.int64))


# ---- files ---------------------------------------------------------------------------------
def top_arrays(top: TopN) -> dict[str, np.ndarray]:
    """The top.npz contract's arrays, keyed by name."""
    return {
        "values": np.ascontiguousarray(top.values, dtype=np.float32),
        "image_index": np.ascontiguousarray(top.image_index, dtype=np.int64),
        "position": np.ascontiguousarray(top.position, dtype=np.int64),
        "neurons": np.asarray(top.neurons, dtype=np.int64),
        "layer": np.asarray(str(top.layer)),
        "per_image": np.asarray(int(top.per_image), dtype=np.int64),
    }


def top_sidecar(top: TopN) -> dict:
    """The top.json contract: what the arrays do not hold."""
    return {"layer": top.layer, "sources": list(top.sources), "sources_digest": sources_digest(top.sources),
            "images_done": int(top.images_done), "ranges": top.ranges,
            "skipped": [list(s) if isinstance(s, (list, tuple)) else s for s in top.skipped]}


def save_top(top: TopN, out_dir: str | os.PathLike) -> list[Path]:
    """Write ``out_dir/top.npz`` and ``out_dir/top.json`` atomically; return their paths."""
    return write_atomically(out_dir, *top_files(top), kind="top")


def top_files(top: TopN):
    """The names ``save_top`` writes and the writer that makes them in a folder (to combine with other results)."""
    def write(folder: Path) -> None:
        with open(folder / TOP_NPZ, "wb") as f:
            np.savez(f, **top_arrays(top))
        (folder / TOP_JSON).write_text(json.dumps(top_sidecar(top)))

    return [TOP_NPZ, TOP_JSON], write


def load_top(path: str | os.PathLike) -> TopN:
    """Read a result written by ``save_top``: its folder, or the top.npz inside it (top.json beside it).

    Every field is checked (``_checked``): a tampered, truncated or foreign file is one FdsubError.
    """
    path = Path(path)
    npz_path = path / TOP_NPZ if path.is_dir() else path
    json_path = npz_path.with_name(TOP_JSON)
    try:
        for file in (npz_path, json_path):
            require_regular_file(file, "top-N result file")
        with np.load(npz_path, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise ValueError("not an npz archive")
            missing = [k for k in NPZ_KEYS if k not in data.files]
            if missing:
                raise FdsubError(f"{npz_path} is not a top-N result: it lacks {', '.join(missing)}")
            arrays = {k: data[k] for k in NPZ_KEYS}
        sidecar = json.loads(json_path.read_text(encoding="utf-8"))
    except FdsubError:
        raise
    except FileNotFoundError as exc:
        raise FdsubError(f"no top-N result at {path}: {exc.filename} is missing; "
                         "give a folder written by `fdsub top`") from None
    except UNREADABLE as exc:
        raise FdsubError(f"cannot read the top-N result at {path} ({type(exc).__name__}); "
                         "give a folder written by `fdsub top`") from None
    return _checked(arrays, sidecar, path)


def _checked(arrays: dict, sidecar, path) -> TopN:
    """A TopN from the contract's arrays and sidecar, after checking every field against the others."""

    def bad(what: str):
        raise FdsubError(f"{path} holds a malformed top-N result: {what}; give a folder written by `fdsub top` "
                         "(or run it again)")

    values, image, position, neurons = (arrays[k] for k in ("values", "image_index", "position", "neurons"))
    k, n = values.shape if values.ndim == 2 else (-1, -1)
    good = (values.ndim == 2 and image.shape == (k, n) and position.shape == (k, n, 2) and neurons.shape == (k,)
            and values.dtype.kind == "f" and all(a.dtype.kind in "iu" for a in (image, position, neurons)))
    if not good:
        bad(f"shapes values {values.shape}, image_index {image.shape}, position {position.shape}, "
            f"neurons {neurons.shape}")
    if not isinstance(sidecar, dict):
        bad("top.json is not an object")
    layer, per_image = arrays["layer"], arrays["per_image"]
    if layer.shape != () or layer.dtype.kind != "U" or sidecar.get("layer", str(layer)) != str(layer):
        bad(f"top.npz is for layer {short(layer)} but top.json for {short(sidecar.get('layer'))}")
    if per_image.shape != () or per_image.dtype.kind not in "iu" or int(per_image) < 1:
        bad(f"per_image {short(per_image)} is not a positive integer")
    sources = sidecar.get("sources")
    if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
        bad("sources is not a list of image names")
    digest = sidecar.get("sources_digest")
    if digest is not None and digest != sources_digest(sources):
        bad("its sources do not match their digest (the list of images was edited)")
    done = sidecar.get("images_done", 0)
    if isinstance(done, bool) or not isinstance(done, int) or not 0 <= done <= len(sources):
        bad(f"images_done {short(done)} is not a count of images between 0 and {len(sources)}")
    skipped = sidecar.get("skipped", [])
    if not isinstance(skipped, list):
        bad(f"skipped {short(skipped)} is not a list")
    ranges = _ranges(sidecar.get("ranges", _LEGACY), done, len(sources), bad)
    _check_instances(values, image.astype(np.int64), position, neurons, ranges, len(sources), bad)
    return TopN(values.astype(np.float32), image.astype(np.int64), position.astype(np.int64), neurons.astype(np.int64),
                str(layer), list(sources), done, int(per_image), list(skipped), ranges)


_LEGACY = object()  # top.json of an older version: no "ranges"


def _ranges(ranges, done: int, count: int, bad):
    """The scanned blocks ``[[first, stop], ...]``: sorted, disjoint, inside the sources, adding up to ``done``."""
    if ranges is _LEGACY:  # written before shards said which images they hold: whole when it covers every image
        return [[0, count]] if done == count and count else None
    if ranges is None:
        return None
    if (not isinstance(ranges, list) or not all(isinstance(r, list) and len(r) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in r) for r in ranges)):
        bad(f"ranges {short(ranges)} is not a list of [first, stop] image ranges")
    ends = [v for r in ranges for v in r]
    if ends and (ends != sorted(ends) or ends[0] < 0 or ends[-1] > count or any(a >= b for a, b in ranges)):
        bad(f"ranges {short(ranges)} are not increasing image ranges within the {count} sources")
    if sum(b - a for a, b in ranges) != done:
        bad(f"ranges {short(ranges)} do not add up to images_done {done}")
    return [list(r) for r in ranges]


def _check_instances(values, image, position, neurons, ranges, count: int, bad) -> None:
    """Values, image indices, positions and neurons that a scan of ``count`` images can give."""
    if np.isnan(values).any():
        bad("values hold NaN")
    if values.shape[1] > 1 and (values[:, 1:] > values[:, :-1]).any():  # compared, not subtracted: empty slots
        # are -inf, and -inf - -inf is NaN with a RuntimeWarning
        bad("values are not descending along each row")
    filled = image >= 0
    odd = image[(image < -1) | (image >= count)]
    if odd.size:
        bad(f"image {int(odd[0])} is not one of the {count} sources")
    if ranges is not None and filled.any():
        inside = np.zeros(image.shape, bool)
        for first, stop in ranges:
            inside |= (image >= first) & (image < stop)
        outside = image[filled & ~inside]
        if outside.size:
            bad(f"image {int(outside[0])} lies outside the images scanned {short(ranges)}")
    if (np.isfinite(values) & ~filled).any():
        bad("an unfilled slot (image -1) holds a value")
    if (position[filled] < 0).any():
        bad("a position is negative")
    if (neurons < 0).any():
        bad(f"neuron {int(neurons[neurons < 0][0])} is negative")
    if len(np.unique(neurons)) != len(neurons):
        bad("a neuron is listed twice")


def check_top_fits(top: TopN, shape, size=None) -> None:
    """Refuse instances that a layer cannot hold: a neuron outside its channels, a position outside its grid. The
    layer is its output ``shape`` ([N, C, H, W] or [N, C]), or (``size`` given) its number of neurons and the grid
    of its positions (a map's (H, W), tokens' (1, T), a vector's (1, 1))."""
    if size is None:
        channels, size = int(shape[1]), (tuple(shape[2:4]) if len(shape) == 4 else (1, 1))
    else:
        channels = int(shape)
    outside = top.neurons[top.neurons >= channels]
    if outside.size:
        raise FdsubError(f"the top-N result lists neuron {int(outside[0])} but layer {top.layer!r} has {channels} "
                         f"neurons (0-{channels - 1}); give a result of this layer")
    size = tuple(int(v) for v in size)
    filled = top.image_index >= 0
    beyond = filled[..., None] & (top.position >= np.asarray(size))
    if beyond.any():
        k, n = np.argwhere(beyond.any(axis=-1))[0]
        raise FdsubError(f"the top-N result has an instance at position {tuple(int(v) for v in top.position[k, n])} "
                         f"but layer {top.layer!r} has a {size[0]}x{size[1]} map; give a result of this layer")


# ---- checkpoints ---------------------------------------------------------------------------
def save_checkpoint(path: Path, state: TopN, signature: dict, images) -> None:
    """The state and what run it belongs to, as one npz replaced atomically."""
    sidecar = top_sidecar(state)
    sidecar["skipped"] = union_notes(state.skipped, getattr(images, "skipped", []))
    del sidecar["sources"]  # the image set gives them back; the signature checks their count
    meta = json.dumps({"signature": signature, "sidecar": sidecar})
    write_file_atomically(path, lambda f: np.savez(f, meta=np.asarray(meta), **top_arrays(state)),
                          label="checkpoint ", hint="; check the folder and free space")


def checkpoint_progress(path: str | os.PathLike) -> int | None:
    """How many images the checkpoint at ``path`` has scanned (None: none there, or not readable: ``resume`` says
    why when it runs)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return int(json.loads(str(data["meta"]))["sidecar"]["images_done"])
    except (*UNREADABLE, TypeError, AttributeError, KeyError, FdsubError):
        return None


def resume(path: Path, signature: dict, fresh: TopN) -> TopN:
    """The state saved at ``path`` when it belongs to this run; ``fresh`` when there is none."""
    if not path.exists():
        return fresh
    try:
        require_regular_file(path, "checkpoint")
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            arrays = {k: data[k] for k in NPZ_KEYS}
        if not isinstance(meta, dict) or not isinstance(meta.get("sidecar"), dict):
            raise ValueError("no sidecar")
    except (*UNREADABLE, TypeError, AttributeError, FdsubError) as exc:
        raise FdsubError(f"checkpoint {path} cannot be read ({type(exc).__name__}); delete it to start over") from None
    if meta.get("signature") != signature:
        raise FdsubError(f"checkpoint {path} belongs to a different run "
                         "(other model, layer, neurons, images or options); delete it to start over")
    sidecar = dict(meta["sidecar"], sources=fresh.sources, ranges=None)
    sidecar.pop("sources_digest", None)
    return _checked(arrays, sidecar, path)
