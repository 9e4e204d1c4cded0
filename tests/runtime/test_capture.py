"""Top-N capture with onnxruntime against a brute-force scan; shards, resume, files and the CLI."""

from __future__ import annotations

import json

import netgen  # tests/ is on sys.path (tests/conftest.py)
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from typer.testing import CliRunner

import fdsub_onnx as fd
from fdsub_onnx import FdsubError
from fdsub_onnx.cli import top_cmd
from fdsub_onnx.cli.main import app
from fdsub_onnx.data.images import ArrayImages
from fdsub_onnx.data.topn import sources_digest
from fdsub_onnx.runtime.capture import _best

runner = CliRunner()


# ---- nets and the reference ------------------------------------------------------------
def _relu_maxpool():
    """conv-relu-maxpool-conv-relu on 3x16x16: layers (conv1, pool, conv2)."""
    b = netgen.NetBuilder(height=16, width=16, seed=5)
    conv1 = b.conv("input", 6, 3, 1, (1, 1, 1, 1))
    pool = b.maxpool(b.relu(conv1), 2, 2)
    conv2 = b.conv(pool, 5, 3)
    b.relu(conv2)
    return b.build([b.last]), (conv1, pool, conv2)


def _gemm(fixed_batch: bool):
    """conv -> flatten -> Gemm [N, 7]; with ``fixed_batch`` a Reshape to [1, -1] instead (no batching)."""
    b = netgen.NetBuilder(height=10, width=10, seed=6)
    x = b.relu(b.conv("input", 4, 3, 2))
    c, h, w = b.shapes[x]
    if fixed_batch:
        flat = b._node("Reshape", [x, b._const("flat", np.array([1, -1], np.int64))], (c * h * w, 1, 1))
    else:
        flat = b._node("Flatten", [x], (c * h * w, 1, 1), axis=1)
    weight = b._const("fc_w", np.random.default_rng(7).standard_normal((7, c * h * w)).astype(np.float32))
    fc = b._node("Gemm", [flat, weight], (7, 1, 1), transB=1)
    b._node("Reshape", [fc, b._const("as_map", np.array([0, 7, 1, 1], np.int64))], (7, 1, 1))
    return b.build([b.last]), fc


def brute_top(acts: np.ndarray, top: int, per_image: int = 1):
    """The contract computed the slow, obvious way from activations [N, K, H, W] (or [N, K])."""
    acts = acts.reshape(*acts.shape[:2], -1) if acts.ndim == 4 else acts[..., None]
    width = acts.shape[2] if acts.ndim == 3 and acts.shape[2] == 1 else None
    n, k, p = acts.shape
    values = np.full((k, top), -np.inf, np.float32)
    image = np.full((k, top), -1, np.int64)
    position = np.zeros((k, top), np.int64)
    for j in range(k):
        found = []
        for i in range(n):
            order = sorted(range(p), key=lambda q: (-acts[i, j, q], q))[:per_image]
            found += [(-acts[i, j, q], i, q) for q in order]
        for slot, (v, i, q) in enumerate(sorted(found)[:top]):
            values[j, slot], image[j, slot], position[j, slot] = -v, i, q
    return values, image, position, width


def assert_matches(result, acts, top, per_image=1, map_width=None):
    values, image, flat, _ = brute_top(acts, top, per_image)
    np.testing.assert_allclose(result.values, values, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(result.image_index, image)
    width = map_width or 1
    np.testing.assert_array_equal(result.position[..., 0] * width + result.position[..., 1], flat)


def assert_same(a, b):
    for key in ("values", "image_index", "position", "neurons"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key), err_msg=key)
    assert (a.layer, a.sources, a.images_done, a.per_image) == (b.layer, b.sources, b.images_done, b.per_image)


@pytest.fixture(scope="module")
def relu_net(tmp_path_factory):
    from checks import load_proto

    proto, layers = _relu_maxpool()
    model = load_proto(proto, tmp_path_factory.mktemp("relu"))
    images = np.random.default_rng(8).standard_normal((23, 3, 16, 16)).astype(np.float32)
    acts = netgen.run_ort(proto, images, list(layers))
    return model, layers, images, acts


# ---- against the brute-force scan --------------------------------------------------------
@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("per_image", [1, 3])
def test_top_equals_brute_force(relu_net, which, per_image):
    model, layers, images, acts = relu_net
    layer = layers[which]
    result = fd.capture_top(model, layer, ArrayImages(images), top=7, per_image=per_image, batch_size=5)
    assert result.values.shape == (acts[layer].shape[1], 7) and result.position.shape[1:] == (7, 2)
    assert result.images_done == 23 and result.layer == layer and result.per_image == per_image
    assert_matches(result, acts[layer], 7, per_image, map_width=acts[layer].shape[3])
    assert np.all(np.diff(result.values, axis=1) <= 0)


