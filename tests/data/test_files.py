"""Result folders (data/files.py): every file of a result appears together or none does, an earlier result of the
same command is replaced whole, one of another command is never mixed in, and other files are kept."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

import fdsub_onnx as fd
from fdsub_onnx import Decoded, FdsubError, TopN
from fdsub_onnx.data.files import write_atomically, write_file_atomically


def _decoded(mode="weights", k=2):
    return Decoded(np.ones((k, 3, 2, 2), np.float32), np.zeros(k, np.float32), np.arange(k), (1, 1), (0, 0), "c",
                   mode)


def _top(k=2):
    return TopN(np.ones((k, 1), np.float32), np.zeros((k, 1), np.int64), np.zeros((k, 1, 2), np.int64),
                np.arange(k), "c", ["a"], 1, 1, [])


def _listing(folder):
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def test_a_folder_in_the_way_changes_nothing(tmp_path):
    """Root cause 1: files were moved in one at a time, so a failure on the second left the first replaced."""
    out = tmp_path / "o"
    (out / "filters.png").mkdir(parents=True)
    with pytest.raises(FdsubError, match="filters.png") as info:
        fd.save_decoded(_decoded(), out)
    assert "\n" not in str(info.value)
    assert _listing(out) == ["filters.png"] and (out / "filters.png").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_a_failed_move_puts_the_earlier_result_back(tmp_path, monkeypatch):
    out = tmp_path / "o"
    fd.save_decoded(_decoded(k=2), out)
    before = {name: (out / name).read_bytes() for name in _listing(out)}
    real, calls = os.replace, []

    def flaky(src, dst):
        calls.append(dst)
        if str(dst).startswith(str(out)) and len([c for c in calls if str(c).startswith(str(out))]) == 2:
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(FdsubError, match="No space left"):
        fd.save_decoded(_decoded(k=5), out)
    monkeypatch.setattr(os, "replace", real)
    assert {name: (out / name).read_bytes() for name in _listing(out)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_an_earlier_result_of_the_same_kind_is_replaced_whole_and_other_files_kept(tmp_path):
    out = tmp_path / "o"
    fd.save_with_top(_decoded("fds"), _top(), out)
    (out / "notes.txt").write_text("mine")
    fd.save_with_top(_decoded("fds", k=3), _top(k=3), out)
    assert _listing(out) == ["decoded.npz", "filters.png", "notes.txt", "top.json", "top.npz"]
    assert np.load(out / "decoded.npz")["filters"].shape[0] == 3 and fd.load_top(out).values.shape[0] == 3
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("first, second", [
    (lambda out: fd.save_top(_top(), out), lambda out: fd.save_decoded(_decoded(), out)),
    (lambda out: fd.save_with_top(_decoded("fds"), _top(), out), lambda out: fd.save_decoded(_decoded(), out)),
    (lambda out: fd.save_decoded(_decoded(), out), lambda out: fd.save_decoded(_decoded("local"), out)),
    (lambda out: fd.save_decoded(_decoded(), out), lambda out: fd.save_top(_top(), out)),
])
def test_results_of_different_commands_are_never_mixed(tmp_path, first, second):
    """First hour: a 1-neuron decoded.npz beside an 8-neuron top.npz, from two runs into one folder."""
    out = tmp_path / "o"
    first(out)
    before = {name: (out / name).read_bytes() for name in _listing(out)}
    with pytest.raises(FdsubError, match="holds the result of `fdsub ") as info:
        second(out)
    assert "another" in str(info.value)
    assert {name: (out / name).read_bytes() for name in _listing(out)} == before


def test_result_folder_check_before_any_work(tmp_path):
    out = tmp_path / "o"
    fd.check_result_folder(out, "top")
    assert not out.exists()
    fd.save_top(_top(), out)
    fd.check_result_folder(out, "top")
    with pytest.raises(FdsubError, match="holds the result of `fdsub top`"):
        fd.check_result_folder(out, "decode-weights")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FdsubError, match="is a file"):
        fd.check_result_folder(tmp_path / "file", "top")


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_results_follow_the_umask(tmp_path, mask):
    """A result folder and its files get the permissions the umask gives any new file (mkdtemp and mkstemp make
    them private: a 0022 umask left colleagues unable to read ``drwx------`` results)."""
    old = os.umask(mask)
    try:
        write_atomically(tmp_path / "out", ["a.txt"], lambda folder: (folder / "a.txt").write_text("x"), kind="nf")
        write_file_atomically(tmp_path / "one.json", lambda f: f.write(b"{}"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((tmp_path / "one.json").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE((tmp_path / "out" / "a.txt").stat().st_mode) == 0o666 & ~mask
