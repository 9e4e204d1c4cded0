"""``fdsub diff`` / ``fd.diff``: neuron-level drift between two models, each scenario with the measure it must show
(issue 26): one neuron scaled, every name changed, a channel pruned, quantized copies, a fingerprint in place of the
old model, and the gate's exit codes."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from checks import load_proto
from netgen import NetBuilder
from onnx import numpy_helper
from typer.testing import CliRunner

import fdsub_onnx as fd
from fdsub_onnx.cli.main import app
from fdsub_onnx.modes.cost import weights_stage

SIZE = 20
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _net() -> tuple[onnx.ModelProto, list[str]]:
    """Four convolutions with ReLUs and a max pool; the conv outputs, in order."""
    b = NetBuilder(height=SIZE, width=SIZE, seed=3)
    convs = [b.conv("input", 6, 3, 1, (1, 1, 1, 1))]
    convs.append(b.conv(b.relu(convs[-1]), 8, 3, 1, (1, 1, 1, 1)))
    convs.append(b.conv(b.maxpool(b.relu(convs[-1]), 2, 2), 8, 3, 1, (1, 1, 1, 1)))
    convs.append(b.conv(b.relu(convs[-1]), 5, 3, 1, (1, 1, 1, 1)))
    return b.build([convs[-1]]), convs


def _weights(proto, conv_output: str) -> tuple[str, str]:
    node = next(n for n in proto.graph.node if n.output[0] == conv_output)
    return node.input[1], node.input[2]


def _set(proto, name: str, value: np.ndarray) -> None:
    init = next(i for i in proto.graph.initializer if i.name == name)
    init.CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))


def _array(proto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == name)).copy()


def _images(count=24, seed=0):
    return fd.ArrayImages(np.random.default_rng(seed).standard_normal((count, 3, SIZE, SIZE)).astype(np.float32))


def _folder(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


def _models(tmp_path, change):
    proto, convs = _net()
    a = load_proto(proto, _folder(tmp_path / "a"))
    other = onnx.ModelProto()
    other.CopyFrom(proto)
    change(other, convs)
    return a, load_proto(other, _folder(tmp_path / "b")), convs


class _Calibration:
    """onnxruntime's CalibrationDataReader over 8 random images, one a run."""

    def __init__(self):
        images = _images(8, seed=4)
        self.feeds = iter({"input": images.array[i : i + 1]} for i in range(len(images)))

    def get_next(self):
        return next(self.feeds, None)


def _by_layer(report):
    return {d.layer_a: d for d in report.layers}


def _scaled(layer: int, neuron: int, factor: float, bias: bool = True):
    """A change to ``_models``: neuron ``neuron`` of conv ``layer`` scaled by ``factor`` (weights, and bias)."""

    def change(proto, convs):
        weight, shift = _weights(proto, convs[layer])
        w, b = _array(proto, weight), _array(proto, shift)
        w[neuron] *= factor
        b[neuron] *= factor if bias else 1.0
        _set(proto, weight, w)
        _set(proto, shift, b)

    return change


def test_one_scaled_neuron_moves_alone_in_its_layer(tmp_path):
    """Neuron 3 of the second conv scaled by 1.3 (weights and bias): its filter drifts by exactly 0.3 and its
    responses by 0.3 (after a ReLU the largest activation scales too), every other neuron of that layer and every
    neuron below stays at 0, and the layers above move."""

    a, b, convs = _models(tmp_path, _scaled(1, 3, 1.3))
    report = fd.diff(a, b, images=_images(), max_drift=0.1)
    layers = _by_layer(report)
    assert [d.matched_by for d in report.layers] == ["name"] * 5 and not report.unmatched_a  # and the max pool
    assert max(layers[convs[0]].filter_drift) < 1e-9
    second = layers[convs[1]]
    assert second.filter_drift[3] == pytest.approx(0.3, rel=1e-6)
    assert max(np.delete(second.filter_drift, 3)) < 1e-9
    assert second.bias_drift[3] > 0 and max(np.delete(second.bias_drift, 3)) < 1e-9
    assert second.cosine[3] == pytest.approx(1.0)
    assert second.activation_drift[3] == pytest.approx(0.3, rel=1e-4)
    assert second.top_overlap[3] == 1.0 and second.spearman[3] == pytest.approx(1.0)
    assert min(max(layers[c].filter_drift) for c in convs[2:]) > 1e-3
    assert report.layers[0].layer_a != convs[0]  # the most changed first
    assert report.status == "fail" and any(convs[1] in f and "--max-drift 0.1" in f for f in report.failures)
    assert fd.diff(a, b, max_drift=0.5).status == "pass"


