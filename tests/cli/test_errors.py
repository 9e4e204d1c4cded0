"""Bad input on the command line: one `error:` line and exit 2, never an internal error, a traceback or a hang;
sizes bounded before anything is allocated; names shown as they are, whatever they hold."""

from __future__ import annotations

import json
import os
import re
import sys

import numpy as np
import pytest
from clirun import assert_one_error_line, invoke, run_capped
from mutations import ACCEPTED, REFUSED, base_model, renamed
from PIL import Image


# ---- root cause 5: parse errors -----------------------------------------------------------
@pytest.mark.parametrize("args, fragment", [
    (["decode", "{net}", "--layer", "c2", "--frobnicate"], "--frobnicate"),
    (["top", "{net}", "--layer", "c2", "--images", "{images}", "--top", "abc"], "--top"),
    (["top", "{net}", "--layer", "c2", "--images", "{images}", "--top", "2.5"], "--top"),
    (["decode", "{net}"], "--layer"),
    (["frobnicate"], "frobnicate"),
    ([], "command"),
    (["decode"], "MODEL"),
    (["merge"], "DIR"),
    (["decode", "{net}", "--layer"], "--layer"),
    (["decode", "{net}", "--layer", "c2", "--grid", "abc"], "Invalid value for '--grid'"),
    (["nf", "{net}", "--layer", "c2", "--images", "{images}", "--grid", "2.5"], "Invalid value for '--grid'"),
])
def test_parse_errors_are_one_error_line(files, args, fragment):
    args = [a.format(net=files / "net.onnx", images=files / "images.npy") for a in args]
    line = assert_one_error_line(invoke(*args))
    assert fragment in line and "--help" in line


def test_help_still_works():
    result = invoke("--help")
    assert result.exit_code == 0 and "decode" in result.output
    result = invoke("decode", "--help")
    assert result.exit_code == 0 and "--layer" in result.output


# ---- root cause 4: names -------------------------------------------------------------------
@pytest.mark.parametrize("case", ["markup_name", "markup_layer", "non_utf8_name"])
def test_odd_names_show_as_they_are(files, tmp_path, case):
    path = tmp_path / "odd.onnx"
    path.write_bytes(ACCEPTED[case]().SerializeToString())
    table = invoke("inspect", path)
    assert table.exit_code == 0, table.output
    data = invoke("inspect", path, "--json")
    assert data.exit_code == 0, data.output
    layers = json.loads(data.stdout)["layers"]
    first = layers[0]["name"]
    assert first in table.output and layers[0]["node"] in table.output
    top = invoke("top", path, "--layer", first, "--images", files / "images.npy", "--top", 2,
                 "--out", tmp_path / "top")
    assert top.exit_code == 0, top.output
    decode = invoke("decode", path, "--layer", first, "--out", tmp_path / "dec")
    assert decode.exit_code == 0, decode.output


# ---- root causes 3, 9 and 10: models ------------------------------------------------------
@pytest.mark.parametrize("case", sorted(REFUSED))
def test_broken_models_are_one_error_line_in_every_command(files, tmp_path, case):
    path = tmp_path / "broken.onnx"
    path.write_bytes(REFUSED[case][0]().SerializeToString())
    for args in (["inspect", path], ["inspect", path, "--json"], ["check", path],
                 ["decode", path, "--layer", "c2", "--out", tmp_path / "o"]):
        line = assert_one_error_line(invoke(*args))
        assert REFUSED[case][1] in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.onnx"]


