"""The instances of each neuron (``TopN``) and their file contract: top.npz, top.json and capture checkpoints.

The instances of a neuron are ranked by one total order: higher activation first, then lower image
index, then lower position (row-major); ``runtime.capture`` keeps them, this module stores them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import FdsubError
from .files import write_atomically, write_file_atomically

TOP_NPZ = "top.npz"

TOP_JSON = "top.json"

NPZ_KEYS = ("values", "image_index", "position", "neurons", "layer", "per_image")

@dataclass
class TopN:
    """The best instances of each selected neuron; row k belongs to neuron ``neurons[k]``.

    ``values`` float32 [K, N] descending per row (-inf where unfilled), ``image_index`` int64
    [K, N] (-1 where unfilled), ``position`` int64 [K, N, 2] (row, col in the layer's output map;
    (0, 0) for a rank-2 layer), ``sources`` names every image of the set (image indices refer to
    it), ``images_done`` counts the images scanned, ``per_image`` the instances allowed per image.
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

    @property
    def top(self) -> int:
        return self.values.shape[1]


def instance_weights(top: TopN) -> np.ndarray:
    """Instance weights for activation-weighted means: w = max(activation, 0) per filled slot (NaN and unfilled: 0);
    equal weights for a neuron whose are all 0."""
    filled = top.image_index >= 0
    weights = np.where(filled & (top.values > 0), top.values, 0).astype(np.float64)
    zero = weights.sum(axis=1) == 0
    weights[zero] = filled[zero]
    return weights


def start_top(neurons, layer, images, per_image, top) -> TopN:
    """An empty state: every slot unfilled. ``images`` None: no image names (a cluster block's partial result)."""
    k = len(neurons)
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
    return {"layer": top.layer, "sources": list(top.sources), "images_done": int(top.images_done),
            "skipped": [list(s) if isinstance(s, (list, tuple)) else s for s in top.skipped]}


def save_top(top: TopN, out_dir: str | os.PathLike) -> list[Path]:
    """Write ``out_dir/top.npz`` and ``out_dir/top.json`` atomically; return their paths."""
    return write_atomically(out_dir, *top_files(top))


def top_files(top: TopN):
    """The names ``save_top`` writes and the writer that makes them in a folder (to combine with other results)."""
    def write(folder: Path) -> None:
        with open(folder / TOP_NPZ, "wb") as f:
            np.savez(f, **top_arrays(top))
        (folder / TOP_JSON).write_text(json.dumps(top_sidecar(top)))

    return [TOP_NPZ, TOP_JSON], write


def load_top(path: str | os.PathLike) -> TopN:
    """Read a result written by ``save_top``: its folder, or the top.npz inside it (top.json beside it)."""
    path = Path(path)
    npz_path = path / TOP_NPZ if path.is_dir() else path
    json_path = npz_path.with_name(TOP_JSON)
    try:
        with np.load(npz_path, allow_pickle=False) as data:
            missing = [k for k in NPZ_KEYS if k not in data.files]
            if missing:
                raise FdsubError(f"{npz_path} is not a top-N result: it lacks {', '.join(missing)}")
            arrays = {k: data[k] for k in NPZ_KEYS}
        sidecar = json.loads(json_path.read_text())
    except FdsubError:
        raise
    except FileNotFoundError as exc:
        raise FdsubError(f"no top-N result at {path}: {exc.filename} is missing; "
                         "give a folder written by `fdsub top`") from None
    except (OSError, ValueError, EOFError) as exc:
        raise FdsubError(f"cannot read the top-N result at {path} ({type(exc).__name__}); "
                         "give a folder written by `fdsub top`") from None
    return _checked(arrays, sidecar, path)


def _checked(arrays: dict, sidecar, path) -> TopN:
    """A TopN from the contract's arrays and sidecar, after checking shapes and types."""
    values, image, position, neurons = (arrays[k] for k in ("values", "image_index", "position", "neurons"))
    k, n = values.shape if values.ndim == 2 else (-1, -1)
    good = (values.ndim == 2 and image.shape == (k, n) and position.shape == (k, n, 2) and neurons.shape == (k,)
            and values.dtype.kind == "f" and all(a.dtype.kind in "iu" for a in (image, position, neurons)))
    if not good or not isinstance(sidecar, dict) or not isinstance(sidecar.get("sources"), list):
        raise FdsubError(f"{path} holds a malformed top-N result (shapes values {values.shape}, "
                         f"image_index {image.shape}, position {position.shape}, neurons {neurons.shape})")
    layer = str(arrays["layer"])
    if sidecar.get("layer", layer) != layer:
        raise FdsubError(f"{path}: top.npz is for layer {layer!r} but top.json for {sidecar.get('layer')!r}")
    return TopN(values.astype(np.float32), image.astype(np.int64), position.astype(np.int64), neurons.astype(np.int64),
                layer, [str(s) for s in sidecar["sources"]], int(sidecar.get("images_done", 0)),
                int(arrays["per_image"]), list(sidecar.get("skipped", [])))


# ---- checkpoints ---------------------------------------------------------------------------
def save_checkpoint(path: Path, state: TopN, signature: dict, images) -> None:
    """The state and what run it belongs to, as one npz replaced atomically."""
    sidecar = top_sidecar(state)
    sidecar["skipped"] = union_notes(state.skipped, getattr(images, "skipped", []))
    del sidecar["sources"]  # the image set gives them back; the signature checks their count
    meta = json.dumps({"signature": signature, "sidecar": sidecar})
    write_file_atomically(path, lambda f: np.savez(f, meta=np.asarray(meta), **top_arrays(state)),
                          label="checkpoint ", hint="; check the folder and free space")


def resume(path: Path, signature: dict, fresh: TopN) -> TopN:
    """The state saved at ``path`` when it belongs to this run; ``fresh`` when there is none."""
    if not path.exists():
        return fresh
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            arrays = {k: data[k] for k in NPZ_KEYS}
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise FdsubError(f"checkpoint {path} cannot be read ({type(exc).__name__}); delete it to start over") from None
    if meta.get("signature") != signature:
        raise FdsubError(f"checkpoint {path} belongs to a different run "
                         "(other model, layer, neurons, images or options); delete it to start over")
    sidecar = dict(meta["sidecar"], sources=fresh.sources)
    return _checked(arrays, sidecar, path)
