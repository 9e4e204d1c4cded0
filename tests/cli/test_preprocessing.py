"""The --preset/--mean/--std/--scale/--bgr options reach the images every data command reads."""

from __future__ import annotations

import numpy as np
from checks import load_proto
from netgen import NetBuilder
from typer.testing import CliRunner

import fdsub_onnx as fd
from fdsub_onnx.cli.main import app


def test_explicit_preprocessing_options_are_applied(tmp_path):
    b = NetBuilder(height=8, width=8, seed=1)
    last = b.conv(b.relu(b.conv("input", 3, 3)), 2, 3)
    model = load_proto(b.build([last]), tmp_path)
    images = np.random.default_rng(0).random((10, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", images)
    out = tmp_path / "top"
    result = CliRunner().invoke(app, ["top", model.path, "--layer", last, "--images", str(tmp_path / "x.npy"),
                                      "--top", "3", "--scale", "2", "--mean", "0.5,1,1.5", "--std", "0.25", "--bgr",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    by_hand = (images[:, ::-1] * 2 - np.array([0.5, 1, 1.5]).reshape(1, 3, 1, 1)) / 0.25
    want = fd.capture_top(model, last, fd.ArrayImages(by_hand.astype(np.float32)), top=3)
    np.testing.assert_allclose(np.load(out / "top.npz")["values"], want.values, rtol=1e-5)
    bad = CliRunner().invoke(app, ["top", model.path, "--layer", last, "--images", str(tmp_path / "x.npy"),
                                   "--mean", "a,b", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "--mean takes one number" in bad.output and not (tmp_path / "bad").exists()