def test_nan_weights_decode_with_a_warning(files, tmp_path):
    path = tmp_path / "nan.onnx"
    path.write_bytes(ACCEPTED["nan_weight"]().SerializeToString())
    result = invoke("decode", path, "--layer", "c2", "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    warning = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "w1" in warning[0] and "NaN" in warning[0]


def test_a_fifo_model_or_image_file_is_refused_at_once(files, tmp_path):
    fifo = tmp_path / "model.onnx"
    os.mkfifo(fifo)
    result = run_capped("inspect", fifo, timeout=30)
    assert "not a regular file" in assert_one_error_line(result)
    images = tmp_path / "images.npy"
    os.mkfifo(images)
    result = run_capped("top", files / "net.onnx", "--layer", "c2", "--images", images, "--out", tmp_path / "o",
                        timeout=30)
    assert "not a regular file" in assert_one_error_line(result)


# ---- root cause 9: nonsense options -------------------------------------------------------
@pytest.mark.parametrize("extra, fragment", [
    (["--mean", "nan"], "--mean"),
    (["--std", "inf"], "--std"),
    (["--scale", "inf"], "--scale"),
    (["--scale", "nan"], "--scale"),
    (["--mode", ""], "mode ''"),
    (["--mode", "Local"], "mode 'Local'"),
    (["--dtype", "float16"], "float16"),
    (["--select", "topk:0"], "topk"),
    (["--top", "0"], "--top"),
    (["--top", "-3"], "--top"),
    (["--grid", "0"], "Invalid value for '--grid'"),  # not "No such option"
    (["--grid", "-3"], "Invalid value for '--grid'"),
    (["--batch-size", "0"], "--batch-size"),
])
def test_nonsense_options_are_refused(files, tmp_path, extra, fragment):
    result = invoke("decode", files / "net.onnx", "--layer", "c2", "--images", files / "images.npy",
                    "--out", tmp_path / "o", *extra)
    assert fragment in assert_one_error_line(result)
    assert list(tmp_path.iterdir()) == []


# ---- root cause 6: sizes bounded before allocating ---------------------------------------
@pytest.mark.parametrize("args, fragment", [
    (["decode", "{net}", "--layer", "c2", "--neurons", "0-1000000000000"], "1000000000000"),
    (["top", "{net}", "--layer", "c2", "--images", "{images}", "--top", "1000000000000"], "--top"),
    (["top", "{net}", "--layer", "c2", "--images", "builtin:glyphs:100000000000"], "100000000000"),
    (["top", "{net}", "--layer", "c2", "--images", "{images}", "--per-image", "1000000000000"], "--per-image"),
])
def test_huge_sizes_are_refused_before_allocating(files, tmp_path, args, fragment):
    args = [a.format(net=files / "net.onnx", images=files / "images.npy") for a in args]
    result = run_capped(*args, "--out", tmp_path / "o", timeout=60)
    assert fragment in assert_one_error_line(result)
    assert list(tmp_path.iterdir()) == []


def test_a_batch_size_beyond_the_images_is_the_images(files, tmp_path):
    result = run_capped("top", files / "net.onnx", "--layer", "c2", "--images", files / "images.npy", "--top", 2,
                        "--batch-size", "1000000000000", "--out", tmp_path / "o", timeout=60)
    assert result.exit_code == 0, result.output


def test_a_huge_declared_input_inspects_and_data_commands_refuse(files, tmp_path):
    proto = base_model()
    for dim, value in zip(proto.graph.input[0].type.tensor_type.shape.dim, (1, 3, 100000, 100000)):
        dim.dim_value = value
    for dim, value in zip(proto.graph.output[0].type.tensor_type.shape.dim, (1, 6, 49998, 49998)):
        dim.dim_value = value
    path = tmp_path / "huge.onnx"
    path.write_bytes(proto.SerializeToString())
    result = run_capped("inspect", path, "--json", timeout=60)
    assert result.exit_code == 0, result.output
    result = run_capped("top", path, "--layer", "c2", "--images", "builtin:blobs:2", "--out", tmp_path / "o",
                        timeout=60)
    assert "GiB" in assert_one_error_line(result)


# ---- first hour ------------------------------------------------------------------------------
def test_help_is_plain_shows_defaults_and_loads_no_onnx():
    """--help names flags without `<bool>` and shows defaults, without importing onnx (seconds otherwise)."""
    for command in ("decode", "top", "nf", "fidelity", "report", "check", "inspect", "merge", "zoo"):
        text = invoke(command, "--help").output
        assert "<bool>" not in text and "╭" not in text, text
    text = invoke("decode", "--help").output
    for default in ("[default: all]", "[default: 100", "[default: auto]"):
        assert default in text, text
    import subprocess

    code = ("import sys; from fdsub_onnx.cli.main import app\n"
            "try:\n    app(['decode', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('onnx' in sys.modules, 'onnxruntime' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False False", out


@pytest.mark.parametrize("command", ["decode", "top", "nf", "fidelity", "report"])
def test_options_are_the_same_across_commands(command):
    text = invoke(command, "--help").output
    for option in ("--batch-size", "--device", "--preset", "--input-shape", "--out", "--top"):
        assert option in text, f"{command} lacks {option}"
    if command in ("decode", "nf", "fidelity"):  # the commands that write filter PNGs
        assert "--grid" in text
    if command in ("decode", "fidelity", "report"):
        assert "--select" in text


def test_no_gpu_note_unless_a_gpu_was_asked_for(files, tmp_path, monkeypatch):
    result = invoke("decode", files / "net.onnx", "--layer", "c2", "--out", tmp_path / "o")
    assert result.exit_code == 0 and "note:" not in result.output, result.output


def test_inspect_never_splits_a_layer_name(tmp_path, monkeypatch):
    """First hour: `/conv1/Conv_outp` / `ut_0` could not be copied into --layer."""
    long = "/features/features.28/Conv_output_0_with_a_long_tail/conv_a"
    proto = renamed(base_model(), "feat_one", long)
    proto.graph.node[0].name = long.replace("output", "node")
    path = tmp_path / "long.onnx"
    path.write_bytes(proto.SerializeToString())
    monkeypatch.setenv("COLUMNS", "80")
    result = invoke("inspect", path)
    assert result.exit_code == 0, result.output
    assert long in result.output and proto.graph.node[0].name in result.output, result.output


def test_the_progress_bar_fits_80_columns():
    import io

    from rich.console import Console

    from fdsub_onnx.cli import _common

    stream = io.StringIO()
    console = Console(file=stream, width=80, force_terminal=True, color_system=None)
    with _common.progress_bar("/features/features.28/Conv_output_0 statistics (2 passes)", console=console) as bar:
        bar(0, 1000)
        bar(500, 1000)
    text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", stream.getvalue())  # cursor moves and line clears
    lines = [line for line in text.replace("\r", "\n").splitlines() if line.strip()]
    assert lines and all(len(line.rstrip()) <= 80 and "/1000" in line for line in lines), lines


def test_fidelity_refuses_a_holdout_not_larger_than_top(files, tmp_path):
    result = invoke("fidelity", files / "net.onnx", "--layer", "c2", "--images", files / "images.npy",
                    "--holdout", "builtin:blobs:4", "--top", 4, "--out", tmp_path / "o")
    line = assert_one_error_line(result)
    assert "4" in line and "--holdout" in line


def test_top_larger_than_the_images_is_said(files, tmp_path):
    result = invoke("top", files / "net.onnx", "--layer", "c2", "--images", files / "images.npy", "--top", 50,
                    "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    warning = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "50" in warning[0] and "6" in warning[0], result.output
    assert "top 50 instances" not in result.output


def test_uint8_arrays_of_0_to_255_are_refused(files, tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (4, 3, 16, 16)).astype(np.uint8)
    np.save(tmp_path / "u8.npy", array)
    result = invoke("top", files / "net.onnx", "--layer", "c2", "--images", tmp_path / "u8.npy",
                    "--out", tmp_path / "o")
    line = assert_one_error_line(result)
    assert "255" in line and "uint8" in line


def test_a_single_image_file_is_an_image_set(files, tmp_path):
    Image.new("RGB", (20, 20), (200, 30, 30)).save(tmp_path / "one.png")
    result = invoke("top", files / "net.onnx", "--layer", "c2", "--images", tmp_path / "one.png", "--top", 1,
                    "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    assert "over 1 image" in result.output


@pytest.mark.parametrize("size, code", [(2**62, 0), (10**20, 2)])
def test_a_huge_batch_size_is_the_images_or_one_line(files, tmp_path, size, code):
    """A batch past the image count is the images (fidelity's estimate multiplied it as given: an OverflowError
    at 10^20 and at 2^62, the one failure of a 3,000-case fuzz run); past 2^62 a count is refused in one line."""
    result = run_capped("fidelity", files / "net.onnx", "--layer", "c2", "--images", files / "images.npy",
                        "--holdout", files / "images.npy", "--top", 2, "--batch-size", str(size),
                        "--out", tmp_path / "o", timeout=120)
    assert result.exit_code == code, result.output
    assert "internal error" not in result.output and (code == 0 or "--batch-size" in result.output)
