"""The `fdsub` command line (typer's CliRunner), the npz/PNG writer and the filter grid."""

from __future__ import annotations

import io
import json
import os
import sys
import warnings

import netgen  # tests/ is on sys.path (tests/conftest.py)
import numpy as np
import onnx
import pytest
from checks import save_proto, softmax_between_convs
from clirun import assert_one_error_line, invoke
from PIL import Image

import fdsub_onnx
from fdsub_onnx import FdsubError, filter_grid, save_decoded
from fdsub_onnx.cli import decode_cmd

NPZ_KEYS = {"filters", "bias", "neurons", "stride", "origin", "layer", "mode", "position", "exact_at", "crop",
            "receptive_field"}
LAYER_KEYS = {"name", "node", "op", "channels", "stride", "receptive_field", "origin", "decodable", "reason", "module",
              "per_position", "patch_grid"}


# ---- models ------------------------------------------------------------------------------
class Nets:
    """Model files for the tests, built once per module."""

    def __init__(self, folder):
        b = netgen.NetBuilder(height=16, width=16, seed=3)
        b.conv(b.avgpool(b.conv("input", 8, 3, 1, (1, 1, 1, 1)), 2, 2), 4, 3)
        self.linear_proto = b.build()
        self.linear_layers = list(b.layers)  # conv, avgpool, conv
        self.linear = save_proto(folder, "linear.onnx", self.linear_proto)
        self.last = self.linear_layers[-1]
        self.last_node = next(n.name for n in self.linear_proto.graph.node if n.output[0] == self.last)

        d = netgen.NetBuilder(height=16, width=16, dynamic=True)
        d.conv(d.conv("input", 4, 3, 2), 4, 3)
        self.dynamic = save_proto(folder, "dynamic.onnx", d.build())
        self.dynamic_last = d.layers[-1]

        w = netgen.NetBuilder(height=16, width=16, seed=3)
        w.conv("input", 80, 3)  # more neurons than filters.png draws by default
        self.wide = save_proto(folder, "wide.onnx", w.build())
        self.wide_layer = w.layers[-1]

        self.blocked = save_proto(folder, "blocked.onnx", softmax_between_convs())
        self.garbage = folder / "garbage.onnx"
        self.garbage.write_bytes(b"this is not an ONNX model\x00\xff" * 8)
        self.missing = folder / "missing.onnx"



@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    return Nets(tmp_path_factory.mktemp("models"))


# ---- inspect -----------------------------------------------------------------------------
def test_inspect_table_lists_layers_and_counts_decodable(nets):
    result = invoke("inspect", nets.blocked)
    assert result.exit_code == 0, result.output
    for name in ("c1", "c2", "conv_a", "conv_b"):
        assert name in result.output
    assert "Softmax" in result.output  # the reason c2 is not decodable
    assert result.output.strip().splitlines()[-1] == "1 of 2 layers decodable"


