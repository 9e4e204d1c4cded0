"""Image sets: folders, arrays and builtins, sized and preprocessed for the model (fdsub_onnx.data.images)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fdsub_onnx as fd

ORANGE = (255, 128, 0)


def save_png(path, pixels) -> None:
    """Write a uint8 [H, W, 3] array as a PNG, creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(path)


def solid(height: int, width: int, colour=ORANGE) -> np.ndarray:
    return np.broadcast_to(np.array(colour, dtype=np.uint8), (height, width, 3))


def everything(images) -> np.ndarray:
    """All images of a set as one array, checking the batch indices on the way."""
    out = []
    for first, batch in images.batches(3):
        assert first == sum(len(b) for b in out)
        assert batch.dtype == np.float32
        out.append(batch)
    return np.concatenate(out)


R, G = 128 / 255, 128.0
PRESET_PIXELS = {  # per output channel, for one (255, 128, 0) pixel
    "raw": [1.0, R, 0.0],
    "torchvision": [(1 - 0.485) / 0.229, (R - 0.456) / 0.224, (0 - 0.406) / 0.225],
    "caffe": [0 - 103.939, G - 116.779, 255 - 123.68],
    "tf": [1.0, 2 * R - 1, -1.0],
}


@pytest.mark.parametrize("preset", sorted(PRESET_PIXELS))
def test_presets_on_a_solid_png(tmp_path, preset):
    save_png(tmp_path / "a.png", solid(10, 12))
    images = fd.open_images(str(tmp_path), (3, 8, 8), preset=preset)
    (first, batch), = images.batches(4)
    assert first == 0 and batch.shape == (1, 3, 8, 8)
    expected = np.array(PRESET_PIXELS[preset], dtype=np.float64).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(batch, np.broadcast_to(expected, batch.shape), rtol=0, atol=1e-5)


def test_explicit_values_override_the_preset(tmp_path):
    save_png(tmp_path / "a.png", solid(4, 4))
    images = fd.open_images(str(tmp_path), (3, 4, 4), preset="torchvision", mean=[1, 2, 3], std=2, scale=10, bgr=True)
    got = everything(images)[0, :, 0, 0]
    np.testing.assert_allclose(got, [(0 - 1) / 2, (10 * R - 2) / 2, (10 - 3) / 2], atol=1e-5)


def test_gray_model_gets_one_channel_and_averaged_preset(tmp_path):
    save_png(tmp_path / "a.png", solid(6, 6))
    gray = 0.299 * 1 + 0.587 * R  # Pillow's "L", rounded to a byte below
    gray = round(gray * 255) / 255
    raw = everything(fd.open_images(str(tmp_path), (1, 5, 5)))
    assert raw.shape == (1, 1, 5, 5)
    np.testing.assert_allclose(raw, gray, atol=1e-5)
    tv = everything(fd.open_images(str(tmp_path), (1, 5, 5), preset="torchvision"))
    np.testing.assert_allclose(tv, (gray - np.mean([0.485, 0.456, 0.406])) / np.mean([0.229, 0.224, 0.225]), atol=1e-5)
    blobs = everything(fd.open_images("builtin:blobs:4", (1, 9, 7)))
    assert blobs.shape == (4, 1, 9, 7)


@pytest.mark.parametrize("shape", [(3, 8, 8), (1, 8, 8)])
def test_a_16_bit_gray_png_keeps_its_values(tmp_path, shape):
    """A 16-bit gray PNG (Pillow's I;16) is read as value / 65535, in every channel (it was clipped at 255 by the
    conversion to 8 bits: a mid-gray image came back almost white)."""
    values = np.array([[0, 16384], [32768, 65535]], np.uint16).repeat(4, axis=0).repeat(4, axis=1)
    Image.fromarray(values).save(tmp_path / "deep.png")
    got = everything(fd.open_images(str(tmp_path), shape))[0]
    assert got.shape == shape
    np.testing.assert_allclose(got[:, :4, :4], 0.0, atol=1e-6)
    np.testing.assert_allclose(got[:, 4:, 4:], 1.0, atol=1e-6)
    np.testing.assert_allclose(got.mean(), (0 + 16384 + 32768 + 65535) / 4 / 65535, atol=1e-3)