def test_selected_neurons_and_unfilled_slots(relu_net):
    model, layers, images, acts = relu_net
    result = fd.capture_top(model, layers[2], ArrayImages(images[:4]), top=6, neurons="3,1", batch_size=3)
    np.testing.assert_array_equal(result.neurons, [3, 1])
    assert_matches(result, acts[layers[2]][:4, [3, 1]], 6, map_width=acts[layers[2]].shape[3])
    assert np.all(result.image_index[:, 4:] == -1) and np.all(np.isneginf(result.values[:, 4:]))
    assert np.all(result.image_index[:, :4] >= 0)


def test_ties_go_to_lower_image_then_lower_position(relu_net):
    model, layers, _, _ = relu_net
    images = np.zeros((9, 3, 16, 16), np.float32)  # every position of every image gives the same value
    whole = fd.capture_top(model, layers[2], ArrayImages(images), top=4, per_image=2, batch_size=2)
    np.testing.assert_array_equal(whole.image_index, np.tile([0, 0, 1, 1], (5, 1)))
    np.testing.assert_array_equal(whole.position[0], [[0, 0], [0, 1], [0, 0], [0, 1]])
    parts = [fd.capture_top(model, layers[2], ArrayImages(images), top=4, per_image=2, shard=(i, 3)) for i in (2, 0, 1)]
    assert_same(fd.merge_top(parts), whole)


@pytest.mark.parametrize("fixed_batch", [False, True])
def test_gemm_layer_has_position_zero(fixed_batch, load):
    proto, fc = _gemm(fixed_batch)
    model = load(proto)
    images = np.random.default_rng(9).standard_normal((11, 3, 10, 10)).astype(np.float32)
    acts = netgen.run_ort(proto, images, [fc])[fc]
    assert acts.shape == (11, 7)
    result = fd.capture_top(model, fc, ArrayImages(images), top=4, batch_size=4)
    assert_matches(result, acts, 4)
    assert not result.position.any()


@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 12)), elements=st.integers(-3, 3).map(float)),
       st.integers(1, 14))
def test_best_is_a_full_sort_with_ties_broken(values, k):
    """_best (argpartition + tie rows) equals a full lexsort, on values with many ties."""
    ties = np.broadcast_to(np.arange(values.shape[1])[::-1], values.shape)
    expect = np.lexsort([ties, -values], axis=-1)[:, :k]
    np.testing.assert_array_equal(_best(values, [ties], k), expect)


# ---- shards, merge, resume ---------------------------------------------------------------
def test_merge_of_three_shards_equals_one_run(relu_net):
    model, layers, images, _ = relu_net
    one = fd.capture_top(model, layers[1], ArrayImages(images), top=5, per_image=2, batch_size=4)
    parts = [fd.capture_top(model, layers[1], ArrayImages(images), top=5, per_image=2, batch_size=4, shard=(i, 3))
             for i in range(3)]
    assert [p.images_done for p in parts] == [7, 8, 8]
    assert_same(fd.merge_top(parts), one)
    assert_same(fd.merge_top(parts[::-1]), one)
    smaller = fd.merge_top(parts, top=2)
    np.testing.assert_array_equal(smaller.image_index, one.image_index[:, :2])


def test_merge_rejects_mismatched_parts(relu_net):
    model, layers, images, _ = relu_net
    a = fd.capture_top(model, layers[2], ArrayImages(images[:5]), top=3)
    b = fd.capture_top(model, layers[2], ArrayImages(images[:5]), top=3, neurons="0-2")
    with pytest.raises(FdsubError, match="different neurons"):
        fd.merge_top([a, b])
    halves = [fd.capture_top(model, layers[2], ArrayImages(images[:5]), top=3, shard=(i, 2)) for i in range(2)]
    with pytest.raises(FdsubError, match="cannot merge into top 4"):
        fd.merge_top(halves, top=4)
    with pytest.raises(FdsubError, match="parts 1 and 2 are one shard given twice"):
        fd.merge_top([a, a])
    with pytest.raises(FdsubError, match="nothing to merge"):
        fd.merge_top([])


def test_resume_after_interruption_equals_one_run(relu_net, tmp_path):
    model, layers, images, _ = relu_net
    checkpoint = tmp_path / "state.npz"
    calls = []

    def interrupt(done, total):
        calls.append(done)
        if len(calls) == 3:  # the initial call, then two batches
            raise KeyboardInterrupt

    kwargs = dict(top=6, per_image=2, batch_size=4, checkpoint=checkpoint)
    with pytest.raises(KeyboardInterrupt):
        fd.capture_top(model, layers[2], ArrayImages(images), progress=interrupt, **kwargs)
    assert calls == [0, 4, 8] and checkpoint.exists()
    seen = []
    resumed = fd.capture_top(model, layers[2], ArrayImages(images), progress=lambda d, t: seen.append((d, t)), **kwargs)
    assert seen[0] == (8, 23) and seen[-1] == (23, 23) and len(seen) == 5  # 8, 12, 16, 20, 23
    assert_same(resumed, fd.capture_top(model, layers[2], ArrayImages(images), top=6, per_image=2))
    with pytest.raises(FdsubError, match="different run"):
        fd.capture_top(model, layers[2], ArrayImages(images), top=5, checkpoint=checkpoint)