def test_every_name_changed_matches_every_layer_with_no_drift(tmp_path):
    def rename(proto, convs):
        names = {name: f"renamed_{i}" for i, name in enumerate(
            [*(o for n in proto.graph.node for o in n.output), *(i.name for i in proto.graph.initializer)])}
        for node in proto.graph.node:
            node.name = f"node_{names.get(node.output[0], node.name)}"
            node.input[:] = [names.get(x, x) for x in node.input]
            node.output[:] = [names[x] for x in node.output]
        for init in proto.graph.initializer:
            init.name = names[init.name]
        for out in proto.graph.output:
            out.name = names[out.name]
        del proto.graph.value_info[:]

    a, b, convs = _models(tmp_path, rename)
    report = fd.diff(a, b, images=_images())
    assert set(convs) < {d.layer_a for d in report.layers} and not report.unmatched_a
    assert all(d.matched_by == "structure" and d.layer_b.startswith("renamed_") for d in report.layers)
    assert max(max(d.filter_drift) for d in report.layers) < 1e-9
    assert max(max(d.activation_drift) for d in report.layers) < 1e-6
    assert report.status == "pass"


def test_a_pruned_channel_is_an_unmatched_neuron_not_drift(tmp_path):
    """Channel 5 of the second conv removed (and the third conv's input channel 5): the other 7 neurons of that
    layer pair with A's by their filters, unchanged; neuron 5 of A has no counterpart; the layer above drifts."""

    def prune(proto, convs):
        weight, bias = _weights(proto, convs[1])
        _set(proto, weight, np.delete(_array(proto, weight), 5, axis=0))
        _set(proto, bias, np.delete(_array(proto, bias), 5))
        above = _weights(proto, convs[2])[0]
        _set(proto, above, np.delete(_array(proto, above), 5, axis=1))
        del proto.graph.value_info[:]

    a, b, convs = _models(tmp_path, prune)
    report = fd.diff(a, b)
    layers = _by_layer(report)
    pruned = layers[convs[1]]
    assert pruned.unmatched_neurons_a == [5] and pruned.neurons == [0, 1, 2, 3, 4, 6, 7]
    assert pruned.neurons_b == [0, 1, 2, 3, 4, 5, 6] and max(pruned.filter_drift) < 1e-9
    assert max(layers[convs[2]].filter_drift) > 1e-3
    assert report.status == "pass"
    strict = fd.diff(a, b, require_all_matched=True)
    assert strict.status == "fail" and any("without a counterpart" in f for f in strict.failures)


@pytest.mark.parametrize("preprocessed", [False, True])
@pytest.mark.parametrize("fmt", ["qdq", "qop", "dynamic"])
def test_quantized_copies_match_every_layer_and_drift_a_little(fmt, preprocessed, tmp_path):
    """int8 copies by onnxruntime (QDQ, QOperator, dynamic), quantized from the model or from its quantization
    pre-processing's copy: every layer pairs, each drifts a little (< 0.1), the responses keep their order."""
    from onnxruntime import quantization as q
    from onnxruntime.quantization.shape_inference import quant_pre_process

    proto, convs = _net()
    a = load_proto(proto, _folder(tmp_path / "a"))
    source = a.path
    if preprocessed:
        source = str(tmp_path / "pre.onnx")
        quant_pre_process(a.path, source, skip_symbolic_shape=True)
    target = tmp_path / f"b.{fmt}.onnx"
    if fmt == "dynamic":
        q.quantize_dynamic(source, str(target), weight_type=q.QuantType.QUInt8, op_types_to_quantize=["Conv"])
    else:
        q.quantize_static(source, str(target), _Calibration(), per_channel=True,
                          quant_format=q.QuantFormat.QDQ if fmt == "qdq" else q.QuantFormat.QOperator)
    b = fd.load_model(str(target))
    report = fd.diff(a, b, images=_images())
    assert len(report.layers) == 5 and not report.unmatched_a
    worst = max(max(d.filter_drift) for d in report.layers)
    assert 0 < worst < 0.1, worst
    assert min(min(d.spearman) for d in report.layers) > 0.9