def test_a_relative_folder_reads_from_another_working_folder(tmp_path, monkeypatch):
    """The files are read by absolute path (a Dask worker's working folder is its own: a relative --images on a
    tcp:// cluster said the user's file did not exist); the names stay as given."""
    (tmp_path / "photos").mkdir()
    save_png(tmp_path / "photos" / "a.png", solid(6, 6))
    monkeypatch.chdir(tmp_path)
    images = fd.open_images("photos", (3, 6, 6))
    monkeypatch.chdir(tmp_path.parent)
    assert list(images.sources) == [str(Path("photos") / "a.png")]
    np.testing.assert_allclose(everything(images)[0, :, 0, 0], np.array(ORANGE) / 255, atol=1e-6)


def test_unknown_preset_lists_the_choices(tmp_path):
    with pytest.raises(fd.FdsubError, match="raw, torchvision, caffe, tf"):
        fd.open_images("builtin:glyphs:2", (3, 8, 8), preset="imagenet")


def test_wide_image_is_resized_then_centre_cropped(tmp_path):
    """200x100 red|green|green|blue quarters: a square crop keeps only green; squashing would keep red and blue."""
    pixels = np.zeros((100, 200, 3), dtype=np.uint8)
    pixels[:, :50] = (255, 0, 0)
    pixels[:, 50:150] = (0, 255, 0)
    pixels[:, 150:] = (0, 0, 255)
    save_png(tmp_path / "wide.png", pixels)
    image = everything(fd.open_images(str(tmp_path), (3, 50, 50)))[0]
    np.testing.assert_allclose(image[:, :, 2:-2], np.broadcast_to([[[0.0]], [[1.0]], [[0.0]]], (3, 50, 46)))
    assert image[1].mean() > 0.95


def test_non_square_target_covers_then_crops(tmp_path):
    """100x100 red/green/blue bands of 25/50/25 rows into 20x40: scaled to 40x40, rows 10..30 kept: all green."""
    pixels = np.zeros((100, 100, 3), dtype=np.uint8)
    pixels[:25] = (255, 0, 0)
    pixels[25:75] = (0, 255, 0)
    pixels[75:] = (0, 0, 255)
    save_png(tmp_path / "square.png", pixels)
    image = everything(fd.open_images(str(tmp_path), (3, 20, 40)))[0]
    assert image.shape == (3, 20, 40)
    np.testing.assert_allclose(image[:, 2:-2], np.broadcast_to([[[0.0]], [[1.0]], [[0.0]]], (3, 16, 40)))
    assert image[1].mean() > 0.95


def test_folder_is_recursive_sorted_and_skips_bad_files(tmp_path):
    for name in ["b.png", "a/z.JPG", "a/b/c.jpeg", "c.png", "Z/y.png"]:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(solid(8, 8)).save(path, format="PNG" if path.suffix.lower() == ".png" else "JPEG")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (tmp_path / "notes.txt").write_text("not an image")
    images = fd.open_images(str(tmp_path), (3, 4, 4))
    relative = [str(p)[len(str(tmp_path)) + 1 :] for p in images.sources]
    assert relative == ["Z/y.png", "a/b/c.jpeg", "a/z.JPG", "b.png", "c.png"]
    assert len(images) == 5
    assert [source for source, _ in images.skipped] == [str(tmp_path / "broken.png")]
    assert images.skipped[0][1]
    assert everything(images).shape == (5, 3, 4, 4)


def test_folder_without_usable_images_is_an_error(tmp_path):
    with pytest.raises(fd.FdsubError, match="no usable"):
        fd.open_images(str(tmp_path), (3, 4, 4))
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    with pytest.raises(fd.FdsubError, match="1 could not be read"):
        fd.open_images(str(tmp_path), (3, 4, 4))


def test_file_broken_after_the_check_names_the_file(tmp_path):
    save_png(tmp_path / "a.png", solid(8, 8))
    images = fd.open_images(str(tmp_path), (3, 4, 4))
    (tmp_path / "a.png").write_bytes(b"gone bad")
    with pytest.raises(fd.FdsubError, match="a.png"):
        everything(images)


