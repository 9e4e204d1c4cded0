"""Property 9 of docs/method.md: a pass over images keeps state that does not grow with the number of images.

Each pass (top-N capture, both fds statistics passes, local/deconvnet instance passes, the Neuron Feature,
fidelity scoring) runs over 64 and then 640 generated images; the NumPy memory it allocates at its peak
(tracemalloc: NumPy reports its buffers to it) must be the same within 15%. The same for the client of a Dask
LocalCluster of 2, which merges the workers' blocks as they finish. A test that grows state with the images (a
list of every batch's activations) fails here: ``test_the_measure_sees_state_that_grows`` checks the measure.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from checks import load_proto
from netgen import NetBuilder

import fdsub_onnx as fd
from fdsub_onnx.modes.fds import gather_statistics
from fdsub_onnx.runtime import cluster

FEW, MANY = 64, 640
SLACK, NOISE = 1.15, 1 << 20  # peaks within 15% and 1 MiB (a cluster client's bookkeeping of its blocks)


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    """conv -> relu -> maxpool -> conv -> relu -> conv on 24x24 images."""
    b = NetBuilder(height=24, width=24, seed=5)
    c1 = b.conv("input", 6, 3, 1, (1, 1, 1, 1))
    c2 = b.conv(b.maxpool(b.relu(c1), 2, 2), 8, 3, 1, (1, 1, 1, 1))
    c3 = b.conv(b.relu(c2), 8, 3)
    model = load_proto(b.build([c3]), tmp_path_factory.mktemp("streaming"))
    return model, c3


def _images(count: int):
    return fd.open_images(f"builtin:blobs:{count}", (3, 24, 24))


def peak(run) -> int:
    """Bytes NumPy (and Python) allocated at the peak of ``run()``, above what was there before."""
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def assert_flat(run_for, per_image: int = 0, counts: tuple[int, int] = (FEW, MANY)) -> None:
    """``per_image``: bytes a pass may keep per image by design (fidelity: each image's maxima)."""
    few, many = peak(lambda: run_for(counts[0])), peak(lambda: run_for(counts[1]))
    allowed = SLACK * few + NOISE + per_image * (counts[1] - counts[0])
    assert many <= allowed, (f"{counts[0]} images: {few / 2**20:.2f} MiB at the peak, {counts[1]}: "
                             f"{many / 2**20:.2f} MiB")


PASSES = {
    "capture": lambda model, layer, n: fd.capture_top(model, layer, _images(n), top=20, batch_size=16),
    "fds statistics": lambda model, layer, n: gather_statistics(model, [layer], _images(n), top=20, batch_size=16),
    "local": lambda model, layer, n: fd.decode(model, layer, mode="local", images=_images(n), top=20),
    "deconvnet": lambda model, layer, n: fd.decode(model, layer, mode="deconvnet", images=_images(n), top=20),
    "nf": lambda model, layer, n: fd.neuron_feature(model, fd.capture_top(model, layer, _images(n), top=20),
                                                    _images(n)),
}


@pytest.mark.parametrize("name", PASSES)
def test_a_pass_keeps_the_same_state_for_ten_times_the_images(net, name):
    model, layer = net
    assert_flat(lambda n: PASSES[name](model, layer, n))


def test_fidelity_scoring_keeps_only_each_images_maxima(net):
    """The two-choice score compares every pair of images, exactly: scoring keeps each image's true and predicted
    maximum per neuron (8 bytes each, a few copies while ranked), and nothing else that grows. From 320 images on,
    the pairs are ranked in tiles of a fixed size (256 x 256)."""
    model, layer = net
    decoded = {"weights": fd.decode(model, layer, position="interior")}
    neurons = len(decoded["weights"].neurons)
    assert_flat(lambda n: fd.fidelity(model, decoded, _images(n), top=20), per_image=4 * 8 * neurons * 2,
                counts=(320, 3200))


def test_the_measure_sees_state_that_grows(net):
    """The check above can fail: a pass that keeps every batch's activations is caught."""
    model, layer = net
    forward = fd.capture_top  # any pass; what matters is the kept list below
    kept = []  # 640 images of 3x24x24 float32: 4.4 MiB, over the 15% and the 1 MiB allowed

    def hoarding(n):
        kept.clear()
        for _, batch in _images(n).batches(16):
            kept.append(np.array(batch))
        forward(model, layer, _images(n), top=20, batch_size=16)

    with pytest.raises(AssertionError, match="at the peak"):
        assert_flat(hoarding)


def test_the_estimates_do_not_grow_with_the_images(net):
    """The cost plan's peak is a batch's, not the image count's (its time does grow)."""
    model, layer = net
    for estimate in (lambda n: fd.estimate_decode(model, layer, None, "fds", n),
                     lambda n: fd.estimate_decode(model, layer, None, "local", n, top=20),
                     lambda n: fd.estimate_top(model, layer, None, n),
                     lambda n: fd.estimate_compare(model, [layer], None, n, top=20)):
        few, many = estimate(1_000), estimate(100_000)
        assert few.peak_bytes == many.peak_bytes and many.seconds > few.seconds


def test_the_cluster_client_keeps_the_same_state_for_ten_times_the_images(net, monkeypatch):
    """On a LocalCluster of 2 the client holds the merges of finished blocks, not every block: its peak is flat."""
    pytest.importorskip("distributed")
    from distributed import Client, LocalCluster

    monkeypatch.setattr(cluster, "MAX_BLOCK_BATCHES", 2)  # many blocks
    model, layer = net
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as local, \
            Client(local) as client:
        for run in (lambda n: fd.capture_top(model, layer, _images(n), top=20, batch_size=16, client=client),
                    lambda n: gather_statistics(model, [layer], _images(n), top=20, batch_size=16, client=client)):
            run(FEW)  # the first call sends the model to the workers
            assert_flat(run)
