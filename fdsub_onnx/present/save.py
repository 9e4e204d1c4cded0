"""Saving decode results: decoded.npz and filters.png, alone or with the instances they came from."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..data.files import write_atomically
from ..data.topn import TopN, top_files
from ..defaults import DEFAULT_GRID
from ..errors import FdsubError
from .render import filter_grid
from .report import diff_page

NPZ_NAME = "decoded.npz"
PNG_NAME = "filters.png"


def result_kind(mode: str) -> str:
    """What a result folder of ``mode``'s decoding holds, for ``write_atomically``: ``decode-weights``,
    ``decode-fds``, ... or ``nf`` (one kind per command and mode, never mixed in one folder)."""
    return "nf" if mode == "nf" else f"decode-{mode}"


def save_decoded(decoded, out_dir: str | os.PathLike, grid: int | None = DEFAULT_GRID) -> list[Path]:
    """Write ``out_dir/decoded.npz`` and ``out_dir/filters.png``; return their paths.

    The PNG draws the first ``grid`` neurons (None: all), as many as fit PIL's size limit (``grid_cells``). The npz
    holds every neuron: it holds ``filters`` [K, C, R_y, R_x], ``bias`` [K], ``neurons`` [K] (int64),
    ``stride`` and ``origin`` (int64 [2]), ``layer`` and ``mode`` (str); it loads with
    plain ``np.load``. Both files are written into a temporary folder beside ``out_dir``
    and moved into place once complete (``data.files.write_atomically``): ``out_dir`` is created only
    then, an earlier result of the same mode there is replaced, one of another kind refused, other files
    kept, and a failure leaves nothing behind.
    """
    return write_atomically(out_dir, *decoded_files(decoded, grid=grid), kind=result_kind(decoded.mode))


def decoded_files(decoded, prefix: str = "",
                  grid: int | None = DEFAULT_GRID) -> tuple[list[str], Callable[[Path], None]]:
    """The names ``save_decoded`` writes (after ``prefix``) and the writer that makes them in a folder (to combine
    with other results); the PNG draws the first ``grid`` neurons (None: all)."""
    if grid is not None and (isinstance(grid, bool) or not isinstance(grid, (int, np.integer)) or grid < 1):
        raise FdsubError(f"grid must be a positive number of cells or None (all), got {grid!r}")
    arrays = decoded_arrays(decoded)
    shown = slice(None, grid)
    image = filter_grid(arrays["filters"][shown], labels=[str(n) for n in arrays["neurons"][shown]])
    npz, png = prefix + NPZ_NAME, prefix + PNG_NAME

    def write(folder: Path) -> None:
        with open(folder / npz, "wb") as f:
            np.savez(f, **arrays)
        image.save(folder / png, format="PNG")

    return [npz, png], write


def decoded_arrays(decoded) -> dict[str, np.ndarray]:
    """The npz contract's arrays, keyed by name, from a ``Decoded``."""
    return {
        "filters": np.ascontiguousarray(decoded.filters),
        "bias": np.ascontiguousarray(decoded.bias),
        "neurons": np.asarray(decoded.neurons, dtype=np.int64),
        "stride": np.asarray(decoded.stride, dtype=np.int64).reshape(2),
        "origin": np.asarray(decoded.origin, dtype=np.int64).reshape(2),
        "layer": np.asarray(str(decoded.layer)),
        "mode": np.asarray(str(decoded.mode)),
    } | ({} if getattr(decoded, "position", None) is None else {
        # weights mode: the output position decoded at, and where the filters hold ("interior" or "position")
        "position": np.asarray(decoded.position, dtype=np.int64).reshape(2),
        "exact_at": np.asarray(str(decoded.exact_at)),
    }) | ({} if tuple(getattr(decoded, "crop", (0, 0))) == (0, 0) and getattr(decoded, "field", None) is None else {
        # filters cut to what can meet the image: their offset in the whole receptive field, and its size
        "crop": np.asarray(decoded.crop, dtype=np.int64).reshape(2),
        "receptive_field": np.asarray(decoded.field, dtype=np.int64).reshape(2),
    }) | ({} if getattr(decoded, "instance_filters", None) is None else {
        "instance_filters": np.ascontiguousarray(decoded.instance_filters),
        "instance_bias": np.ascontiguousarray(decoded.instance_bias),
    }) | _held_arrays(getattr(decoded, "gates", None) or {})