def test_bad_arguments_are_one_line_errors(relu_net):
    model, layers, images, _ = relu_net
    cases = [
        (dict(shard=(3, 3)), "shard 3/3 does not exist"),
        (dict(neurons="9"), "out of range"),
        (dict(top=0), "top must be a positive integer"),
        (dict(images=ArrayImages(images[:, :, :8])), "images are"),
        (dict(layer="nope"), "no layer named"),
    ]
    for extra, message in cases:
        kwargs = dict(layer=layers[2], images=ArrayImages(images)) | extra
        with pytest.raises(FdsubError, match=message) as info:
            fd.capture_top(model, **kwargs)
        assert "\n" not in str(info.value)


# ---- files -------------------------------------------------------------------------------
def test_save_load_round_trip(relu_net, tmp_path):
    model, layers, images, _ = relu_net
    result = fd.capture_top(model, layers[2], ArrayImages(images[:6]), top=3, per_image=2)
    paths = fd.save_top(result, tmp_path / "out")
    assert [p.name for p in paths] == ["top.npz", "top.json"]
    with np.load(paths[0], allow_pickle=False) as data:
        assert set(data.files) == {"values", "image_index", "position", "neurons", "layer", "per_image"}
        assert data["values"].dtype == np.float32 and data["position"].dtype == np.int64
        assert str(data["layer"]) == layers[2] and int(data["per_image"]) == 2
    sidecar = json.loads(paths[1].read_text())
    sources = [f"array[{i}]" for i in range(6)]
    assert sidecar == {"layer": layers[2], "sources": sources, "sources_digest": sources_digest(sources),
                       "images_done": 6, "ranges": [[0, 6]], "skipped": []}
    assert_same(fd.load_top(tmp_path / "out"), result)
    assert_same(fd.load_top(paths[0]), result)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left


def test_load_top_rejects_bad_input(tmp_path):
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "top.npz").write_bytes(b"not a zip")
    (tmp_path / "garbage" / "top.json").write_text("{}")
    np.savez(tmp_path / "other.npz", filters=np.zeros(3))
    for path, message in [(tmp_path / "missing", "missing"), (tmp_path / "garbage", "cannot read"),
                          (tmp_path / "other.npz", "lacks values")]:
        with pytest.raises(FdsubError, match=message) as info:
            fd.load_top(path)
        assert "\n" not in str(info.value)


# ---- command line ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_files(tmp_path_factory, relu_net):
    import onnx

    folder = tmp_path_factory.mktemp("cli")
    proto, layers = _relu_maxpool()
    onnx.save(proto, str(folder / "net.onnx"))
    np.save(folder / "images.npy", relu_net[2])
    return folder, layers


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_error_line(result, code=2):
    lines = result.output.strip().splitlines()
    assert result.exit_code == code, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_cli_top_and_merge(cli_files, relu_net, tmp_path):
    folder, layers = cli_files
    model, images = relu_net[0], relu_net[2]
    common = [folder / "net.onnx", "--layer", layers[2], "--images", folder / "images.npy", "--top", 5,
              "--batch-size", 4]
    result = invoke("top", *common, "--out", tmp_path / "whole")
    assert result.exit_code == 0, result.output
    assert "top 5 instances of 5 neurons" in result.output and "over 23 images" in result.output
    whole = fd.load_top(tmp_path / "whole")
    assert_same(whole, fd.capture_top(model, layers[2], ArrayImages(images, name=str(folder / "images.npy")), top=5))
    for i in range(2):
        assert invoke("top", *common, "--shard", f"{i}/2", "--out", tmp_path / f"s{i}").exit_code == 0
    merged = invoke("merge", tmp_path / "s0", tmp_path / "s1", "--out", tmp_path / "merged")
    assert merged.exit_code == 0, merged.output
    assert_same(fd.load_top(tmp_path / "merged"), whole)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "s0", "s1", "whole"]  # checkpoints removed


