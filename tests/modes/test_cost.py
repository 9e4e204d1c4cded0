"""The memory budget and the cost plan (docs/plan.md): the budget's default and scope, batches sized to it, the
estimates against what the passes allocate, and the refusal before any work (library and command line)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from checks import load_proto
from clirun import assert_one_error_line, invoke
from netgen import NetBuilder

import fdsub_onnx as fd
from fdsub_onnx import defaults
from fdsub_onnx.modes.fds import gather_statistics, pass_bytes
from fdsub_onnx.runtime.session import PASS_SHARE, fitting_batch

GiB, MiB = 1 << 30, 1 << 20


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    """conv -> relu -> maxpool -> conv -> relu -> conv -> relu -> conv on 64x64 images."""
    b = NetBuilder(height=64, width=64, seed=5)
    c1 = b.conv("input", 16, 3, 1, (1, 1, 1, 1))
    c2 = b.conv(b.maxpool(b.relu(c1), 2, 2), 32, 3, 1, (1, 1, 1, 1))
    c3 = b.conv(b.relu(c2), 32, 3, 1, (1, 1, 1, 1))
    c4 = b.conv(b.relu(c3), 16, 3)
    return load_proto(b.build([c4]), tmp_path_factory.mktemp("cost")), c4


def test_the_budget_is_the_smaller_of_4_gib_and_60_percent_of_the_memory_available(monkeypatch):
    monkeypatch.setattr(defaults, "available_memory", lambda: 20 * GiB)
    assert fd.memory_budget() == 4 * GiB
    monkeypatch.setattr(defaults, "available_memory", lambda: 5 * GiB)
    assert fd.memory_budget() == int(0.6 * 5 * GiB)
    with fd.budget("6G"):
        assert fd.memory_budget() == 6 * GiB
        with fd.budget(None):  # None keeps the default
            assert fd.memory_budget() == int(0.6 * 5 * GiB)
    assert fd.memory_budget() == int(0.6 * 5 * GiB)  # only inside its block


@pytest.mark.parametrize(("text", "nbytes"), [("4G", 4 * GiB), ("512M", 512 * MiB), ("2.5GiB", int(2.5 * GiB)),
                                              ("1.5 gb", int(1.5 * GiB)), (str(3 * MiB), 3 * MiB), ("1T", 1 << 40)])
def test_sizes_read_as_powers_of_1024(text, nbytes):
    assert fd.parse_bytes(text) == nbytes


@pytest.mark.parametrize("text", ["", "4x", "-1G", "G", "nan", "1e9", "0.5M", "4 G B", "inf",
                                  "999999999999999999999999G"])
def test_sizes_that_are_not_sizes_are_refused(text):
    with pytest.raises(fd.FdsubError, match="--memory-budget must be"):
        fd.parse_bytes(text)


def test_a_budget_over_the_machines_memory_is_refused(monkeypatch):
    """A budget the machine cannot hold would let a command be killed by the system instead of refused."""
    monkeypatch.setattr(defaults, "_meminfo", lambda field, fallback=None: 16 * GiB)
    with pytest.raises(fd.FdsubError, match=r"^--memory-budget 10,240.0 GiB is more than this machine's 16.0 GiB of "
                                            r"memory; give at most 16G$"):
        with fd.budget("10T"):
            pass
    with fd.budget("16G"):
        assert fd.memory_budget() == 16 * GiB


def test_a_pass_takes_the_largest_batch_its_budget_holds():
    with fd.budget("100M"):
        room = PASS_SHARE * 100 * MiB
        assert fitting_batch(room / 10, 32, "x", "y") == 10
        assert fitting_batch(room / 100, 32, "x", "y") == 32  # never more than asked
        assert fitting_batch(room, 32, "x", "y") == 1
        with pytest.raises(fd.FdsubError, match=r"^the scan needs about .* per image, over the 0.07 GiB a pass over "
                                                r"images may take \(75% of the memory budget of 100 MiB "
                                                r"\(--memory-budget\)\); fewer$"):
            fitting_batch(room * 1.01, 32, "the scan", "fewer")


def test_the_fds_estimate_bounds_what_its_passes_allocate(net):
    """Each pass's estimate (a batch of its per-image working set) is at least what NumPy allocates at its peak, and
    not uselessly more (onnxruntime's own buffers, which tracemalloc does not see, are in the estimate too)."""
    model, last = net
    images = fd.open_images("builtin:blobs:96", (3, 64, 64))
    estimate = max(pass_bytes(model, [last])) * 32
    tracemalloc.start()
    try:
        gather_statistics(model, [last], images, top=20)
        allocated = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert allocated <= estimate <= 2.5 * allocated, (allocated / MiB, estimate / MiB)


def test_a_smaller_budget_takes_smaller_batches_and_the_same_statistics(net):
    model, last = net
    images = fd.open_images("builtin:blobs:40", (3, 64, 64))
    one = gather_statistics(model, [last], images, top=10)
    with fd.budget(int(4 * max(pass_bytes(model, [last])) / PASS_SHARE)):  # batches of 4
        two = gather_statistics(model, [last], images, top=10)
    assert one.stats.keys() == two.stats.keys()
    for name in one.stats:
        assert abs(one.stats[name] - two.stats[name]).max() <= 1e-12


def test_a_plan_over_the_budget_is_refused_with_its_knobs(net):
    model, last = net
    plan = fd.estimate_decode(model, last, None, "local", 1000, top=100)
    assert plan.fits and plan.peak_bytes > plan.base_bytes and plan.seconds > 0
    with fd.budget("64M"):
        plan = fd.estimate_decode(model, last, None, "local", 1000, top=100)
        assert not plan.fits
        with pytest.raises(fd.FdsubError, match=r"^decode --mode local needs about .* at its peak \(.*\), over the "
                                                r"memory budget of 64 MiB \(--memory-budget\); fewer$"):
            plan.require("fewer")


def test_a_composition_is_timed_by_its_products_rest_and_banks(net):
    """A bottom-up decode's time: its GEMMs (kn2row's, or the spectral route's charge) at BLAS's rate, its other
    FLOPs (depthwise taps) at NumPy's, over the cores, and the banks it makes at ``BANK_SECONDS`` a byte. All its
    FLOPs at NumPy's rate made VGG19's interior decode of conv5_4 an 81 s plan for 7-10 s of work."""
    from fdsub_onnx.compose.backend import usable_cores
    from fdsub_onnx.compose.walker import walk
    from fdsub_onnx.modes import cost
    from fdsub_onnx.modes.plan import Costs

    model, last = net
    target = fd.find_layer(model, last).output[0]
    costs = Costs("float32")
    for _ in walk(model, costs, targets=[target], compose=True):
        pass
    assert 0.99 * costs.flops < costs.product_flops < costs.flops and costs.bank_bytes > 0  # the max pool's window:
    expected = ((costs.product_flops / cost.PRODUCT_RATE + (costs.flops - costs.product_flops) / cost.COMPOSE_RATE)
                / usable_cores() + costs.bank_bytes * cost.BANK_SECONDS)  # depthwise taps, not a GEMM
    plan = fd.estimate_decode(model, last, None, "weights", route="bottom-up")
    assert plan.stages[0].seconds == pytest.approx(expected)
    assert plan.stages[0].seconds < 0.5 * costs.flops / (cost.COMPOSE_RATE * usable_cores())
    stage = cost.compose_stage(model, [target], None, "float32", "weights")[0]
    assert stage.seconds == pytest.approx(expected)



def test_an_adjoint_decode_times_its_convolutions_gradients_apart(net):
    """An adjoint decode's time: each dense convolution's gradient (a GEMM over its taps and their strided adds) at
    ``CONV_GRADIENT_RATE``, every other value at ``GRADIENT_VALUE_RATE``. All at NumPy's rate planned VGG19's conv5_4,
    32 neurons, at 78 s for 13 s of work, and EfficientNet-B0's last 1x1, 256 neurons, at 11.8 s for 25.9 s."""
    from fdsub_onnx.compose.backend import usable_cores
    from fdsub_onnx.graph.model import ancestors
    from fdsub_onnx.modes import cost
    from fdsub_onnx.modes.decode import plan_decode
    from fdsub_onnx.modes.plan import forward_flops

    model, last = net
    target = fd.find_layer(model, last).output[0]
    plan = plan_decode(model, [target], neurons=list(range(4)), route="adjoint")[target]
    convs = 4 * sum(forward_flops(model, n) for n in ancestors(model, [target]) if n.op_type == "Conv")
    assert plan.route == "adjoint" and plan.conv_flops == pytest.approx(convs) and convs < plan.flops
    expected = ((plan.flops - convs) / cost.GRADIENT_VALUE_RATE + convs / cost.CONV_GRADIENT_RATE) / usable_cores()
    stage = fd.estimate_decode(model, last, "0-3", "weights", route="adjoint").stages[0]
    assert "adjoint" in stage.what and stage.seconds == pytest.approx(expected)


def test_local_passes_are_timed_by_their_convolutions_gradients_and_values(net):
    """``local`` mode's backward passes, one per instance over its cone, as many at once as cores, are timed by
    their dense convolutions' gradients and their other values at their own rates (``LOCAL_CONV_RATE``,
    ``LOCAL_VALUE_RATE``). All at NumPy's rate planned VGG19's conv5_4, 32 instances, at 156 s for 20 s of work; the
    adjoint route's rates EfficientNet-Lite2's conv_head, 256 instances, at 67 s for 27.5."""
    from fdsub_onnx.compose.backend import get_backend
    from fdsub_onnx.graph.model import ancestors
    from fdsub_onnx.modes import cost
    from fdsub_onnx.modes.plan import gradient_flops

    model, last = net
    target = fd.find_layer(model, last).output[0]
    products, convs, rest = gradient_flops(model, ancestors(model, [target]))
    assert convs > 0
    one = products / cost.PRODUCT_RATE + convs / cost.LOCAL_CONV_RATE + rest / cost.LOCAL_VALUE_RATE
    stage = cost.instance_stage(model, target, 40)
    workers = get_backend("numpy").workers
    assert stage.seconds == pytest.approx(40 * one * cost._cone_share(model, target) / max(workers, 1))


def test_a_forward_pass_is_timed_by_its_products_grouped_products_and_the_bytes_it_moves(tmp_path):
    """onnxruntime's forward (``plan.forward_work``): dense convolutions at the GEMM rate, grouped ones at their
    own, depthwise ones and activations by the bytes they read and write. All but matrix products at one FLOP rate
    had planned VGG19's capture at 4.7x its time and ResNet50's at 3x (benchmarks/README.md)."""
    from fdsub_onnx.graph.model import ancestors
    from fdsub_onnx.modes import cost
    from fdsub_onnx.modes.plan import forward_work

    b = NetBuilder(in_channels=8, height=16, width=16, seed=1)
    dense = b.conv("input", 16, 3, 1, (1, 1, 1, 1))
    grouped = b.conv(dense, 16, 3, 1, (1, 1, 1, 1), groups=4)
    depthwise = b.relu(b.conv(grouped, 16, 3, 1, (1, 1, 1, 1), groups=16))
    model = load_proto(b.build([depthwise]), tmp_path)
    products, grouped_flops, moved = forward_work(model, ancestors(model, [depthwise]))
    pixels = 16 * 16 * 16
    assert products == 2 * pixels * 8 * 9 and grouped_flops == 2 * pixels * 4 * 9
    assert moved == 4 * (8 * 256 + pixels * 7)  # the input, 3 convolutions' inputs and outputs, the relu's
    seconds = cost.forward_seconds(model, [depthwise], 10)
    per_image = (products / cost.FORWARD_PRODUCT_RATE + grouped_flops / cost.FORWARD_SLOW_PRODUCT_RATE
                 + moved / cost.FORWARD_BYTE_RATE)
    assert seconds == pytest.approx(10 * (per_image / cost.usable_cores() + cost.IMAGE_SECONDS
                                          + pixels * cost.FETCH_SECONDS))


def test_a_transposed_convolution_is_a_slow_product_and_a_depthwise_one_moves_bytes(tmp_path):
    """onnxruntime's ConvTranspose runs a GEMM, then scatters its columns: ~60 GFLOP/s a core where a convolution
    runs ~110. Timed by its tensors alone, as it was, a decoder of two 4x4 stride-2 layers was planned at 0.1x."""
    from onnx import TensorProto, helper, numpy_helper

    from fdsub_onnx.graph.model import ancestors
    from fdsub_onnx.modes.plan import forward_work

    nodes = [helper.make_node("ConvTranspose", ["input", "w"], ["up"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("ConvTranspose", ["up", "dw"], ["out"], group=4, pads=[1, 1, 1, 1])]
    constants = [numpy_helper.from_array(np.ones((8, 4, 4, 4), np.float32), "w"),
                 numpy_helper.from_array(np.ones((4, 1, 3, 3), np.float32), "dw")]
    graph = helper.make_graph(nodes, "decoder", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                               [1, 8, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 16, 16])], constants)
    model = load_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path)
    products, slow, moved = forward_work(model, ancestors(model, ["out"]))
    assert products == 0 and slow == 2 * (8 * 8 * 8) * (4 * 4 * 4)  # every input value times its 4 x 4 x 4 taps
    assert moved == 4 * (8 * 64 + 4 * 256 * 3)