def test_a_fingerprint_stands_in_for_the_old_model(tmp_path):
    a, b, convs = _models(tmp_path, _scaled(2, 1, 0.5, bias=False))
    images = _images()
    live = fd.diff(a, b, images=images)
    fd.save_fingerprint(a, tmp_path / "fp", images=images)
    stored = fd.diff(str(tmp_path / "fp"), b, images=images)
    stored_by = _by_layer(stored)
    assert stored_by.keys() == _by_layer(live).keys()
    for x in live.layers:
        y = stored_by[x.layer_a]
        np.testing.assert_allclose(y.filter_drift, x.filter_drift, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(y.activation_drift, x.activation_drift, rtol=1e-5, atol=1e-7)
        assert y.top_overlap == x.top_overlap
    with pytest.raises(fd.FdsubError, match="not the images"):
        fd.diff(str(tmp_path / "fp"), b, images=_images(seed=9))
    with zipfile.ZipFile(tmp_path / "fp" / "fingerprint.npz") as archive:  # compressed: filters are mostly zeros
        assert {member.compress_type for member in archive.infolist()} == {zipfile.ZIP_DEFLATED}
    (tmp_path / "fp" / "fingerprint.json").write_text("{not json")
    with pytest.raises(fd.FdsubError, match="damaged fingerprint"):
        fd.diff(str(tmp_path / "fp"), b)


@pytest.mark.parametrize("damage", ["truncated", "nan filters", "inf bias", "nan responses"])
def test_a_damaged_fingerprint_is_refused_in_one_line(tmp_path, damage):
    """A truncated archive (it was an internal error: BadZipFile) and non-finite stored values (a fingerprint of NaN
    filters passed the gate: its drift read 0) are a damaged fingerprint, never a pass."""
    a, b, _ = _models(tmp_path, _scaled(2, 1, 0.5, bias=False))
    images = _images()
    fd.save_fingerprint(a, tmp_path / "fp", images=images)
    npz = tmp_path / "fp" / "fingerprint.npz"
    if damage == "truncated":
        npz.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])
    else:
        with np.load(npz) as data:
            arrays = {key: data[key].copy() for key in data.files}
        key, value = {"nan filters": ("filters_0", np.nan), "inf bias": ("bias_0", np.inf),
                      "nan responses": ("responses_0", np.nan)}[damage]
        arrays[key].flat[0] = value
        np.savez(npz, **arrays)
    with pytest.raises(fd.FdsubError, match="damaged fingerprint") as refused:
        fd.diff(str(tmp_path / "fp"), b, images=images)
    assert "\n" not in str(refused.value)


def test_a_model_whose_filters_turned_nan_fails_the_gate(tmp_path):
    """A NaN weight in B makes its filters NaN: every drift limit fails (a NaN drift compared false with the
    limit, and the gate passed)."""
    a, b, _ = _models(tmp_path, _scaled(1, 0, np.nan, bias=False))
    report = fd.diff(a, b, images=_images(), max_drift=0.5, max_activation_drift=0.5)
    assert report.status == "fail", report
    assert any("is nan at neuron 0" in reason for reason in report.failures), report.failures


def test_different_networks_cannot_be_compared(tmp_path):
    proto, _ = _net()
    a = load_proto(proto, _folder(tmp_path / "a"))
    other = NetBuilder(height=SIZE, width=SIZE, seed=3)
    last = other.conv(other.conv("input", 4, 7, 2), 4, 5, 3)
    b = load_proto(other.build([last]), _folder(tmp_path / "b"))
    with pytest.raises(fd.FdsubError, match="no layer of A matches one of B"):
        fd.diff(a, b)


