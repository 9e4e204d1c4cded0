"""Result folders on the command line: all files or none, one default folder per command and mode, no mixing,
no checkpoint left behind; shards identify their images; results read back are checked."""

from __future__ import annotations

import json

import numpy as np
import pytest
from clirun import assert_one_error_line, invoke


def _top(files, out, *extra):
    return invoke("top", files / "net.onnx", "--layer", "c2", "--images", files / "images.npy", "--top", 3,
                  "--out", out, *extra)


def _visible(folder):
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


# ---- root cause 1 ------------------------------------------------------------------------------
def test_a_folder_in_the_way_leaves_the_output_as_it_was(files, tmp_path):
    out = tmp_path / "o"
    (out / "filters.png").mkdir(parents=True)
    result = invoke("decode", files / "net.onnx", "--layer", "c2", "--out", out)
    assert "filters.png" in assert_one_error_line(result)
    assert _visible(out) == ["filters.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_top_leaves_no_checkpoint_when_its_result_cannot_be_written(files, tmp_path):
    out = tmp_path / "o"
    (out / "top.json").mkdir(parents=True)
    assert_one_error_line(_top(files, out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]
    assert sorted(p.name for p in out.iterdir()) == ["top.json"]


# ---- first hour: folders --------------------------------------------------------------------------
def test_default_folders_per_command_and_mode(files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = [files / "net.onnx", "--layer", "c2"]
    data = ["--images", files / "images.npy", "--top", 2]
    for args in (["decode", *common], ["decode", *common, "--mode", "fds", *data],
                 ["decode", *common, "--mode", "local", *data], ["top", *common, *data], ["nf", *common, *data],
                 ["fidelity", *common, *data, "--holdout", "builtin:blobs:4", "--modes", "weights"]):
        result = invoke(*args)
        assert result.exit_code == 0, result.output
    assert _visible(tmp_path / "fdsub-out") == ["c2-fds", "c2-fidelity", "c2-local", "c2-nf", "c2-top", "c2-weights"]
    assert _visible(tmp_path / "fdsub-out" / "c2-weights") == ["decoded.npz", "filters.png"]


def test_results_of_two_commands_are_not_mixed(files, tmp_path):
    out = tmp_path / "o"
    assert _top(files, out).exit_code == 0
    before = {p: (out / p).read_bytes() for p in _visible(out)}
    line = assert_one_error_line(invoke("decode", files / "net.onnx", "--layer", "c2", "--out", out))
    assert "`fdsub top`" in line
    assert {p: (out / p).read_bytes() for p in _visible(out)} == before
    assert _top(files, out).exit_code == 0  # the same command replaces its own result


# ---- root cause 2: shards -----------------------------------------------------------------------
def test_merge_refuses_the_same_shard_twice_and_overlaps(files, tmp_path):
    for i in range(3):
        assert _top(files, tmp_path / f"s{i}", "--shard", f"{i}/3").exit_code == 0
    assert _top(files, tmp_path / "half", "--shard", "0/2").exit_code == 0
    for parts, fragment in [(["s0", "s0"], "twice"), (["s0", "half"], "overlap"), (["s1", "half"], "overlap")]:
        line = assert_one_error_line(invoke("merge", *[tmp_path / p for p in parts], "--out", tmp_path / "m"))
        assert fragment in line
        assert not (tmp_path / "m").exists()
    result = invoke("merge", tmp_path / "s2", tmp_path / "s0", tmp_path / "s1", "--out", tmp_path / "m")
    assert result.exit_code == 0, result.output
    merged = json.loads((tmp_path / "m" / "top.json").read_text())
    assert merged["images_done"] == 6 and merged["ranges"] == [[0, 6]]
    assert_one_error_line(invoke("merge", tmp_path / "m", tmp_path / "s1", "--out", tmp_path / "m2"))


def test_merge_refuses_shards_of_other_images(files, tmp_path):
    assert _top(files, tmp_path / "a", "--shard", "0/2").exit_code == 0
    np.save(tmp_path / "other.npy", np.zeros((6, 3, 16, 16), np.float32))
    assert invoke("top", files / "net.onnx", "--layer", "c2", "--images", tmp_path / "other.npy", "--top", 3,
                  "--shard", "1/2", "--out", tmp_path / "b").exit_code == 0
    line = assert_one_error_line(invoke("merge", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "m"))
    assert "sources" in line


# ---- root cause 7: results read back --------------------------------------------------------------
def _rewrite(folder, **arrays):
    with np.load(folder / "top.npz") as data:
        saved = {k: data[k] for k in data.files}
    saved.update(arrays)
    np.savez(folder / "top.npz", **saved)


@pytest.mark.parametrize("change, fragment, without_model", [
    (lambda top: _rewrite(top, neurons=np.array([0, 1, 99, 3, 4, 5])), "neuron 99", False),
    (lambda top: _rewrite(top, position=np.full((6, 3, 2), 40)), "position", False),
    (lambda top: _rewrite(top, values=np.full((6, 3), np.nan, np.float32)), "NaN", True),
    (lambda top: _rewrite(top, image_index=np.full((6, 3), 60)), "image 60", True),
    (lambda top: (top / "top.json").write_text(json.dumps(
        dict(json.loads((top / "top.json").read_text()), images_done="x"))), "images_done", True),
    (lambda top: (top / "top.npz").write_bytes(b"PK\x03\x04 garbage"), "cannot read", True),
])
def test_tampered_results_are_refused_by_nf_and_merge(files, tmp_path, change, fragment, without_model):
    """Root cause 7; merge has no model, so it catches what the files alone show."""
    top = tmp_path / "t"
    assert _top(files, top).exit_code == 0
    change(top)
    line = assert_one_error_line(invoke("nf", files / "net.onnx", "--layer", "c2", "--images", files / "images.npy",
                                        "--from-top", top, "--out", tmp_path / "nf"))
    assert fragment in line
    if without_model:
        assert fragment in assert_one_error_line(invoke("merge", top, "--out", tmp_path / "m"))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


def test_a_garbage_checkpoint_is_one_error_line(files, tmp_path):
    out = tmp_path / "o"
    (tmp_path / ".o.top-checkpoint.npz").write_bytes(b"PK\x03\x04 not a checkpoint")
    line = assert_one_error_line(_top(files, out))
    assert "checkpoint" in line and "delete it" in line