def test_the_fds_passes_and_a_capture_are_timed_with_the_values_they_fetch(net):
    """Beside onnxruntime's forward, a pass copies out and reads every value it fetches (``FETCH_SECONDS``): a capture
    its layer, the fds first pass every substituted node's output, the second their inputs and gate chains (and it
    computes the gates)."""
    from fdsub_onnx.graph.model import ancestors
    from fdsub_onnx.modes import cost
    from fdsub_onnx.modes.fds import fetched_tensors, gate_values
    from fdsub_onnx.modes.plan import forward_work
    from fdsub_onnx.runtime.session import tensor_values

    model, last = net
    target = fd.find_layer(model, last).output[0]
    products, grouped, moved = forward_work(model, ancestors(model, [target]))
    forward = (products / cost.FORWARD_PRODUCT_RATE + grouped / cost.FORWARD_SLOW_PRODUCT_RATE
               + moved / cost.FORWARD_BYTE_RATE)
    assert cost.capture_stage(model, target, 50).seconds == pytest.approx(50 * (
        forward / cost.usable_cores() + cost.IMAGE_SECONDS + tensor_values(model, [target]) * cost.FETCH_SECONDS))
    first_fetched, second_fetched = fetched_tensors(model, [target])
    assert tensor_values(model, [target]) < tensor_values(model, first_fetched) < tensor_values(model, second_fetched)
    first, second = cost.fds_stages(model, [target], 50)[:2]
    assert first.seconds == pytest.approx(cost.forward_seconds(model, first_fetched, 50))
    assert second.seconds == pytest.approx(cost.forward_seconds(model, second_fetched, 50)
                                           + 50 * gate_values(model, [target]) * cost.GATE_SECONDS)