def test_a_diff_of_some_neurons_is_planned_as_iter_decode_runs_it(tmp_path):
    """Some neurons of every layer: each layer by the route its plan picks, never less than the deepest layer's own
    plan (a walk counted with every layer's rows blocked the layers after each: ShuffleNetV2 planned at 0 s)."""
    a, b, convs = _models(tmp_path, _scaled(0, 0, 2.0, bias=False))
    cost = fd.estimate_diff(a, b, neurons="0-1")
    deepest = fd.plan_decode(a, [convs[-1]], neurons={convs[-1]: "0-1"})[convs[-1]]
    decode = next(stage for stage in cost.stages if stage.what.startswith("A: "))
    assert decode.what.startswith("A: weights decode of ") and "bottom-up)" in decode.what, decode.what
    assert decode.seconds >= weights_stage(deepest).seconds > 0


def test_a_fingerprint_says_its_cost_first_and_is_refused_over_the_budget(tmp_path):
    """``fingerprint --plan`` prints its stages and writes nothing; over the budget it is refused in one line
    before any work (it had neither: a fingerprint of every neuron of a real network ran until the system killed
    it)."""
    a, _, _ = _models(tmp_path, _scaled(0, 0, 2.0, bias=False))
    runner = CliRunner()
    planned = runner.invoke(app, ["fingerprint", a.path, "--out", str(tmp_path / "fp"), "--plan"])
    assert planned.exit_code == 0 and planned.output.startswith("fingerprint: about "), planned.output
    assert "  weights " in planned.output and "written" in planned.output
    refused = runner.invoke(app, ["fingerprint", a.path, "--out", str(tmp_path / "fp"), "--memory-budget", "1M"])
    lines = refused.output.strip().splitlines()
    assert refused.exit_code == 2 and len(lines) == 1 and "--neurons 0-15" in lines[0], refused.output
    assert not (tmp_path / "fp").exists()
    cost = fd.estimate_fingerprint(a, neurons="0-1")
    assert cost.stages[-1].peak_bytes > 0 and cost.seconds > 0


def test_a_diff_over_the_budget_names_the_fix_that_applies(tmp_path):
    """The refusal suggests fewer neurons with an example, and --instances only where it was given."""
    a, b, _ = _models(tmp_path, _scaled(0, 0, 2.0, bias=False))
    runner = CliRunner()
    for extra in ([], ["--instances", "--images", "builtin:blobs:4"]):
        result = runner.invoke(app, ["diff", a.path, b.path, "--memory-budget", "1M", *extra])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and "--neurons 0-15" in lines[0], result.output
        assert ("--instances" in lines[0]) == bool(extra), result.output


def test_the_cli_gate_exit_codes_json_and_junit(tmp_path):
    a, b, convs = _models(tmp_path, _scaled(0, 0, 2.0, bias=False))
    runner = CliRunner()
    ok = runner.invoke(app, ["diff", a.path, b.path, "--max-drift", "1.5"])
    assert ok.exit_code == 0, ok.output
    assert convs[0] in ok.stdout
    junit = tmp_path / "diff.xml"
    failed = runner.invoke(app, ["diff", a.path, b.path, "--max-drift", "0.5", "--json", "--junit", str(junit)])
    assert failed.exit_code == 1, failed.output
    out = json.loads(failed.stdout)
    assert out["status"] == "fail" and {"layer_a", "layer_b", "filter_drift"} <= set(out["layers"][0])
    first = next(entry for entry in out["layers"] if entry["layer_a"] == convs[0])
    assert len(first["filter_drift"]) == 6 and first["filter_drift"][0] == pytest.approx(1.0)
    xml = junit.read_text()
    assert xml.count("<testcase") == 5 and xml.count("<failure") >= 1  # the four convs and the max pool
    narrowed = json.loads(runner.invoke(app, ["diff", a.path, b.path, "--neurons", "0-1", "--json"]).stdout)
    assert all(len(entry["filter_drift"]) == 2 for entry in narrowed["layers"])
    folder = tmp_path / "diffout"
    drawn = runner.invoke(app, ["diff", a.path, b.path, "--out", str(folder)])
    assert drawn.exit_code == 0, drawn.output
    assert json.loads((folder / "diff.json").read_text())["layers"]
    page = (folder / "diff.html").read_text()  # the page: the table, the most changed neurons drawn in it
    assert convs[0] in page and "data:image/png;base64," in page and "<script" not in page
    from PIL import Image

    with Image.open(folder / "drift.png") as png:  # the first conv's 6 neurons, each as A, B, B - A in a row
        assert png.width < png.height
    planned = runner.invoke(app, ["diff", a.path, b.path, "--plan", "--images", "builtin:blobs:8"])
    assert planned.exit_code == 0 and planned.stdout.startswith("diff: about "), planned.output
    assert "B: responses of 5 layers over 8 images" in planned.stdout
    refused = runner.invoke(app, ["diff", a.path, b.path, "--memory-budget", "1M"])
    assert refused.exit_code == 2 and "--neurons" in refused.output and "Traceback" not in refused.output
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    error = runner.invoke(app, ["diff", a.path, str(broken)])
    assert error.exit_code == 2 and error.output.startswith("error: ") and "Traceback" not in error.output


