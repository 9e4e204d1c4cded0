"""Reading a top-N result back (data/topn.py): every field is checked, so a tampered or half-copied file is one
error line, never an internal error or a silently wrong result."""

from __future__ import annotations

import json

import numpy as np
import pytest

import fdsub_onnx as fd
from fdsub_onnx import FdsubError, TopN


def _top(k=3, n=2, sources=5, ranges=((0, 5),)):
    values = np.sort(np.random.default_rng(0).random((k, n)).astype(np.float32), axis=1)[:, ::-1].copy()
    image = np.tile(np.arange(n, dtype=np.int64), (k, 1))
    return TopN(values, image, np.ones((k, n, 2), np.int64), np.arange(k), "c", [f"s{i}" for i in range(sources)],
                sum(b - a for a, b in ranges), 1, [], [list(r) for r in ranges])


def _tamper(folder, npz=None, sidecar=None):
    with np.load(folder / "top.npz") as data:
        arrays = {k: data[k] for k in data.files}
    arrays.update(npz or {})
    np.savez(folder / "top.npz", **arrays)
    meta = json.loads((folder / "top.json").read_text())
    meta.update(sidecar or {})
    (folder / "top.json").write_text(json.dumps(meta))


def test_round_trip_keeps_the_image_ranges(tmp_path):
    top = _top(ranges=((0, 2), (3, 5)))
    fd.save_top(top, tmp_path / "t")
    back = fd.load_top(tmp_path / "t")
    assert back.ranges == [[0, 2], [3, 5]] and back.images_done == 4
    assert json.loads((tmp_path / "t" / "top.json").read_text())["sources_digest"]


@pytest.mark.parametrize("npz, sidecar, fragment", [
    ({"values": np.full((3, 2), np.nan, np.float32)}, None, "NaN"),
    ({"image_index": np.full((3, 2), 7, np.int64)}, None, "image 7"),
    ({"image_index": np.full((3, 2), -5, np.int64)}, None, "image -5"),
    ({"position": np.full((3, 2, 2), -1, np.int64)}, None, "position"),
    ({"neurons": np.array([0, 0, 1])}, None, "twice"),
    ({"neurons": np.array([0, -1, 1])}, None, "neuron -1"),
    ({"per_image": np.asarray(0)}, None, "per_image"),
    ({"values": np.array([[1, 2], [3, 4], [5, 6]], np.float32)}, None, "descending"),
    (None, {"images_done": "x"}, "images_done"),
    (None, {"images_done": 2.5}, "images_done"),
    (None, {"images_done": True}, "images_done"),
    (None, {"images_done": 99}, "images_done"),
    (None, {"sources": ["a", "b"]}, "digest"),
    (None, {"ranges": [[0, 9]]}, "range"),
    (None, {"ranges": "all"}, "range"),
    (None, {"skipped": 5}, "skipped"),
    (None, {"layer": 3}, "layer"),
])
def test_a_tampered_result_is_one_error_line(tmp_path, npz, sidecar, fragment):
    fd.save_top(_top(), tmp_path / "t")
    _tamper(tmp_path / "t", npz, sidecar)
    with pytest.raises(FdsubError, match=fragment) as info:
        fd.load_top(tmp_path / "t")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04garbage", b"\x93NUMPY garbage", b"x" * 1000])
def test_garbage_files_are_one_error_line(tmp_path, content):
    """Root cause 7: a garbage .npz raised an internal BadZipFile."""
    fd.save_top(_top(), tmp_path / "t")
    (tmp_path / "t" / "top.npz").write_bytes(content)
    with pytest.raises(FdsubError, match="cannot read") as info:
        fd.load_top(tmp_path / "t")
    assert "\n" not in str(info.value)
    (tmp_path / "t" / "top.npz").unlink()
    fd.save_top(_top(), tmp_path / "u")
    (tmp_path / "u" / "top.json").write_bytes(content + b"\xff{")
    with pytest.raises(FdsubError, match="cannot read"):
        fd.load_top(tmp_path / "u")


def test_the_result_must_fit_the_layer():
    """nf --from-top read neurons outside the layer and positions outside its map."""
    top = _top()
    fd.check_top_fits(top, (1, 3, 2, 2))
    with pytest.raises(FdsubError, match="neuron 2"):
        fd.check_top_fits(top, (1, 2, 2, 2))
    with pytest.raises(FdsubError, match=r"position \(1, 1\)"):
        fd.check_top_fits(top, (1, 3, 1, 1))