def test_a_token_major_product_is_counted_per_image(tmp_path):
    """Tokens first, the batch second ([L, N, E], torchvision's attention): a product's FLOPs are its output's values
    per image times its depth, not the values after the first axis (ViT-B/16's were counted 197x short), in the
    forward's plan and a backward pass's."""
    from onnx import TensorProto, helper, numpy_helper

    from fdsub_onnx.graph.model import ancestors
    from fdsub_onnx.modes.plan import forward_work, gradient_flops

    nodes = [helper.make_node("Reshape", ["input", "shape"], ["flat"]),
             helper.make_node("Transpose", ["flat"], ["tokens"], perm=[2, 0, 1]),  # [256, 1, 3]
             helper.make_node("MatMul", ["tokens", "w"], ["out"])]  # [256, 1, 8]
    constants = [numpy_helper.from_array(np.array([1, 3, 256], np.int64), "shape"),
                 numpy_helper.from_array(np.ones((3, 8), np.float32), "w")]
    graph = helper.make_graph(nodes, "tokens", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                              [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [256, 1, 8])], constants)
    model = load_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path)
    products, grouped, moved = forward_work(model, ancestors(model, ["out"]))
    assert products == 2 * 256 * 8 * 3 and grouped == 0
    assert gradient_flops(model, ancestors(model, ["out"]))[0] == products  # a backward pass's plan too
    assert moved == 4 * (768 * 5 + 256 * 8)  # the reshape's and transpose's ins and outs, the product's