def _bn_net() -> onnx.ModelProto:
    """Three convolutions, each of the first two followed by a BatchNormalization and a ReLU."""
    b = NetBuilder(height=SIZE, width=SIZE, seed=5)
    x = b.relu(b.batchnorm(b.conv("input", 6, 3, 1, (1, 1, 1, 1))))
    x = b.relu(b.batchnorm(b.conv(x, 8, 3, 1, (1, 1, 1, 1))))
    return b.build([b.conv(x, 4, 3, 1, (1, 1, 1, 1))])


@pytest.mark.parametrize("quantized", [False, True])
def test_a_copy_with_its_batchnorms_fused_matches_by_name(quantized, tmp_path):
    """onnxruntime's quantization pre-processing fuses each BatchNormalization into its convolution and gives the
    convolution the BatchNorm's output name (``conv2d.5.0`` becomes ``batch_norm_.10.0``): compared after their
    BatchNorms, A's layers pair with B's by name and the fused copy does not drift; its int8 QDQ copy (whose convs
    carry their fused ReLUs' names: paired by structure) drifts a little. Compared at the convolutions, they were
    0.5-21x apart (issue 26)."""
    from onnxruntime import quantization as q
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source = tmp_path / "a.onnx"
    onnx.save(_bn_net(), str(source))
    fused = tmp_path / "fused.onnx"
    quant_pre_process(str(source), str(fused), skip_symbolic_shape=True)
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(str(fused)).graph.node}
    target = fused
    if quantized:
        target = tmp_path / "fused.qdq.onnx"
        q.quantize_static(str(fused), str(target), _Calibration(), quant_format=q.QuantFormat.QDQ, per_channel=True)
    a, b = fd.load_model(str(source)), fd.load_model(str(target))
    report = fd.diff(a, b, images=_images())
    assert len(report.layers) == 3 and not report.unmatched_a and not report.unmatched_b
    assert quantized or all(d.matched_by == "name" for d in report.layers)  # QDQ renames them once more
    worst = max(max(d.filter_drift) for d in report.layers)
    assert (0 < worst < 0.05) if quantized else worst < 1e-5, worst


def test_the_two_torch_exporters_of_one_network_do_not_drift():
    """The same torch network (its BatchNorms, an SE gate, a residual block) exported by the TorchScript and the
    dynamo exporter (tests/fixtures/make_exporter_pair.py): every convolution and the classifier pair (by
    structure: the dynamo export names tensors ``getitem_3``, ``conv2d_5``), drift <= 1e-5. The TorchScript
    export's GlobalAveragePool, a ReduceMean in the dynamo export that ``inspect`` does not list, stays unmatched."""
    a, b = (fd.load_model(str(FIXTURES / f"exporter_pair.{tag}.onnx")) for tag in ("ts", "dynamo"))
    report = fd.diff(a, b, images=fd.open_images("builtin:blobs:16", (3, 32, 32)))
    convs = [la.name for la in fd.inspect_model(a).layers if la.op in ("Conv", "Gemm")]
    assert sorted(d.layer_a for d in report.layers) == sorted(convs) and len(convs) == 7
    assert max(max(d.filter_drift) for d in report.layers) <= 1e-5
    assert max(max(d.activation_drift) for d in report.layers) <= 1e-5
    assert [u["layer"] for u in report.unmatched_a] == ["/se/se.0/GlobalAveragePool_output_0"]
    assert report.status == "pass" and fd.diff(a, b, require_all_matched=True).status == "fail"


