"""Writing results atomically: one file, or the set of files of one result, which appear together or not at all.

A result folder holds one result: the files of one command (and mode), listed in a small hidden manifest
(``.fdsub-result.json``). Writing the same kind of result again replaces the earlier one whole; a result of
another kind is refused rather than mixed in (a `decode` beside a `top` of other neurons reads as one result).
Files that are no result's are left alone.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from ..errors import FdsubError

MANIFEST = ".fdsub-result.json"


def _umask() -> int:
    """The process's umask: read from /proc where Linux shows it; else by setting it and back (process-wide for a
    moment: a thread creating a file meanwhile would get the wrong mode)."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0)
        os.umask(mask)
        return mask


def require_regular_file(path: str | os.PathLike, what: str) -> None:
    """Refuse a FIFO, socket or device before anything opens it (reading a FIFO blocks until a writer comes).

    A missing path or a folder passes: the caller says what it needs then.
    """
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise FdsubError(f"{os.fspath(path)} is not a regular file (a FIFO, socket or device); give the {what} itself")


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
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; a result follows the umask as open() would
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise FdsubError(f"cannot write {label}{path}: {exc.strerror or exc}{hint}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


def describe(kind: str) -> str:
    """``decode-fds`` -> "`fdsub decode --mode fds`"; ``top`` -> "`fdsub top`"."""
    command, _, mode = kind.partition("-")
    return f"`fdsub {command}{f' --mode {mode}' if mode else ''}`"


#: the longest file name most file systems take (bytes); a result's temporary names add a few characters
NAME_BYTES = 255
TEMPORARY_EXTRA = 32


def check_result_folder(out: str | os.PathLike, kind: str) -> None:
    """Refuse, before any work, an ``out`` where a result of ``kind`` cannot go: a file, a folder below a file, a name
    too long for the file system, or a folder holding a result of another kind."""
    out = Path(out)
    if len(os.fsencode(out.name)) + TEMPORARY_EXTRA > NAME_BYTES:
        raise FdsubError(f"cannot write results to {str(out)[:60]}...: the folder name is {len(os.fsencode(out.name))} "
                         f"bytes, over what file systems take ({NAME_BYTES - TEMPORARY_EXTRA} here); give a shorter "
                         "--out")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise FdsubError(f"cannot write results to {out}: {parent} is a file, not a folder; give another --out")
    _previous(out, kind)


def write_atomically(out_dir: str | os.PathLike, names: list[str], write: Callable[[Path], None],
                     kind: str) -> list[Path]:
    """Let ``write(tmp)`` create ``names`` in a temporary folder beside ``out_dir``, then move the set in.

    A new ``out_dir`` is the temporary folder renamed: all files at once. Into an existing folder the files of
    an earlier result of the same ``kind`` are moved aside, the new ones moved in, and on any failure the earlier
    ones are put back. ``out_dir`` (and missing parents) exist only after success; on failure nothing is left.
    """
    out = Path(out_dir)
    old = _previous(out, kind)
    for name in names:
        target = out / name
        if target.is_symlink() or (target.exists() and not target.is_file()):
            what = "a link" if target.is_symlink() else "a folder"
            raise FdsubError(f"cannot write results to {out}: {target} is {what}, not a result file; remove it or "
                             "give another --out folder")
    created: list[Path] = []
    tmp = None
    try:
        _make_dirs(out.parent, created)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private (0700); the folder follows the umask
        write(tmp)
        (tmp / MANIFEST).write_text(json.dumps({"kind": kind, "files": list(names)}))
        if out.is_dir():
            _swap_in(tmp, out, [*names, MANIFEST], sorted(set(old) | {n for n in names if (out / n).is_file()}))
        else:
            os.rename(tmp, out)
            tmp = None
        created.clear()
        return [out / name for name in names]
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


def _previous(out: Path, kind: str) -> list[str]:
    """The files of the earlier result in ``out`` (which the new one replaces); a FdsubError when ``out`` cannot
    take a result of ``kind``."""
    if not out.is_dir():
        if out.exists() or out.is_symlink():
            raise FdsubError(f"cannot write results to {out}: it is a file; give a folder")
        return []
    manifest = out / MANIFEST
    if not (manifest.exists() or manifest.is_symlink()):
        return []
    try:
        require_regular_file(manifest, "manifest")
        meta = json.loads(manifest.read_text(encoding="utf-8"))
        old_kind, files = meta["kind"], meta["files"]
        if not isinstance(old_kind, str) or not all(isinstance(f, str) and f == Path(f).name for f in files):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError, FdsubError):
        raise FdsubError(f"cannot write results to {out}: its {MANIFEST} cannot be read; delete it (it names the "
                         "files of the result there) or give another --out folder") from None
    if old_kind != kind:
        raise FdsubError(f"{out} holds the result of {describe(old_kind)}; give another --out folder for "
                         f"{describe(kind)}, or delete that one first")
    return [f for f in files if (out / f).is_file() and not (out / f).is_symlink()]


def _swap_in(tmp: Path, out: Path, names: list[str], old: list[str]) -> None:
    """Move the ``old`` files of ``out`` aside and the new ``names`` in from ``tmp``; undo both on failure."""
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    moved_old, moved_new, restored = [], [], True
    try:
        for name in [*old, MANIFEST]:
            if (out / name).exists():
                os.replace(out / name, aside / name)
                moved_old.append(name)
        for name in names:
            os.replace(tmp / name, out / name)
            moved_new.append(name)
    except OSError:
        restored = _undo(out, tmp, aside, moved_new, moved_old)
        raise
    finally:
        if restored:
            shutil.rmtree(aside, ignore_errors=True)


def _undo(out: Path, tmp: Path, aside: Path, moved_new: list[str], moved_old: list[str]) -> bool:
    """Take the new files back out and put the earlier ones back; False (and the folder aside kept) if any is stuck."""
    ok = True
    for src, dst, moved in ((out, tmp, moved_new), (aside, out, moved_old)):
        for name in reversed(moved):
            try:
                os.replace(src / name, dst / name)
            except OSError:
                ok = False
    return ok


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
