"""Writing results atomically: one file, or a set of files moved into a folder once all are complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from ..errors import FdsubError


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