def test_a_zoo_gates_each_model_against_its_baseline(tmp_path):
    """``baseline = "..."`` per zoo entry (a model file, or a fingerprint folder) and its limits: ``fdsub zoo`` checks
    each model, compares it with its baseline, fails (exit 1) where a limit is crossed, and writes a JUnit suite per
    diff beside the checks'."""

    a, b, _ = _models(tmp_path, _scaled(1, 2, 1.5, bias=False))
    fd.save_fingerprint(a, tmp_path / "fp", neurons="0-3")
    zoo = tmp_path / "zoo.toml"
    zoo.write_text(f"""[defaults]
images = "builtin:blobs:4"
sample = 1
neurons_per_layer = 1

[[models]]
name = "same"
path = "{a.path}"
baseline = "{a.path}"
max_drift = 1e-6

[[models]]
name = "drifted"
path = "{b.path}"
baseline = "fp"
diff_neurons = "0-3"
max_drift = 0.1
""")
    junit = tmp_path / "zoo.xml"
    result = CliRunner().invoke(app, ["zoo", str(zoo), "--json", "--junit", str(junit)])
    assert result.exit_code == 1, result.output
    models = {m["name"]: m for m in json.loads(result.stdout)["models"]}
    assert models["same"]["status"] == "pass" and models["same"]["diff"]["status"] == "pass"
    drifted = models["drifted"]
    assert drifted["status"] == "fail" and drifted["report"]["status"] == "pass"
    assert any("--max-drift 0.1" in f for f in drifted["diff"]["failures"])
    assert all(len(layer["filter_drift"]) <= 4 for layer in drifted["diff"]["layers"])
    xml = junit.read_text()
    assert xml.count("<testsuite ") == 4 and "DriftOverLimit" in xml
    root = ET.parse(junit).getroot()  # a model's diff time is its diff suite's, not counted in its check's too
    total = sum(m["seconds"] for m in models.values())
    assert float(root.get("time")) <= total + 0.01, (root.get("time"), total)
    table = CliRunner().invoke(app, ["zoo", str(zoo)])
    assert "drift" in table.stdout and "drift from its baseline" in table.stdout
    planned = CliRunner().invoke(app, ["zoo", str(zoo), "--plan"])  # each baseline diff is a stage of the plan
    assert planned.output.count("against its baseline") == 2, planned.output


def test_a_zoo_baseline_that_cannot_be_read_is_said_to_be_the_baseline(tmp_path):
    a, _, _ = _models(tmp_path, _scaled(1, 2, 1.5, bias=False))
    zoo = tmp_path / "zoo.toml"
    zoo.write_text(f'[[models]]\nname = "m"\npath = "{a.path}"\nbaseline = "nofp"\nsample = 1\n'
                   'images = "builtin:blobs:4"\n')
    result = CliRunner().invoke(app, ["zoo", str(zoo), "--json"])
    [model] = json.loads(result.stdout)["models"]
    assert model["status"] == "error" and model["error"].startswith(f"its baseline {tmp_path / 'nofp'}: "), model


def test_a_zoo_baseline_option_without_a_baseline_is_refused(tmp_path):
    zoo = tmp_path / "zoo.toml"
    zoo.write_text('[[models]]\npath = "m.onnx"\nmax_drift = 0.1\n')
    with pytest.raises(fd.FdsubError, match="compare the model with its baseline"):
        fd.read_zoo(zoo)