def _held_arrays(held: dict) -> dict[str, np.ndarray]:
    """The values held while decoding: each vector (a channel gate, a layer norm's 1/std) in the ``gates`` JSON
    {tensor: [value per channel]}, each matrix (an attention matrix, a bilinear product's factor) as a float32 array
    in its own shape, ``held_0``, ``held_1``... named in order by the ``held_names`` JSON list (in the JSON, ViT-S's
    attention made a 412 MB file of a 9.6 MB decoding)."""
    vectors = {name: v for name, v in held.items() if sum(d > 1 for d in np.shape(v)) <= 1}
    matrices = [name for name in held if name not in vectors]
    arrays = {} if not vectors else {"gates": np.asarray(json.dumps(
        {name: np.asarray(v, np.float64).reshape(-1).tolist() for name, v in vectors.items()}))}
    if matrices:
        arrays["held_names"] = np.asarray(json.dumps(matrices))
        arrays |= {f"held_{i}": np.asarray(held[name], np.float32) for i, name in enumerate(matrices)}
    return arrays


def save_with_top(decoded, top: TopN, out_dir: str | os.PathLike, grid: int | None = DEFAULT_GRID) -> list[Path]:
    """Write a data-driven result (decoded.npz, filters.png of the first ``grid`` neurons) with its instances (top.npz,
    top.json), atomically."""
    decoded_names, write_decoded = decoded_files(decoded, grid=grid)
    top_names, write_top = top_files(top)

    def write(folder: Path) -> None:
        write_decoded(folder)
        write_top(folder)

    return write_atomically(out_dir, decoded_names + top_names, write, kind=result_kind(decoded.mode))


FIDELITY_JSON = "fidelity.json"


def save_fidelity(result: dict, out_dir: str | os.PathLike, decoded: dict | None = None,
                  grid: int | None = DEFAULT_GRID) -> list[Path]:
    """Write ``out_dir/fidelity.json`` (``fidelity``'s result) and, for each scored decoding (mode -> Decoded),
    ``<mode>-decoded.npz`` and ``<mode>-filters.png`` (``save_decoded``'s files, ``grid`` as there): what was
    scored, atomically."""
    parts = [([FIDELITY_JSON], lambda tmp: (tmp / FIDELITY_JSON).write_text(json.dumps(result, indent=1)))]
    parts += [decoded_files(one, f"{mode}-", grid) for mode, one in (decoded or {}).items()]

    def write(folder: Path) -> None:
        for _, part in parts:
            part(folder)

    return write_atomically(out_dir, [name for names, _ in parts for name in names], write, kind="fidelity")


DIFF_KIND, DIFF_JSON, DIFF_PNG, DIFF_HTML = "diff", "diff.json", "drift.png", "diff.html"


def save_diff(report, out_dir: str | os.PathLike) -> list[Path]:
    """Write a diff's result into ``out_dir`` atomically: ``diff.json`` (``DiffReport.to_json``, the JSON contract of
    docs/drift.md) and ``drift.png``: the most changed layer's most changed neurons, a row each: its filter in A, in
    B and their difference B - A, and (``diff --instances``) its Neuron Feature in A and in B, the mean of each
    model's top patches (each cell scaled on its own); ``diff.html``: both on one self-contained page."""
    shown = report.shown

    def write(folder: Path) -> None:
        (folder / DIFF_JSON).write_text(json.dumps(report.to_json(), indent=2))
        picture = None
        if shown is not None:
            a, b = shown["filters_a"], shown["filters_b"]
            parts, names = [a, b, b - a], ["A", "B", "B-A"]
            if "features_a" in shown and shown["features_a"].shape == a.shape:
                parts += [shown["features_a"], shown["features_b"]]
                names += ["NF A", "NF B"]
            cells = np.stack(parts, axis=1).reshape(-1, *a.shape[1:])
            labels = [f"{n} {part}" + (f" {drift:.2g}" if part == "B-A" else "")
                      for n, drift in zip(shown["neurons"], shown["filter_drift"]) for part in names]
            picture = filter_grid(cells, labels=labels, columns=len(parts))
            picture.save(folder / DIFF_PNG, format="PNG")
        (folder / DIFF_HTML).write_text(diff_page(report, picture), encoding="utf-8")

    names = [DIFF_JSON, DIFF_HTML] + ([DIFF_PNG] if shown is not None else [])
    return write_atomically(out_dir, names, write, kind=DIFF_KIND)