def test_cli_top_resumes_from_its_checkpoint(cli_files, relu_net, tmp_path):
    folder, layers = cli_files
    model, images = relu_net[0], relu_net[2]
    out = tmp_path / "out"
    image_set = ArrayImages(images, name=str(folder / "images.npy"))

    def interrupt(done, total):
        if done >= 8:
            raise KeyboardInterrupt

    loaded = fd.load_model(folder / "net.onnx")
    with pytest.raises(KeyboardInterrupt):
        fd.capture_top(loaded, layers[2], image_set, top=5, batch_size=4, checkpoint=top_cmd.checkpoint_path(out),
                       progress=interrupt)
    result = invoke("top", folder / "net.onnx", "--layer", layers[2], "--images", folder / "images.npy",
                    "--top", 5, "--batch-size", 4, "--out", out)
    assert result.exit_code == 0, result.output
    assert f"resuming from {top_cmd.checkpoint_path(out)}: 8 of {len(images)} images done" in result.output
    assert_same(fd.load_top(out), fd.capture_top(model, layers[2], image_set, top=5))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.filterwarnings("error")
def test_resuming_with_more_slots_than_images_warns_nothing(relu_net, tmp_path):
    """--top above the image count leaves empty slots (-inf): resuming read them with np.diff, and NumPy's
    "invalid value encountered in subtract" reached the terminal (issue 28)."""
    model, layers, images, _ = relu_net
    checkpoint = tmp_path / "state.npz"

    def interrupt(done, total):
        if done >= 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fd.capture_top(model, layers[2], ArrayImages(images), top=len(images) + 20, batch_size=4,
                       checkpoint=checkpoint, progress=interrupt)
    resumed = fd.capture_top(model, layers[2], ArrayImages(images), top=len(images) + 20, batch_size=4,
                             checkpoint=checkpoint)
    assert resumed.images_done == len(images)


def test_cli_top_interrupted_says_where_its_checkpoint_is(cli_files, tmp_path, monkeypatch):
    """Ctrl-C: the command says how many images its checkpoint holds, where, and that a rerun resumes (issue 28)."""
    folder, layers = cli_files
    out = tmp_path / "out"
    real = fd.capture_top

    def interrupted(*args, **kwargs):
        def stop(done, total):
            if done >= 8:
                raise KeyboardInterrupt
        return real(*args, **{**kwargs, "progress": stop})

    monkeypatch.setattr(fd, "capture_top", interrupted)
    result = invoke("top", folder / "net.onnx", "--layer", layers[2], "--images", folder / "images.npy",
                    "--top", 5, "--batch-size", 4, "--out", out)
    assert result.exit_code == 130, result.output
    assert f"images done are saved in {top_cmd.checkpoint_path(out)}; run the same command again" in (
        result.output), result.output


def test_cli_top_refuses_a_folder_where_its_checkpoint_goes(cli_files, tmp_path):
    """A folder named as top's checkpoint beside --out: one line before any work (an IsADirectoryError before)."""
    folder, layers = cli_files
    out = tmp_path / "out"
    top_cmd.checkpoint_path(out).mkdir()
    result = invoke("top", folder / "net.onnx", "--layer", layers[2], "--images", folder / "images.npy",
                    "--out", out)
    assert "is not a file; remove it or give another --out" in assert_one_error_line(result)
    assert not out.exists()


@pytest.mark.parametrize("extra, message", [
    (["--shard", "1of3"], "--shard must be I/N"),
    (["--shard", "3/3"], "--shard must be I/N"),
    (["--neurons", "0,99"], "neuron 99 is out of range"),
    (["--layer", "nope"], "no layer named"),
])
def test_cli_top_errors_are_one_line(cli_files, tmp_path, extra, message):
    folder, layers = cli_files
    result = invoke("top", folder / "net.onnx", "--layer", layers[2], "--images", folder / "images.npy",
                    "--out", tmp_path / "out" / "nested", *extra)
    assert message in assert_one_error_line(result)
    assert list(tmp_path.iterdir()) == []  # no output folder, no checkpoint


def test_cli_merge_of_missing_folder_is_one_line(tmp_path):
    result = invoke("merge", tmp_path / "nope", "--out", tmp_path / "out")
    assert "no top-N result" in assert_one_error_line(result)
    assert list(tmp_path.iterdir()) == []


def test_nan_activations_rank_last():
    """A NaN activation is ranked as -inf, so it never hides a real maximum."""
    from fdsub_onnx.runtime.capture import _candidates

    acts = np.array([[[1.0, np.nan, 3.0, 2.0]], [[np.nan, np.nan, np.nan, np.nan]]], np.float32)  # [B=2, K=1, P=4]
    for per_image, values, flat in [(1, [3.0, -np.inf], [2, 0]), (2, [3.0, 2.0, -np.inf, -np.inf], [2, 3, 0, 1])]:
        got, image, position = _candidates(acts, 10, per_image, width=2)
        np.testing.assert_array_equal(got[0], values)
        np.testing.assert_array_equal(image[0], np.repeat([10, 11], per_image))
        np.testing.assert_array_equal(position[0, :, 0] * 2 + position[0, :, 1], flat)