def test_inspect_json_contract(nets):
    result = invoke("inspect", nets.blocked, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == {"input", "layers", "held", "dequantized"} and data["held"] == data["dequantized"] == []
    assert set(data["input"]) == {"name", "shape"}
    assert data["input"]["name"] == "input"
    assert data["input"]["shape"] == [1, 3, 12, 12]
    assert [layer["name"] for layer in data["layers"]] == ["c1", "c2"]
    for layer in data["layers"]:
        assert set(layer) == LAYER_KEYS
        assert all(type(layer[k]) is str for k in ("name", "node", "op"))
        assert type(layer["channels"]) is int
        assert type(layer["decodable"]) is bool
    c1, c2 = data["layers"]
    assert (c1["node"], c1["op"], c1["channels"], c1["decodable"], c1["reason"]) == ("conv_a", "Conv", 4, True, None)
    assert (c1["stride"], c1["receptive_field"], c1["origin"]) == ([1, 1], [3, 3], [0, 0])
    assert c2["decodable"] is False and type(c2["reason"]) is str and "Softmax" in c2["reason"]
    assert c2["stride"] is None and c2["receptive_field"] is None and c2["origin"] is None


def test_inspect_json_geometry_of_linear_net(nets):
    data = json.loads(invoke("inspect", nets.linear, "--json").stdout)
    layers = {layer["name"]: layer for layer in data["layers"]}
    assert list(layers) == nets.linear_layers
    last = layers[nets.last]
    assert last["decodable"] is True and last["reason"] is None
    assert (last["stride"], last["receptive_field"], last["origin"]) == ([2, 2], [8, 8], [-1, -1])
    for layer in data["layers"]:
        for key in ("stride", "receptive_field", "origin"):
            assert len(layer[key]) == 2 and all(type(v) is int for v in layer[key])


def test_inspect_dynamic_model_with_input_shape(nets):
    result = invoke("inspect", nets.dynamic, "--input-shape", "1,3,20,24", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["input"]["shape"] == [1, 3, 20, 24]


@pytest.mark.parametrize("case", ["missing", "garbage", "dynamic", "bad_shape"])
def test_inspect_bad_input(nets, case):
    args = {
        "missing": [nets.missing],
        "garbage": [nets.garbage],
        "dynamic": [nets.dynamic],
        "bad_shape": [nets.dynamic, "--input-shape", "1,3,big,20"],
    }[case]
    for extra in ([], ["--json"]):
        assert_one_error_line(invoke("inspect", *args, *extra))


# ---- decode ------------------------------------------------------------------------------
def load_npz(path):
    with np.load(path) as npz:  # allow_pickle=False: every entry is a plain array
        return {k: npz[k] for k in npz.files}


def test_decode_writes_npz_and_png_contract(nets, tmp_path):
    out = tmp_path / "res" / "conv"
    result = invoke("decode", nets.linear, "--layer", nets.last, "--out", out)
    assert result.exit_code == 0, result.output
    assert str(out / "decoded.npz") in result.output and str(out / "filters.png") in result.output
    assert sorted(p.name for p in out.iterdir()) == [".fdsub-result.json", "decoded.npz", "filters.png"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["conv"]  # no temporary folder left
    d = load_npz(out / "decoded.npz")
    assert set(d) == NPZ_KEYS
    assert d["filters"].dtype == np.float32 and d["filters"].shape == (4, 3, 8, 8)
    assert d["bias"].dtype == np.float32 and d["bias"].shape == (4,)
    assert np.issubdtype(d["neurons"].dtype, np.integer) and d["neurons"].tolist() == [0, 1, 2, 3]
    for key, want in (("stride", [2, 2]), ("origin", [-1, -1]), ("position", [2, 2]), ("crop", [0, 0]),
                      ("receptive_field", [8, 8])):
        assert np.issubdtype(d[key].dtype, np.integer) and d[key].shape == (2,) and d[key].tolist() == want
    for key, want in (("layer", nets.last), ("mode", "weights"), ("exact_at", "interior")):
        assert d[key].dtype.kind == "U" and d[key].shape == () and str(d[key]) == want
    with Image.open(out / "filters.png") as image:
        assert image.format == "PNG" and image.mode == "RGB"
        assert min(image.size) >= 48


def _notes(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("note:")]


def test_decode_draws_64_of_many_neurons_and_says_so(nets, tmp_path):
    """Issue 23: every neuron in decoded.npz, the first DEFAULT_GRID in filters.png, one note naming --grid."""
    result = invoke("decode", nets.wide, "--layer", nets.wide_layer, "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    assert load_npz(tmp_path / "o" / "decoded.npz")["filters"].shape == (80, 3, 3, 3)
    assert _notes(result) == ["note: filters.png shows 64 of 80 neurons; --grid 80 for more"]
    with Image.open(tmp_path / "o" / "filters.png") as image:  # 8 x 8 cells of 48 px, labelled
        assert image.size == filter_grid(np.ones((64, 3, 3, 3)), labels=["0"] * 64).size == (2 + 8 * 50, 2 + 8 * 62)


@pytest.mark.parametrize("grid, cols, rows, note", [
    (80, 9, 9, None), (1000, 9, 9, None), (10, 4, 3, "note: filters.png shows 10 of 80 neurons; --grid 80 for more")])
def test_decode_grid_sets_the_cells_drawn(nets, tmp_path, grid, cols, rows, note):
    result = invoke("decode", nets.wide, "--layer", nets.wide_layer, "--out", tmp_path / "o", "--grid", grid)
    assert result.exit_code == 0, result.output
    assert _notes(result) == ([note] if note else [])
    with Image.open(tmp_path / "o" / "filters.png") as image:  # cells of 48 px, labelled
        assert image.size == (2 + cols * 50, 2 + rows * 62)


def test_nf_and_fidelity_draw_grid_cells_and_say_so(nets, files, tmp_path):
    nf = invoke("nf", nets.wide, "--layer", nets.wide_layer, "--images", files / "images.npy", "--top", 1,
                "--out", tmp_path / "nf")
    assert nf.exit_code == 0, nf.output
    assert _notes(nf) == ["note: filters.png shows 64 of 80 neurons; --grid 80 for more"]
    fidelity = invoke("fidelity", files / "net.onnx", "--layer", "c2", "--images", files / "images.npy",
                      "--holdout", "builtin:blobs:5", "--modes", "weights,nf", "--top", 2, "--grid", 2,
                      "--out", tmp_path / "fid")
    assert fidelity.exit_code == 0, fidelity.output
    assert _notes(fidelity) == ["note: *-filters.png shows 2 of 6 neurons; --grid 6 for more"]
    for mode in ("weights", "nf"):
        assert load_npz(tmp_path / "fid" / f"{mode}-decoded.npz")["filters"].shape[0] == 6
        with Image.open(tmp_path / "fid" / f"{mode}-filters.png") as image:
            assert image.size[0] == 2 + 2 * (image.size[1] - 2 - 12)  # one row of two square labelled cells


def test_decode_keeps_filters_png_under_pil_limit(nets, tmp_path, monkeypatch):
    """Issue 23: a 9478x9754 filters.png made PIL warn (DecompressionBombWarning); cells shrink, then fewer are drawn,
    and the note says it is PIL's limit (a --grid would not help)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = invoke("decode", nets.wide, "--layer", nets.wide_layer, "--out", tmp_path / "o", "--grid", 80)
        assert result.exit_code == 0, result.output
        assert "DecompressionBomb" not in result.output
        with Image.open(tmp_path / "o" / "filters.png") as image:
            assert image.width * image.height <= 5_000
    shown = fdsub_onnx.grid_cells(80, (3, 3))
    assert 0 < shown < 80
    assert _notes(result) == [f"note: filters.png shows {shown} of 80 neurons: more cells of 3x3 pixels would pass "
                              "PIL's image size limit (decoded.npz holds them all)"]


def test_decode_npz_satisfies_response_formula(nets, tmp_path):
    """The README contract: response = sum(filters[k] * window) + bias[k] for interior neurons."""
    out = tmp_path / "out"
    assert invoke("decode", nets.linear, "--layer", nets.last, "--out", out, "--dtype", "float64").exit_code == 0
    d = load_npz(out / "decoded.npz")
    assert d["filters"].dtype == np.float64 and d["bias"].dtype == np.float64
    image = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
    response = netgen.run_ort(nets.linear_proto, image, [nets.last])[nets.last][0]
    (sy, sx), (oy, ox), (ry, rx) = d["stride"], d["origin"], d["filters"].shape[2:]
    checked = 0
    for qy in range(response.shape[1]):
        for qx in range(response.shape[2]):
            y, x = oy + qy * sy, ox + qx * sx
            if y < 0 or x < 0 or y + ry > 16 or x + rx > 16:
                continue
            window = image[0, :, y : y + ry, x : x + rx].astype(np.float64)
            for i, k in enumerate(d["neurons"]):
                want = response[k, qy, qx]
                got = np.sum(d["filters"][i] * window) + d["bias"][i]
                assert abs(got - want) <= 1e-4 * (1 + abs(want)), (k, qy, qx, got, want)
                checked += 1
    assert checked > 0


def test_decode_neuron_selection_and_node_name(nets, tmp_path):
    out = tmp_path / "sel"
    result = invoke("decode", nets.linear, "--layer", nets.last_node, "--neurons", "3,0-1", "--out", out)
    assert result.exit_code == 0, result.output
    d = load_npz(out / "decoded.npz")
    assert d["neurons"].tolist() == [3, 0, 1]
    assert d["filters"].shape[0] == 3 and d["bias"].shape == (3,)
    assert str(d["layer"]) == nets.last  # the output tensor name, whatever name was given
    full = fdsub_onnx.decode(fdsub_onnx.load_model(nets.linear), nets.last)
    np.testing.assert_allclose(d["filters"], full.filters[[3, 0, 1]], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("command", ["decode", "top"])
def test_neurons_all_keyword(nets, tmp_path, command):
    """--neurons all: every neuron of the layer, as leaving --neurons out does for these commands."""
    extra = ["--images", "builtin:blobs:4", "--top", "2"] if command == "top" else []
    result = invoke(command, nets.linear, "--layer", nets.last, "--neurons", "all", *extra, "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    name = "top.npz" if command == "top" else "decoded.npz"
    assert load_npz(tmp_path / "o" / name)["neurons"].tolist() == [0, 1, 2, 3]


def test_decode_default_out_dir(nets, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("decode", nets.linear, "--layer", nets.linear_layers[0], "--neurons", "0")
    assert result.exit_code == 0, result.output
    folder = tmp_path / "fdsub-out" / f"{decode_cmd.sanitize(nets.linear_layers[0])}-weights"
    assert (folder / "decoded.npz").is_file() and (folder / "filters.png").is_file()
    assert os.path.join("fdsub-out", folder.name, "filters.png") in result.output
    renamed = onnx.ModelProto()
    renamed.CopyFrom(nets.linear_proto)
    next(n for n in renamed.graph.node if n.output[0] == nets.last).name = "/head/conv"
    by_node = invoke("decode", save_proto(tmp_path, "renamed.onnx", renamed), "--layer", "/head/conv", "--neurons", "0")
    assert by_node.exit_code == 0, by_node.output
    assert (tmp_path / "fdsub-out" / "head_conv-weights" / "decoded.npz").is_file()  # the name the user gave


def test_decode_dynamic_model_with_input_shape(nets, tmp_path):
    out = tmp_path / "dyn"
    result = invoke("decode", nets.dynamic, "--layer", nets.dynamic_last, "--input-shape", "1,3,20,20", "--out", out)
    assert result.exit_code == 0, result.output
    assert load_npz(out / "decoded.npz")["filters"].shape == (4, 3, 7, 7)


def test_decode_into_existing_folder_keeps_other_files(nets, tmp_path):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "decoded.npz").write_text("old")
    assert invoke("decode", nets.linear, "--layer", nets.last, "--out", out).exit_code == 0
    assert (out / "notes.txt").read_text() == "keep me"
    assert set(load_npz(out / "decoded.npz")) == NPZ_KEYS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]


def test_sanitize():
    assert decode_cmd.sanitize("/features/features.0/Conv_output_0") == "features_features.0_Conv_output_0"
    assert decode_cmd.sanitize("../..") == "layer"
    assert decode_cmd.sanitize("conv 1:a") == "conv_1_a"


BAD_DECODE = {
    # case: (model attribute, extra args, fragment expected in the message)
    "missing_file": ("missing", ["--layer", "x"], "not found"),
    "not_onnx": ("garbage", ["--layer", "x"], "garbage.onnx"),
    "unknown_layer": ("linear", ["--layer", "conv_99"], "did you mean"),
    "neurons_out_of_range": ("linear", ["--layer", "LAST", "--neurons", "0-100"], "out of range"),
    "neurons_bad_text": ("linear", ["--layer", "LAST", "--neurons", "1,x"], "0,5,10-20"),
    "dynamic_without_shape": ("dynamic", ["--layer", "DYN"], "--input-shape"),
    "not_decodable": ("blocked", ["--layer", "c2"], "not decodable"),
    "bad_input_shape_text": ("dynamic", ["--layer", "DYN", "--input-shape", "1,3,x,16"], "--input-shape"),
    "input_shape_three_values": ("dynamic", ["--layer", "DYN", "--input-shape", "1,3,16"], "--input-shape"),
    "input_shape_disagrees": ("linear", ["--layer", "LAST", "--input-shape", "1,1,16,16"], "disagrees"),
    "bad_dtype": ("linear", ["--layer", "LAST", "--dtype", "float16"], "float64"),
    "bad_mode": ("linear", ["--layer", "LAST", "--mode", "nope"], "weights"),
    # options no mode here reads, and values no option takes (issue 28: accepted silently before)
    "select_in_weights_mode": ("linear", ["--layer", "LAST", "--select", "max"], "--mode fds only"),
    "weighting_in_weights_mode": ("linear", ["--layer", "LAST", "--weighting", "activation"], "--mode fds only"),
    "empty_device": ("linear", ["--layer", "LAST", "--device", ""], "cpu, gpu or auto"),
}


@pytest.mark.parametrize("case", sorted(BAD_DECODE))
def test_decode_bad_input_is_one_line_and_writes_nothing(nets, tmp_path, case):
    model, extra, fragment = BAD_DECODE[case]
    extra = [{"LAST": nets.last, "DYN": nets.dynamic_last}.get(a, a) for a in extra]
    out = tmp_path / "results" / "out"
    line = assert_one_error_line(invoke("decode", getattr(nets, model), *extra, "--out", out))
    assert fragment in line
    assert not out.exists() and not out.parent.exists()


@pytest.mark.parametrize("where", ["below_a_file", "name_too_long"])
def test_an_out_that_cannot_be_is_refused_before_any_work(nets, tmp_path, where):
    """An --out below a regular file, or named longer than a file system takes: one line, nothing written (issue
    28: internal errors NotADirectoryError / OSError before)."""
    (tmp_path / "afile").write_text("mine")
    out = tmp_path / "afile" / "out" if where == "below_a_file" else tmp_path / ("x" * 300)
    line = assert_one_error_line(invoke("decode", nets.linear, "--layer", nets.last, "--out", out))
    assert ("is a file, not a folder" if where == "below_a_file" else "give a shorter --out") in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_decode_out_is_a_file(nets, tmp_path):
    out = tmp_path / "taken"
    out.write_text("a file")
    assert "is a file" in assert_one_error_line(invoke("decode", nets.linear, "--layer", nets.last, "--out", out))
    assert out.read_text() == "a file"


def test_unexpected_exception_is_one_line_unless_debug(nets, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(fdsub_onnx, "save_decoded", broken)
    out = tmp_path / "out"
    args = ("decode", nets.linear, "--layer", nets.last, "--out", out)
    line = assert_one_error_line(invoke(*args), code=1, prefix="internal error: ")
    assert "boom" in line and "please report it" in line
    result = invoke(*args, env={"FDSUB_DEBUG": "1"})
    assert result.exit_code != 0 and isinstance(result.exception, RuntimeError)
    assert not out.exists()


def test_version_and_help():
    assert invoke("--version").output.strip() == f"fdsub-onnx {fdsub_onnx.__version__}"
    for command in ("inspect", "decode"):
        result = invoke(command, "--help")
        assert result.exit_code == 0 and "--input-shape" in result.output


# ---- save_decoded ------------------------------------------------------------------------
def _decoded(k=3, c=3, r=5, dtype=np.float32):
    rng = np.random.default_rng(0)
    return fdsub_onnx.Decoded(rng.standard_normal((k, c, r, r)).astype(dtype), rng.standard_normal(k).astype(dtype),
                              np.arange(k), (2, 2), (-1, -1), "conv/1", "weights")


def test_save_decoded_returns_paths_and_round_trips(tmp_path):
    decoded = _decoded(dtype=np.float64)
    paths = save_decoded(decoded, tmp_path / "a" / "b")
    assert [p.name for p in paths] == ["decoded.npz", "filters.png"] and all(p.is_file() for p in paths)
    d = load_npz(paths[0])
    np.testing.assert_array_equal(d["filters"], decoded.filters)
    assert d["filters"].dtype == np.float64 and str(d["layer"]) == "conv/1" and d["neurons"].dtype == np.int64


def test_one_file_written_atomically(tmp_path):
    """The single-file writer of checkpoints and JUnit reports: all or nothing, one error line."""
    from fdsub_onnx.data.files import write_file_atomically

    path = write_file_atomically(tmp_path / "sub" / "state.bin", lambda f: f.write(b"done"))
    assert path.read_bytes() == b"done" and sorted(p.name for p in path.parent.iterdir()) == ["state.bin"]

    def full_disk(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(FdsubError, match=r"^cannot write checkpoint .*state.bin: No space left on device; free some$"):
        write_file_atomically(path, full_disk, label="checkpoint ", hint="; free some")
    assert path.read_bytes() == b"done" and sorted(p.name for p in path.parent.iterdir()) == ["state.bin"]


def test_save_decoded_grid_draws_the_first_neurons(tmp_path):
    paths = save_decoded(_decoded(k=5), tmp_path / "a", grid=2)
    assert load_npz(paths[0])["filters"].shape[0] == 5
    with Image.open(paths[1]) as image:
        assert image.size == filter_grid(np.ones((2, 3, 5, 5)), labels=["0", "1"]).size
    with Image.open(save_decoded(_decoded(k=5), tmp_path / "b", grid=None)[1]) as image:
        assert image.size == filter_grid(np.ones((5, 3, 5, 5)), labels=["0"] * 5).size
    for bad in (0, -1, 2.5, True):
        with pytest.raises(FdsubError, match="grid must be a positive"):
            save_decoded(_decoded(), tmp_path / "c", grid=bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_save_decoded_failure_leaves_nothing(tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", full_disk)
    with pytest.raises(FdsubError, match="No space left"):
        save_decoded(_decoded(), tmp_path / "new" / "out")
    assert list(tmp_path.iterdir()) == []


# ---- filter_grid -------------------------------------------------------------------------
def test_filter_grid_symmetric_normalization_and_gray():
    f = np.zeros((2, 1, 2, 2), np.float32)
    f[1, 0] = [[-1.0, 0.0], [0.5, 2.0]]
    image = np.asarray(filter_grid(f, cell=2))  # scale 1: cells are the raw filters
    first, second = image[2:4, 2:4], image[2:4, 6:8]
    assert (first == 128).all()  # an all-zero filter is mid-gray
    assert second[0, 0].tolist() == [64] * 3 and second[0, 1].tolist() == [128] * 3
    assert second[1, 1].tolist() == [255] * 3 and second[1, 0].tolist() == [159] * 3


def test_filter_grid_rgb_and_channel_mean():
    rgb = np.zeros((1, 3, 1, 1), np.float32)
    rgb[0, :, 0, 0] = [1.0, -1.0, 0.0]
    assert np.asarray(filter_grid(rgb, cell=1))[2, 2].tolist() == [255, 0, 128]
    five = np.zeros((1, 5, 1, 2), np.float32)
    five[0, :, 0, 0], five[0, :, 0, 1] = 1.0, [-1.0, -1.0, 0.0, 0.0, 0.0]  # means 1 and -0.4
    assert np.asarray(filter_grid(five, cell=1))[2, 2:4].tolist() == [[255] * 3, [76] * 3]


def test_filter_grid_layout_upscales_and_labels():
    image = filter_grid(np.ones((5, 3, 4, 4)), cell=48)
    assert image.size == (2 + 3 * (48 + 2), 2 + 2 * (48 + 2))  # 3 columns, 2 rows, 2 px gaps
    labelled = filter_grid(np.ones((5, 3, 4, 4)), labels=[str(i) for i in range(5)], cell=48)
    assert labelled.size[0] == image.size[0] and labelled.size[1] > image.size[1]
    with pytest.raises(ValueError):
        filter_grid(np.ones((5, 3, 4, 4)), labels=["0"])
    with pytest.raises(ValueError):
        filter_grid(np.ones((3, 4, 4)))


@pytest.mark.parametrize("limit, count, labels, shape, cells", [
    (20_000, 16, True, (20, 20), 16),  # smaller cells: 20 px (1 per filter pixel) instead of 60
    (5_000, 16, True, (20, 20), 6),  # not even 1-pixel cells fit: the first 6 filters
    (500, 1, True, (100, 100), 1),  # one filter larger than the limit: block-averaged
    (500, 3, False, (1, 300), 1),
])
def test_filter_grid_fits_pil_limit(monkeypatch, limit, count, labels, shape, cells):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    filters = np.random.default_rng(0).standard_normal((count, 3, *shape))
    names = [str(i) for i in range(count)] if labels else None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a DecompressionBombWarning fails the test
        image = filter_grid(filters, labels=names)
        assert image.width * image.height <= limit
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        with Image.open(buffer) as back:
            back.load()
    assert fdsub_onnx.grid_cells(count, shape, labelled=labels) == cells
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # no limit: every cell, 48 px at least
    assert fdsub_onnx.grid_cells(count, shape, labelled=labels) == count


def test_cli_is_the_subpackage_fdsub_onnx_cli():
    assert decode_cmd.__name__ == "fdsub_onnx.cli.decode_cmd"
    assert "cli" not in sys.modules  # no bare top-level `cli` module