def test_plan_prints_the_stages_and_writes_nothing(net, tmp_path):
    model, last = net
    out = tmp_path / "out"
    for command in (["decode", model.path, "--layer", last, "--images", "builtin:blobs:20", "--top", 5],
                    ["decode", model.path, "--layer", last],
                    ["top", model.path, "--layer", last, "--images", "builtin:blobs:20"],
                    ["nf", model.path, "--layer", last, "--images", "builtin:blobs:20"],
                    ["fidelity", model.path, "--layer", last, "--images", "builtin:blobs:20", "--holdout",
                     "builtin:gratings:20", "--top", 5],
                    ["report", model.path, "--images", "builtin:blobs:20", "--top", 5],
                    ["check", model.path, "--junit", out / "junit.xml"]):
        result = invoke(*command, "--plan", *(["--out", out] if command[0] != "check" else []))
        assert result.exit_code == 0, result.output
        lines = result.stdout.splitlines()
        assert "at the peak" in lines[0] and "fits in the memory budget" in lines[0], lines
        assert any("base (the process and the model)" in line for line in lines), lines
        assert not out.exists()


def test_fidelity_plans_every_neuron_it_scores(net, tmp_path):
    """Without --neurons fidelity scores every neuron of the layer; its plan counted the report's default 16."""
    model, _ = net
    wide = next(layer for layer in fd.inspect_model(model).layers if layer.channels > 16)
    last, channels = wide.name, wide.channels
    result = invoke("fidelity", model.path, "--layer", last, "--images", "builtin:blobs:20", "--holdout",
                    "builtin:gratings:20", "--top", 5, "--modes", "weights,local", "--plan", "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    assert f"local passes of {last!r}: {channels * 5} instances" in result.stdout, result.stdout


def test_a_report_sample_over_the_budget_loses_its_deepest_layers_and_says_so(net, tmp_path):
    """The default sample (layers not named) is cut from the deepest until its plan fits, with a note; named layers
    are planned as named (and refused over the budget)."""
    model, _ = net
    whole = fd.estimate_compare(model, images=20, top=5)
    first = fd.estimate_compare(model, [fd.choose_report(model).layers[0].name], "0-15", 20, top=5)
    assert first.peak_bytes < whole.peak_bytes
    with fd.budget(int((first.peak_bytes + whole.peak_bytes) / 2)):
        cut = fd.estimate_compare(model, images=20, top=5)
        assert cut.fits and cut.peak_bytes < whole.peak_bytes
        assert any(n.startswith("left out ") and "does not fit the memory budget" in n for n in cut.notes), cut.notes
        named = [layer.name for layer in fd.choose_report(model).layers]
        assert not fd.estimate_compare(model, named, images=20, top=5).fits
        notes = []  # the run leaves out what the plan left out
        page = fd.report(model, "builtin:blobs:20", tmp_path / "r", top=5, note=notes.append).read_text("utf-8")
        assert [n for n in notes if n.startswith("left out ")] == [n for n in cut.notes if n.startswith("left out ")]
        assert page.count('<section class="layer"') == len(named) - len(cut.notes[-1].split(":")[0].split(", "))


def test_memory_budget_refuses_in_one_line_and_writes_nothing(net, tmp_path):
    model, last = net
    out = tmp_path / "out"
    result = invoke("decode", model.path, "--layer", last, "--images", "builtin:blobs:20", "--mode", "local",
                    "--memory-budget", "8M", "--out", out)
    line = assert_one_error_line(result)
    assert "over the memory budget of 8 MiB (--memory-budget)" in line and "--neurons" in line, line
    assert not out.exists()
    assert "--memory-budget must be" in assert_one_error_line(
        invoke("top", model.path, "--layer", last, "--images", "builtin:blobs:4", "--memory-budget", "lots"))


def test_zoo_plans_each_model_and_one_that_cannot_be_checked(net, tmp_path):
    model, _ = net
    zoo = tmp_path / "zoo.toml"
    zoo.write_text(f'[defaults]\nimages = "builtin:blobs:4"\n[[models]]\nname = "net"\npath = "{model.path}"\n'
                   f'[[models]]\npath = "missing.onnx"\n')
    result = invoke("zoo", zoo, "--plan")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("zoo: about ") and any("check of net:" in line for line in lines), lines
    assert any("check of missing: cannot be checked (model file not found" in line for line in lines), lines


def test_the_local_estimate_bounds_passes_whose_cone_is_the_whole_image(tmp_path):
    """A layer whose receptive field covers the image: each instance's backward pass holds about two copies of every
    gradient in the network. The old estimate (three of the largest gradients) was 9x low on EfficientNet-Lite2 and
    is 2x low here: 32 instances a pass (every image is in every neuron's top), 20 maps of the same size."""
    b = NetBuilder(height=32, width=32, seed=6)
    x = b.conv("input", 16, 3, 1, (1, 1, 1, 1))
    for _ in range(8):
        x = b.conv(b.relu(x), 16, 3, 1, (1, 1, 1, 1))
    last = b.conv(b.relu(b.maxpool(x, 2, 2)), 32, 5, 1, (2, 2, 2, 2))
    model = load_proto(b.build([last]), tmp_path)
    images = fd.open_images("builtin:blobs:64", (3, 32, 32))
    top = fd.capture_top(model, last, images, top=64)
    stage = fd.estimate_decode(model, last, None, "local", 64, top=64).stages[1]
    tracemalloc.start()
    try:
        fd.decode_instances(model, last, images, instances=top)
        allocated = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert allocated <= stage.peak_bytes <= 2.5 * allocated, (allocated / MiB, stage.peak_bytes / MiB)
