"""The passes over images on a Dask LocalCluster of 2 worker processes: bit for bit the one-process results (top-N,
fds statistics, Neuron Feature, fidelity, zoo), whatever the blocks; a worker killed mid-run, bad images inside a
block and Ctrl-C (the checkpoint `top` writes) behave as in one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import netgen  # tests/ is on sys.path (tests/conftest.py)
import numpy as np
import onnx
import pytest
from PIL import Image
from typer.testing import CliRunner

import fdsub_onnx as fd
from fdsub_onnx import FdsubError
from fdsub_onnx.cli.main import app
from fdsub_onnx.data.topn import load_top, top_arrays
from fdsub_onnx.evaluate.zoo import read_zoo, run_zoo
from fdsub_onnx.runtime import cluster
from fdsub_onnx.runtime.cluster import FAN_IN, Ordered, merge_ordered, plan_blocks

distributed = pytest.importorskip("distributed")
runner = CliRunner()


@pytest.fixture(scope="module")
def client():
    """One LocalCluster of 2 worker processes for the module (starting one costs seconds)."""
    with fd.connect("local:2") as c:
        yield c


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    """conv-relu-maxpool-conv-relu with a squeeze-and-excitation gate, on 3x16x16: (model, conv1, conv2, gate Mul)."""
    b = netgen.NetBuilder(height=16, width=16, seed=11)
    conv1 = b.conv("input", 6, 3, 1, (1, 1, 1, 1))
    x = b.maxpool(b.relu(conv1), 2, 2)
    gate = b.sigmoid(b.conv(b.global_avgpool(x), 6, 1))
    y = b._node("Mul", [x, gate], b.shapes[x])
    conv2 = b.conv(y, 5, 3)
    b.relu(conv2)
    path = tmp_path_factory.mktemp("net") / "net.onnx"
    onnx.save(b.build([b.last]), str(path))
    return fd.load_model(str(path)), conv1, conv2, y


def _images(count: int, seed: int = 0) -> fd.ArrayImages:
    return fd.ArrayImages(np.random.default_rng(seed).standard_normal((count, 3, 16, 16)).astype(np.float32))


def _recorder(calls: list):
    return lambda done, total: calls.append((done, total))


def assert_same_top(a, b):
    """Bit for bit: the top.npz arrays, and what top.json holds."""
    for key, value in top_arrays(a).items():
        assert value.dtype == top_arrays(b)[key].dtype and value.tobytes() == top_arrays(b)[key].tobytes(), key
    assert (a.sources, a.images_done, a.skipped) == (b.sources, b.images_done, b.skipped)


# ---- plans and sums (no cluster) -----------------------------------------------------------------------
@pytest.mark.parametrize("start, stop, batch, workers", [(0, 1000, 32, 2), (40, 1000, 8, 7), (0, 5, 32, 3),
                                                         (0, 100_000, 32, 2), (64, 64, 32, 2)])
def test_blocks_are_contiguous_whole_batches(start, stop, batch, workers):
    blocks = plan_blocks(start, stop, batch, workers)
    if start == stop:
        assert blocks == []
        return
    assert [lo for lo, _ in blocks] == [start, *[hi for _, hi in blocks[:-1]]] and blocks[-1][1] == stop
    assert all((lo - start) % batch == 0 and hi - lo <= cluster.MAX_BLOCK_BATCHES * batch for lo, hi in blocks)


def _add(total, entry):
    return total + entry


def test_ordered_sums_add_in_image_order_whatever_the_grouping():
    """Entries whose float sum depends on the order (1e16 swallows 1): any grouping folds them as one pass does,
    where summing the groups' own sums does not."""
    entries = [1e16, 1.0, 1.0, -1e16, 1.0, 3.0, 1e-3, 1e16, -1e16, 2.5]
    one = 0.0
    for e in entries:
        one = one + e
    naive = []
    for cuts in ([3, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [5], [2, 4]):
        groups = np.split(np.array(entries), cuts)
        parts = []
        for i, group in enumerate(groups):
            part = Ordered(_add, 0.0 if i == 0 else None)
            for e in group:
                part.add(float(e))
            parts.append(part)
        assert merge_ordered([merge_ordered(parts[:2]), *parts[2:]]).total == one
        naive.append(sum(float(sum(g)) for g in groups))
    assert any(v != one for v in naive), naive  # summing the groups' sums would differ: the test can fail
    with pytest.raises(FdsubError):
        merge_ordered([Ordered(_add, None), Ordered(_add, 0.0)])


# ---- equality with one process -------------------------------------------------------------------------
@pytest.mark.parametrize("batches", [1, 3, cluster.MAX_BLOCK_BATCHES])
def test_top_equals_one_process(client, net, monkeypatch, batches):
    """Blocks of 1 or 3 batches (a tree of several levels: 38 blocks > FAN_IN) or the default."""
    monkeypatch.setattr(cluster, "MAX_BLOCK_BATCHES", batches)
    model, conv1, conv2, _ = net
    images = _images(300)
    if batches == 1:
        assert len(plan_blocks(0, 300, 8, 2)) > FAN_IN  # two levels of merges
    for layer, options in ((conv2, {}), (conv1, {"per_image": 3, "neurons": "1,4-5"}), (conv2, {"shard": (1, 3)})):
        one = fd.capture_top(model, layer, images, top=9, batch_size=8, **options)
        seen: list = []
        two = fd.capture_top(model, layer, images, top=9, batch_size=8, client=client, progress=_recorder(seen),
                             **options)
        assert_same_top(one, two)
        assert seen[0][0] == 0 and seen[-1][0] == seen[-1][1] == one.images_done  # one bar over all workers


@pytest.mark.parametrize("weighting", ["gate", "activation"])
def test_fds_statistics_equal_one_process(client, net, monkeypatch, weighting):
    monkeypatch.setattr(cluster, "MAX_BLOCK_BATCHES", 2)
    model, _, conv2, gate = net
    images = _images(200, seed=1)
    one = fd.gather_statistics(model, conv2, images, top=7, batch_size=8, weighting=weighting)
    two = fd.gather_statistics(model, conv2, images, top=7, batch_size=8, client=client, weighting=weighting)
    assert set(one.stats) == set(two.stats) and len(one.stats) == 3  # maxpool, the gate's conv, conv2 (not pixels)
    for name in one.stats:
        assert one.stats[name].tobytes() == two.stats[name].tobytes(), name
        assert_same_top(one.tops[name], two.tops[name])
    assert one.gates[gate].tobytes() == two.gates[gate].tobytes()
    decoded = [fd.decode(model, conv2, mode="fds", substitution=s) for s in (one, two)]
    assert decoded[0].filters.tobytes() == decoded[1].filters.tobytes()


def test_nf_and_fidelity_equal_one_process(client, net):
    model, conv1, _, _ = net
    images, held = _images(120, seed=2), _images(50, seed=3)
    top = fd.capture_top(model, conv1, images, top=6)
    one, two = fd.neuron_feature(model, top, images), fd.neuron_feature(model, top, images, client=client)
    assert one.filters.tobytes() == two.filters.tobytes() and np.array_equal(one.neurons, two.neurons)
    decodings = {"nf": one, "weights": fd.decode(model, conv1)}
    assert fd.fidelity(model, decodings, held, top=5) == fd.fidelity(model, decodings, held, top=5, client=client)


@pytest.mark.parametrize("rule", ["local", "deconvnet"])
def test_local_and_deconvnet_equal_one_process(client, net, rule):
    """With a client (the capture of the instances on the cluster) local/deconvnet give the one-process filters, bit
    for bit, border instances (averaged per pixel) included; and conv1's filters are its weights (property 8)."""
    model, conv1, conv2, _ = net
    images = _images(60, seed=4)
    for layer in (conv1, conv2):
        one = fd.decode_instances(model, layer, images, top=5, rule=rule)
        two = fd.decode_instances(model, layer, images, top=5, rule=rule, client=client)
        assert one.filters.tobytes() == two.filters.tobytes() and one.bias.tobytes() == two.bias.tobytes()
        assert_same_top(one.instances, two.instances)
    top, (ry, rx) = one.instances, one.receptive_field
    corners = one.geometry.corner(top.position)
    assert ((corners < 0) | (corners + (ry, rx) > (16, 16))).any()  # some of conv2's instances are at the border
    first = fd.decode_instances(model, conv1, images, top=5, rule=rule, client=client)
    np.testing.assert_allclose(first.filters, fd.decode(model, conv1, position="interior").filters, rtol=1e-5,
                               atol=1e-6)


def _no_seconds(value):
    if isinstance(value, dict):
        return {k: _no_seconds(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [_no_seconds(v) for v in value]
    return value


def test_zoo_equals_one_process(client, net, tmp_path):
    """One task per model, results in the zoo's order; a model that cannot be checked is an error entry."""
    zoo = tmp_path / "zoo.toml"
    zoo.write_text(f'[defaults]\nimages = "builtin:blobs:4"\nneurons_per_layer = 2\n'
                   f'[[models]]\nname = "net"\npath = "{net[0].path}"\n'
                   f'[[models]]\npath = "missing.onnx"\n'
                   f'[[models]]\nname = "again"\npath = "{net[0].path}"\nseed = 3\n')
    models = read_zoo(zoo)
    heard = []
    one, two = run_zoo(models), run_zoo(models, progress=heard.append, client=client)
    assert [_no_seconds(r.to_json()) for r in one] == [_no_seconds(r.to_json()) for r in two]
    assert [r.status for r in two][1] == "error" and sorted(heard) == sorted(
        f"{r.model.name}: {r.status}" for r in one)


# ---- faults --------------------------------------------------------------------------------------------
def test_a_worker_killed_mid_run_changes_nothing(client, net, monkeypatch):
    """The first finished block kills a worker (the nanny restarts it); the scheduler reruns its blocks."""
    monkeypatch.setattr(cluster, "MAX_BLOCK_BATCHES", 1)
    model, _, conv2, _ = net
    images = fd.open_images("builtin:glyphs:600", (3, 16, 16))
    one = fd.capture_top(model, conv2, images, top=8, batch_size=4)
    before = client.run(os.getpid)
    killed = []

    def kill_one(done, total):
        if done and not killed:
            victim = sorted(client.scheduler_info()["workers"])[0]
            killed.append(client.run(os._exit, 1, workers=[victim], on_error="return"))

    two = fd.capture_top(model, conv2, images, top=8, batch_size=4, client=client, progress=kill_one)
    assert killed
    assert_same_top(one, two)
    client.wait_for_workers(2, timeout=60)
    assert set(client.run(os.getpid).values()) != set(before.values())  # a worker really died


def test_bad_images_inside_a_block_are_skipped_and_listed(client, net, tmp_path):
    model, conv1, _, _ = net
    rng = np.random.default_rng(4)
    for i in range(40):
        name = tmp_path / f"img{i:03d}.png"
        if i in (5, 17, 18):
            name.write_bytes(b"not a png at all")
        else:
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(name)
    images = fd.open_images(str(tmp_path), (3, 16, 16))
    one = fd.capture_top(model, conv1, images, top=5, batch_size=4)
    two = fd.capture_top(model, conv1, images, top=5, batch_size=4, client=client)
    assert_same_top(one, two)
    assert [os.path.basename(s[0]) for s in two.skipped] == ["img005.png", "img017.png", "img018.png"]


def test_an_image_failing_in_a_block_stops_the_run_with_its_own_error(client, net, tmp_path):
    """A truncated JPEG passes the header check but not decoding: the same one-line error as one process."""
    model, conv1, _, _ = net
    rng = np.random.default_rng(5)
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / f"img{i:02d}.jpg")
    whole = (tmp_path / "img13.jpg").read_bytes()
    (tmp_path / "img13.jpg").write_bytes(whole[: len(whole) * 3 // 4])  # the headers, part of the scan
    images = fd.open_images(str(tmp_path), (3, 16, 16))
    assert len(images) == 24  # the header check lets it through
    with pytest.raises(FdsubError) as here:
        fd.capture_top(model, conv1, images, top=5, batch_size=4)
    with pytest.raises(FdsubError) as there:
        fd.capture_top(model, conv1, images, top=5, batch_size=4, client=client)
    assert str(here.value) == str(there.value) and "img13.jpg" in str(there.value)


def test_ctrl_c_leaves_the_checkpoint_top_writes(client, net, tmp_path, monkeypatch):
    """An interrupt after a few blocks: the checkpoint holds the blocks finished without a gap; a rerun (here or on
    the cluster) resumes from it to the one-process result."""
    monkeypatch.setattr(cluster, "MAX_BLOCK_BATCHES", 1)
    model, _, conv2, _ = net
    images = _images(400, seed=6)
    one = fd.capture_top(model, conv2, images, top=8, batch_size=8)
    checkpoint = tmp_path / "top.ckpt.npz"

    def interrupt(done, total):
        if done >= 80:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fd.capture_top(model, conv2, images, top=8, batch_size=8, client=client, checkpoint=checkpoint,
                       progress=interrupt)
    assert checkpoint.exists()
    with np.load(checkpoint) as saved:
        done = json.loads(str(saved["meta"]))["sidecar"]["images_done"]
    assert 0 < done < 400 and done % 8 == 0
    counted = []
    resumed = fd.capture_top(model, conv2, images, top=8, batch_size=8, checkpoint=checkpoint,
                             progress=lambda d, t: counted.append(d))
    assert counted[0] == done
    assert_same_top(one, resumed)
    again = fd.capture_top(model, conv2, images, top=8, batch_size=8, client=client, checkpoint=checkpoint)
    assert_same_top(one, again)


@pytest.mark.skipif(os.environ.get("FDSUB_LONG_TESTS") != "1", reason="up to a minute: FDSUB_LONG_TESTS=1")
def test_ctrl_c_in_the_terminal_stops_the_client_not_the_local_workers(net, tmp_path):
    """A real SIGINT to the whole process group (as a terminal's Ctrl-C) once the checkpoint exists: exit 130 with one
    line, the checkpoint kept (the workers lived to hand back their blocks), and a rerun resumes from it."""
    model, _, conv2, _ = net
    out, spec = tmp_path / "out", str(tmp_path / "images.npy")
    np.save(spec, _images(30000, seed=8).array)
    checkpoint = tmp_path / ".out.top-checkpoint.npz"
    command = [sys.executable, "-m", "fdsub_onnx.cli", "top", model.path, "-l", conv2, "-i", spec, "--top", "5",
               "--batch-size", "8", "--cluster", "local:2", "-o", str(out)]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    for _ in range(600):
        if checkpoint.exists() or run.poll() is not None:
            break
        time.sleep(0.1)
    os.killpg(run.pid, signal.SIGINT)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130 and err.strip().splitlines()[-1] == "error: interrupted", err[-500:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err  # no worker died of it
    with np.load(checkpoint) as saved:
        done = json.loads(str(saved["meta"]))["sidecar"]["images_done"]
    assert 0 < done < 30000
    images = fd.open_images(spec, (3, 16, 16))
    resumed = fd.capture_top(model, conv2, images, top=5, batch_size=8, checkpoint=checkpoint)
    assert_same_top(fd.capture_top(model, conv2, images, top=5, batch_size=8), resumed)


# ---- command line and packaging -------------------------------------------------------------------------
def test_cli_top_on_a_cluster_writes_the_same_files(net, tmp_path):
    model, _, conv2, _ = net
    array = tmp_path / "images.npy"
    np.save(array, _images(64, seed=7).array)
    for name, extra in (("here", []), ("there", ["--cluster", "local:1"])):
        result = runner.invoke(app, ["top", model.path, "-l", conv2, "-i", str(array), "--top", "5",
                                     "-o", str(tmp_path / name), *extra])
        assert result.exit_code == 0, result.output
    assert_same_top(load_top(tmp_path / "here"), load_top(tmp_path / "there"))
    assert not list(tmp_path.glob(".*checkpoint*"))


@pytest.mark.parametrize("command", ["top", "decode", "nf", "fidelity", "report", "zoo"])
def test_every_command_with_a_pass_over_images_takes_cluster(command):
    result = runner.invoke(app, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0 and "--cluster" in result.output


@pytest.mark.parametrize("args, message", [
    (["top", "-l", "L", "-i", "builtin:glyphs:4", "--cluster", "local:0"], "N in local:N must be a positive"),
    (["top", "-l", "L", "-i", "builtin:glyphs:4", "--cluster", "spark://x"], "is not a cluster: give local:N"),
    (["decode", "-l", "L", "--cluster", "local:2"], "--cluster has no use in weights mode"),
], ids=["zero", "scheme", "weights"])
def test_cli_bad_cluster_is_one_line(net, args, message):
    model, _, conv2, _ = net
    args = [a if a != "L" else conv2 for a in args]
    result = runner.invoke(app, [args[0], model.path, *args[1:]])
    assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1


def test_cli_unreachable_scheduler_is_one_line(net, monkeypatch):
    monkeypatch.setattr(cluster, "CONNECT_SECONDS", 1)
    model, _, conv2, _ = net
    result = runner.invoke(app, ["top", model.path, "-l", conv2, "-i", "builtin:glyphs:4",
                                 "--cluster", "tcp://127.0.0.1:9"])
    assert result.exit_code == 2 and "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in result.output


def test_one_process_imports_no_dask(net):
    """The embedded default: capture, statistics and NF without a cluster never import Dask."""
    model, conv1, conv2, _ = net
    code = (f"import sys, fdsub_onnx as fd\nm = fd.load_model({model.path!r})\n"
            f"x = fd.open_images('builtin:blobs:8', (3, 16, 16))\n"
            f"t = fd.capture_top(m, {conv1!r}, x, top=2)\nfd.neuron_feature(m, t, x)\n"
            f"fd.decode(m, {conv2!r}, mode='fds', images=x, top=2)\n"
            "assert not {'dask', 'distributed'} & set(sys.modules), sorted(sys.modules)\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_dask_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # `import distributed` now raises ImportError
    with pytest.raises(FdsubError, match=r"pip install 'fdsub-onnx\[dask\]'"):
        fd.connect("local:2")
