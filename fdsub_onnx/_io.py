"""Writing results atomically: decode results (decoded.npz and filters.png), and the folder writer they share."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ._errors import FdsubError
from ._render import filter_grid

NPZ_NAME = "decoded.npz"
PNG_NAME = "filters.png"


def save_decoded(decoded, out_dir: str | os.PathLike) -> list[Path]:
    """Write ``out_dir/decoded.npz`` and ``out_dir/filters.png``; return their paths.

    The npz holds ``filters`` [K, C, R_y, R_x], ``bias`` [K], ``neurons`` [K] (int64),
    ``stride`` and ``origin`` (int64 [2]), ``layer`` and ``mode`` (str); it loads with
    plain ``np.load``. Both files are written into a temporary folder beside ``out_dir``
    and moved into place with ``os.replace`` once complete: ``out_dir`` is created only
    then, files already in it are kept, and a failure leaves nothing behind.
    """
    return write_atomically(out_dir, *decoded_files(decoded))


def decoded_files(decoded) -> tuple[list[str], Callable[[Path], None]]:
    """The names ``save_decoded`` writes and the writer that makes them in a folder (to combine with other results)."""
    arrays = decoded_arrays(decoded)
    image = filter_grid(arrays["filters"], labels=[str(n) for n in arrays["neurons"]])

    def write(folder: Path) -> None:
        with open(folder / NPZ_NAME, "wb") as f:
            np.savez(f, **arrays)
        image.save(folder / PNG_NAME, format="PNG")

    return [NPZ_NAME, PNG_NAME], write


def write_file_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], None], label: str = "",
                          hint: str = "") -> Path:
    """Let ``write(f)`` fill a temporary file beside ``path``, then move it into place (parents created).

    A failure leaves no temporary file and ends as one FdsubError: "cannot write {label}{path}: {reason}{hint}".
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(handle, "wb") as f:
            write(f)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise FdsubError(f"cannot write {label}{path}: {exc.strerror or exc}{hint}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_atomically(out_dir: str | os.PathLike, names: list[str], write: Callable[[Path], None]) -> list[Path]:
    """Let ``write(tmp)`` create ``names`` in a temporary folder beside ``out_dir``, then move them in.

    ``out_dir`` (and missing parents) are created only once every file is complete; files already
    in it are kept; on failure nothing is left behind.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FdsubError(f"cannot write results to {out}: it is a file; give a folder")
    created: list[Path] = []
    tmp = None
    try:
        _make_dirs(out.parent, created)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        write(tmp)
        if not out.is_dir():
            out.mkdir()
            created.append(out)
        paths = []
        for name in names:
            os.replace(tmp / name, out / name)
            paths.append(out / name)
        created.clear()
        return paths
    except OSError as exc:
        reason = exc.strerror or exc
        raise FdsubError(f"cannot write results to {out}: {reason}; check the folder and free space") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for folder in reversed(created):  # only on failure: undo the folders made here
            try:
                folder.rmdir()
            except OSError:
                pass


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
    } | ({} if getattr(decoded, "instance_filters", None) is None else {
        "instance_filters": np.ascontiguousarray(decoded.instance_filters),
        "instance_bias": np.ascontiguousarray(decoded.instance_bias),
    })


def _make_dirs(folder: Path, made: list[Path]) -> None:
    """Create ``folder`` and its missing parents, appending each one created to ``made``."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        if folder.parent == folder:
            break
        folder = folder.parent
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            continue
        made.append(path)