def test_npy_values_are_taken_as_they_are(tmp_path):
    array = np.random.default_rng(0).standard_normal((7, 3, 5, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", array)
    images = fd.open_images(str(tmp_path / "x.npy"), (3, 5, 6))
    assert len(images) == 7 and images.skipped == []
    assert images.sources[3] == f"{tmp_path / 'x.npy'}[3]"
    np.testing.assert_array_equal(everything(images), array)


def test_npy_with_a_preset_counts_as_0_to_1_rgb(tmp_path):
    array = np.random.default_rng(1).random((2, 3, 4, 4))
    np.save(tmp_path / "x.npy", array)
    got = everything(fd.open_images(str(tmp_path / "x.npy"), (3, 4, 4), preset="caffe"))
    expected = array[:, ::-1] * 255 - np.array([103.939, 116.779, 123.68]).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_npz_prefers_the_images_key_else_the_first(tmp_path):
    a = np.zeros((2, 1, 3, 3))
    b = np.ones((4, 1, 3, 3))
    np.savez(tmp_path / "keyed.npz", other=a, images=b)
    np.savez(tmp_path / "plain.npz", first=b, second=a)
    assert len(fd.open_images(str(tmp_path / "keyed.npz"), (1, 3, 3))) == 4
    assert everything(fd.open_images(str(tmp_path / "plain.npz"), (1, 3, 3))).min() == 1.0


@pytest.mark.parametrize("shape", [(3, 5, 5), (2, 2, 5, 5), (2, 3, 4, 5), (2, 3, 5, 5, 1)])
def test_array_of_the_wrong_shape_names_the_expected_one(tmp_path, shape):
    np.save(tmp_path / "x.npy", np.zeros(shape, dtype=np.float32))
    with pytest.raises(fd.FdsubError, match=r"\[N, 3, 5, 4\].*not resized") as err:
        fd.open_images(str(tmp_path / "x.npy"), (3, 5, 4))
    assert "\n" not in str(err.value)


def test_empty_array_is_an_error(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((0, 3, 4, 4), dtype=np.float32))
    with pytest.raises(fd.FdsubError, match="no images"):
        fd.open_images(str(tmp_path / "x.npy"), (3, 4, 4))


@pytest.mark.parametrize("kind", ["glyphs", "gratings", "blobs"])
def test_builtins_are_deterministic_and_varied(kind):
    first = fd.open_images(f"builtin:{kind}:6", (3, 24, 32))
    again = everything(fd.open_images(f"builtin:{kind}:6", (3, 24, 32)))
    images = everything(first)
    assert len(first) == 6 and first.sources[5] == f"builtin:{kind}[5]"
    assert images.shape == (6, 3, 24, 32)
    np.testing.assert_array_equal(images, again)
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    assert images.std(axis=(1, 2, 3)).min() > 0.01  # no image is flat
    assert not np.array_equal(images[0], images[1])


def test_builtin_default_count_and_bad_counts():
    assert len(fd.open_images("builtin:glyphs", (3, 8, 8))) == 256
    with pytest.raises(fd.FdsubError, match="positive integer"):
        fd.open_images("builtin:glyphs:zero", (3, 8, 8))
    with pytest.raises(fd.FdsubError, match="builtin:glyphs\\|gratings\\|blobs"):
        fd.open_images("builtin:faces", (3, 8, 8))


@pytest.mark.parametrize(
    ("spec", "message"),
    [("missing-folder", "no such file or folder: missing-folder"), ("notes.txt", "cannot read images from")],
)
def test_bad_specs(tmp_path, monkeypatch, spec, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(fd.FdsubError, match=message):
        fd.open_images(spec, (3, 8, 8))


def test_files_need_rgb_or_gray_models(tmp_path):
    save_png(tmp_path / "a.png", solid(4, 4))
    with pytest.raises(fd.FdsubError, match="takes 4"):
        fd.open_images(str(tmp_path), (4, 4, 4))


@pytest.mark.parametrize("start", [0, 1, 4, 6, 7, 9])
@pytest.mark.parametrize("size", [1, 3, 10])
def test_batches_cover_start_to_end_in_order(start, size):
    array = np.arange(9, dtype=np.float32).reshape(9, 1, 1, 1) * np.ones((1, 2, 2, 2), dtype=np.float32)
    for images in (fd.ArrayImages(array), fd.open_images("builtin:gratings:9", (3, 2, 2))):
        seen = []
        for first, batch in images.batches(size, start=start):
            assert first == start + len(seen) and 1 <= len(batch) <= size
            seen.extend(range(first, first + len(batch)))
            if isinstance(images, fd.ArrayImages):
                np.testing.assert_array_equal(batch[:, 0, 0, 0], np.arange(first, first + len(batch)))
        assert seen == list(range(start, 9))


def test_batches_reject_a_zero_size():
    with pytest.raises(fd.FdsubError, match="batch size"):
        next(fd.ArrayImages(np.zeros((2, 1, 1, 1))).batches(0))


@pytest.mark.parametrize("option, value", [("mean", float("nan")), ("std", float("inf")), ("scale", float("inf")),
                                           ("scale", float("nan")), ("mean", [0.5, float("nan"), 0.5])])
def test_non_finite_preprocessing_is_refused(option, value):
    """Root cause 9: --mean nan / --scale inf made every activation NaN, exit 0."""
    with pytest.raises(fd.FdsubError, match=option):
        fd.open_images("builtin:blobs:2", (3, 8, 8), **{option: value})


def test_builtin_count_is_bounded_before_anything_is_made():
    """Root cause 6: builtin:glyphs:100000000000 built a list of 10^11 names."""
    with pytest.raises(fd.FdsubError, match="at most"):
        fd.open_images("builtin:glyphs:100000000000", (3, 8, 8))


def test_one_image_file_is_a_set_of_one(tmp_path):
    save_png(tmp_path / "a.png", solid(20, 10))
    images = fd.open_images(str(tmp_path / "a.png"), (3, 8, 8))
    assert images.sources == [str(tmp_path / "a.png")] and next(images.batches(4))[1].shape == (1, 3, 8, 8)
    (tmp_path / "b.png").write_bytes(b"not a png")
    with pytest.raises(fd.FdsubError, match="b.png"):
        fd.open_images(str(tmp_path / "b.png"), (3, 8, 8))


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int64])
def test_integer_arrays_above_1_are_refused(tmp_path, dtype):
    np.save(tmp_path / "x.npy", np.full((2, 3, 4, 4), 200, dtype))
    with pytest.raises(fd.FdsubError, match="200"):
        fd.open_images(str(tmp_path / "x.npy"), (3, 4, 4))
    np.save(tmp_path / "y.npy", np.ones((2, 3, 4, 4), dtype))  # 0/1 masks are fine
    assert len(fd.open_images(str(tmp_path / "y.npy"), (3, 4, 4))) == 2


def test_huge_images_are_refused_before_they_are_made():
    with pytest.raises(fd.FdsubError, match="GiB"):
        fd.open_images("builtin:blobs:2", (3, 100000, 100000))


def test_a_sample_is_evenly_spaced_and_reads_as_its_base():
    """``SampledImages``: ``count`` images from the first to the last, each batch the base's images (preset
    applied once), all of them when ``count`` is not smaller than the set."""
    from fdsub_onnx.data.images import SampledImages, resolve_preset

    array = np.random.default_rng(0).uniform(0, 1, (10, 3, 4, 4)).astype(np.float32)
    base = fd.ArrayImages(array, preset=resolve_preset("torchvision", 3))
    sample = SampledImages(base, 4)
    assert sample.indices.tolist() == [0, 3, 6, 9] and sample.sources == [base.sources[i] for i in (0, 3, 6, 9)]
    whole = np.concatenate([batch for _, batch in base.batches(10)])
    got = [(first, batch) for first, batch in sample.batches(3)]
    assert [first for first, _ in got] == [0, 3]
    np.testing.assert_array_equal(np.concatenate([batch for _, batch in got]), whole[[0, 3, 6, 9]])
    assert SampledImages(base, 12).indices.tolist() == list(range(10))


def test_batches_read_from_files_are_c_contiguous(tmp_path):
    """A decoded image is [H, W, C] transposed to [C, H, W]: stacked as a view it stayed transposed, and
    onnxruntime copied every batch again (a quarter of a stem layer's capture time at 260 px)."""
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (9, 7, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    for preset in ("raw", "torchvision"):
        _, batch = next(fd.open_images(str(tmp_path), (3, 9, 7), preset=preset).batches(3))
        assert batch.flags["C_CONTIGUOUS"] and batch.dtype == np.float32


def test_a_truncated_npz_is_one_clear_error(tmp_path):
    """An .npz cut short is no zip any more: zipfile's BadZipFile became an internal error (issue 28)."""
    path = tmp_path / "images.npz"
    np.savez(path, images=np.zeros((2, 3, 8, 8), np.float32))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(fd.FdsubError, match="cannot read .*images.npz.*save the images again"):
        fd.open_images(str(path), (3, 8, 8))


def test_a_very_large_photograph_is_read_without_pillows_raw_warning(tmp_path, monkeypatch, recwarn):
    """Between Pillow's two limits (89 and 179 megapixels; here scaled down) an image is read like any other, and
    Pillow's DecompressionBombWarning does not reach the terminal; over the upper one it is skipped with the
    reason (issue 28)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 40)
    save_png(tmp_path / "big" / "a.png", solid(50, 50))  # over the warning limit, under twice it
    save_png(tmp_path / "big" / "b.png", solid(30, 30))
    save_png(tmp_path / "big" / "c.png", solid(60, 60))  # over twice the limit: refused
    images = fd.open_images(str(tmp_path / "big"), (3, 16, 16))
    assert len(everything(images)) == 2
    assert [len(s) for s in images.skipped] == [2] and "decompression bomb" in images.skipped[0][1]
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