def _half(proto: onnx.ModelProto, keep_io_types: bool) -> onnx.ModelProto:
    """``proto`` in float16 as onnxconverter-common writes it: float16 weights, and with ``keep_io_types`` float32
    input and output meeting them through Cast nodes (else a float16 input and output)."""
    half = onnx.ModelProto()
    half.CopyFrom(proto)
    graph = half.graph
    for init in graph.initializer:
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    del graph.value_info[:]
    if not keep_io_types:
        for info in [*graph.input, *graph.output]:
            info.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
        return half
    out = graph.output[0].name
    for node in graph.node:
        node.input[:] = ["input_half" if x == "input" else x for x in node.input]
        node.output[:] = [f"{out}_half" if x == out else x for x in node.output]
    graph.node.insert(0, onnx.helper.make_node("Cast", ["input"], ["input_half"], to=onnx.TensorProto.FLOAT16))
    graph.node.append(onnx.helper.make_node("Cast", [f"{out}_half"], [out], to=onnx.TensorProto.FLOAT))
    return half


@pytest.mark.parametrize("keep_io_types", [True, False])
def test_a_float16_copy_is_read_as_float32_and_drifts_by_its_rounding(keep_io_types, tmp_path):
    """A float16 copy (float16 weights; float32 input and output through Cast nodes, or float16 ones) loads as the
    float32 network of its rounded weights: every layer decodable and paired by name, filter drift of the order
    of float16's rounding (2^-11), and its responses from onnxruntime on that float32 copy. Its input Cast had no
    rule ("Cast ...: no rule for this op": 0 of 54 layers of a MobileNetV2 copy decodable)."""
    proto, convs = _net()
    a = load_proto(proto, _folder(tmp_path / "a"))
    b = load_proto(_half(proto, keep_io_types), _folder(tmp_path / "b"))
    assert all(layer.decodable for layer in fd.inspect_model(b).layers)
    assert b.dequantized and {r["op"] for r in b.dequantized} == {"float16"}
    report = fd.diff(a, b, images=_images())
    assert len(report.layers) == 5 and not report.unmatched_a  # the output conv renamed with its Cast: by structure
    assert sum(d.matched_by == "name" for d in report.layers) >= 4
    worst = max(max(d.filter_drift) for d in report.layers)
    assert 1e-5 < worst < 5e-3, worst
    assert max(max(d.activation_drift) for d in report.layers) < 2e-2


def test_a_fine_tuned_copy_drifts_more_with_depth(tmp_path):
    """Every weight moved by 3% of its size at random (a fine-tuning's footprint): the first layer's filters move by
    about that, and the change compounds layer by layer (the mean drift grows with depth)."""

    def tune(proto, convs):
        rng = np.random.default_rng(8)
        for conv in convs:
            weight, _ = _weights(proto, conv)
            w = _array(proto, weight)
            _set(proto, weight, w * (1 + 0.03 * rng.standard_normal(w.shape)))

    a, b, convs = _models(tmp_path, tune)
    layers = _by_layer(fd.diff(a, b))
    means = [float(np.mean(layers[c].filter_drift)) for c in convs]
    assert 0.01 < means[0] < 0.05 and means == sorted(means), means


def test_instance_drifts_see_a_scaled_neuron_in_its_local_filter_not_its_neuron_feature(tmp_path):
    """Neuron 3 of the second conv scaled by 1.3: its top-N images stay, so its Neuron Feature (the activation-
    weighted mean of its top patches, weights normalized) does not move, while its local filter (the mean input
    gradient there) moves by exactly 0.3; the layer's other neurons move in neither."""

    a, b, convs = _models(tmp_path, _scaled(1, 3, 1.3))
    report = fd.diff(a, b, layers=[convs[1]], images=_images(), top=4, instances=True)
    second = report.layers[0]
    assert second.nf_drift[3] < 1e-6 and second.local_drift[3] == pytest.approx(0.3, rel=1e-4)
    assert max(np.delete(second.nf_drift, 3)) < 1e-6 and max(np.delete(second.local_drift, 3)) < 1e-6
    with pytest.raises(fd.FdsubError, match="give --images"):
        fd.diff(a, b, instances=True)
    shown = report.shown  # drift.png's rows: the filters in A and B, and each model's Neuron Feature
    assert shown["neurons"][0] == 3 and shown["features_a"].shape == shown["filters_a"].shape
    fd.save_diff(report, tmp_path / "out")
    from PIL import Image

    with Image.open(tmp_path / "out" / "drift.png") as png:
        assert png.width > png.height / 3  # 5 cells a row, 8 rows
