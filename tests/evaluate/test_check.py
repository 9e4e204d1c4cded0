"""`fdsub check` and `check_model`: each check passes on a sound model and fails on a broken one.

Exit codes: 0 every check passes, 1 one fails, 2 the model cannot be checked (one line, no traceback).
"""

from __future__ import annotations

import dataclasses
import json
import xml.etree.ElementTree as ET

import netgen  # tests/ is on sys.path (tests/conftest.py)
import numpy as np
import onnx
import pytest
from checks import save_proto, softmax_between_convs
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

import fdsub_onnx
from fdsub_onnx.cli.main import app
from fdsub_onnx.evaluate import check as _check
from fdsub_onnx.evaluate.check import check_model
from fdsub_onnx.evaluate.self_test import identity_error, linearized

runner = CliRunner()
FAST = ["--images", "builtin:blobs:8"]
ALL_CHECKS = ["coverage", "finite-weights", "identity", "degenerate-filters", "dead-neurons"]


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("FDSUB_DEBUG", raising=False)


def invoke(*args):
    return runner.invoke(app, ["check", *(str(a) for a in args)])


def statuses(data: dict) -> dict:
    return {c["name"]: c["status"] for c in data["checks"]}


# ---- models --------------------------------------------------------------------------------------
def relu_net(seed: int = 3, dead_bias: float | None = None) -> tuple[onnx.ModelProto, list[str]]:
    """conv -> relu -> maxpool -> conv -> relu -> conv; with ``dead_bias``, a constant added before the first relu."""
    b = netgen.NetBuilder(height=24, width=24, seed=seed)
    x = b.conv("input", 8, 3, 1, (1, 1, 1, 1))
    if dead_bias is not None:
        x = b.affine_const(x, "Add", dead_bias)
    x = b.maxpool(b.relu(x), 2, 2)
    x = b.relu(b.conv(x, 8, 3))
    b.conv(x, 6, 3)
    return b.build(), list(b.layers)


def with_nan(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose first conv weight holds one NaN and one Inf."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    init = out.graph.initializer[0]
    value = numpy_helper.to_array(init).copy()
    value.flat[0], value.flat[1] = np.nan, np.inf
    init.CopyFrom(numpy_helper.from_array(value, init.name))
    return out


def no_image_input() -> onnx.ModelProto:
    """A model whose only input is a vector: not a CNN, unsupported."""
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph([node], "vector", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


class Nets:
    def __init__(self, folder):
        self.good_proto, self.good_layers = relu_net()
        self.good = save_proto(folder, "good.onnx", self.good_proto)
        self.nan = save_proto(folder, "nan.onnx", with_nan(self.good_proto))
        self.dead_proto, self.dead_layers = relu_net(dead_bias=-100.0)
        self.dead = save_proto(folder, "dead.onnx", self.dead_proto)
        self.blocked = save_proto(folder, "blocked.onnx", softmax_between_convs())
        self.vector = save_proto(folder, "vector.onnx", no_image_input())
        self.garbage = folder / "garbage.onnx"
        self.garbage.write_bytes(b"definitely not protobuf \xff\x00" * 16)
        self.missing = folder / "missing.onnx"



@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    return Nets(tmp_path_factory.mktemp("check"))


# ---- exit codes ----------------------------------------------------------------------------------
def test_good_model_passes_with_exit_0(nets):
    result = invoke(nets.good, *FAST)
    assert result.exit_code == 0, result.output
    for name in ALL_CHECKS:
        assert name in result.output
    assert "FAIL" not in result.output
    assert result.output.strip().splitlines()[-1].startswith("PASS")


def test_good_model_json(nets):
    result = invoke(nets.good, *FAST, "--json", "--neurons-per-layer", "3")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["status"] == "pass" and data["coverage"] == 1.0
    assert (data["layers"], data["decodable"], data["blocked"]) == (4, 4, [])
    assert statuses(data) == dict.fromkeys(ALL_CHECKS, "pass")
    identity = next(c for c in data["checks"] if c["name"] == "identity")
    assert 0 <= identity["value"] < 1e-5 and identity["limit"] == 1e-4
    assert "9 neurons of 3 layers" in identity["summary"]  # 3 sampled layers, 3 neurons each
    assert data["sampled"][0] == nets.good_layers[0] and data["sampled"][-1] == nets.good_layers[-1]


def test_nan_weights_fail_with_exit_1(nets):
    result = invoke(nets.nan, *FAST, "--json")
    assert result.exit_code == 1, result.output
    data = json.loads(result.stdout, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    got = statuses(data)
    assert got["finite-weights"] == "fail" and got["coverage"] == "pass"
    finite = next(c for c in data["checks"] if c["name"] == "finite-weights")
    assert finite["details"] == [f"{nets.good_proto.graph.initializer[0].name} [8, 3, 3, 3]: 1 NaN, 1 Inf"]
    assert got["degenerate-filters"] == got["identity"] == "fail"  # the NaN reaches the decoded filters
    assert got["dead-neurons"] == "fail"  # and the activations: a NaN response does not vary
    dead = next(c for c in data["checks"] if c["name"] == "dead-neurons")["summary"]
    assert "respond NaN or Inf: the weights' doing" in dead and "synthetic probes" not in dead, dead


def test_dead_layer_fails_with_exit_1(nets):
    result = invoke(nets.dead, *FAST, "--json")
    assert result.exit_code == 1, result.output
    data = json.loads(result.stdout)
    got = statuses(data)
    assert got["dead-neurons"] == "fail"
    assert [n for n, s in got.items() if s == "fail"] == ["dead-neurons"]  # the decoding itself is fine
    dead = next(c for c in data["checks"] if c["name"] == "dead-neurons")
    assert dead["value"] == 1.0
    first = nets.dead_layers[0]
    assert any(d.startswith(f"{first} (after ") and ": 8 of 8 dead" in d for d in dead["details"]), dead["details"]
    # the failure names its probe images, the option that moves the limit, and the images that would tell more
    assert "builtin:blobs" in dead["summary"] and "over --max-dead 0.5" in dead["summary"]
    assert "--images" in dead["summary"]
    # the same model passes when the threshold allows every neuron to be dead
    assert invoke(nets.dead, *FAST, "--max-dead", "1.0").exit_code == 0


def test_the_identity_is_decoded_in_float64_unless_asked(nets, monkeypatch):
    """The identity tests fdsub's linearization, not the model: float32 rounding (a trained PaddleOCR classifier:
    1.14e-4 in float32 against the 1e-4 tolerance, 1.4e-5 in float64) is no model defect."""
    from fdsub_onnx.evaluate import check

    seen = []
    real = check.decode
    monkeypatch.setattr(check, "decode", lambda *a, **k: seen.append(k["dtype"]) or real(*a, **k))
    fdsub_onnx.check_model(fdsub_onnx.load_model(nets.good), sample=1, neurons_per_layer=1, images=None)
    fdsub_onnx.check_model(fdsub_onnx.load_model(nets.good), sample=1, neurons_per_layer=1, images=None,
                           dtype="float32")
    assert seen == ["float64", "float32"]


def test_tampered_decoder_fails_the_identity(nets, monkeypatch):
    real = _check.decode

    def tampered(*args, **kwargs):
        decoded = real(*args, **kwargs)
        return dataclasses.replace(decoded, filters=decoded.filters[:, :, ::-1].copy())  # flipped upside down

    monkeypatch.setattr(_check, "decode", tampered)
    result = invoke(nets.good, *FAST, "--json")
    assert result.exit_code == 1, result.output
    data = json.loads(result.stdout)
    assert statuses(data)["identity"] == "fail"
    identity = next(c for c in data["checks"] if c["name"] == "identity")
    assert identity["value"] > 1e-2
    assert any("worst: image" in d for d in identity["details"])


def test_bias_off_by_a_little_fails_the_identity(nets, monkeypatch):
    real = _check.decode

    def shifted(*args, **kwargs):
        decoded = real(*args, **kwargs)
        return dataclasses.replace(decoded, bias=decoded.bias + 1e-2 * np.abs(decoded.filters).max())

    monkeypatch.setattr(_check, "decode", shifted)
    assert invoke(nets.good, *FAST).exit_code == 1
    assert invoke(nets.good, *FAST, "--tolerance", "0.5").exit_code == 0


def test_degenerate_filters_fail(nets, monkeypatch):
    real = _check.decode

    def zeroed(*args, **kwargs):
        decoded = real(*args, **kwargs)
        filters = decoded.filters.copy()
        filters[0] = 0.0
        return dataclasses.replace(decoded, filters=filters)

    monkeypatch.setattr(_check, "decode", zeroed)
    data = json.loads(invoke(nets.good, *FAST, "--json", "--tolerance", "10").stdout)
    degenerate = next(c for c in data["checks"] if c["name"] == "degenerate-filters")
    assert degenerate["status"] == "fail"
    assert len(degenerate["details"]) == len(data["sampled"]) and all("all zero" in d for d in degenerate["details"])


def test_coverage_is_reported_and_fails_only_below_an_explicit_minimum(nets):
    """A layer fdsub cannot decode is no defect of the model: coverage is reported (with what blocks), and fails
    the check only below --min-coverage, whose name the failure gives."""
    result = invoke(nets.blocked, *FAST, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    coverage = next(c for c in data["checks"] if c["name"] == "coverage")
    assert data["coverage"] == 0.5 and coverage["status"] == "pass" and "--min-coverage" in coverage["summary"]
    assert len(data["blocked"]) == 1 and "Softmax" in data["blocked"][0]["reason"]
    strict = json.loads(invoke(nets.blocked, *FAST, "--min-coverage", "1", "--json").stdout)
    assert statuses(strict)["coverage"] == "fail"
    assert "under --min-coverage 1" in next(c for c in strict["checks"] if c["name"] == "coverage")["summary"]
    assert invoke(nets.blocked, *FAST, "--min-coverage", "0.5").exit_code == 0


def test_table_lists_the_non_decodable_layers(nets):
    result = invoke(nets.blocked, *FAST, "--min-coverage", "1")
    assert result.exit_code == 1
    assert "FAIL" in result.output and "Softmax" in result.output
    assert result.output.strip().splitlines()[-1].startswith("FAIL: coverage")


def test_expected_decodable(nets):
    assert invoke(nets.good, *FAST, "--expect-decodable", "4").exit_code == 0
    data = json.loads(invoke(nets.good, *FAST, "--expect-decodable", "5", "--json").stdout)
    assert statuses(data)["expected-layers"] == "fail"
    names = ",".join(nets.good_layers[:2])
    assert invoke(nets.good, *FAST, "--expect-decodable", names).exit_code == 0
    data = json.loads(invoke(nets.good, *FAST, "--expect-decodable", f"{names},nosuch", "--json").stdout)
    check = next(c for c in data["checks"] if c["name"] == "expected-layers")
    assert check["status"] == "fail" and check["details"] == ["nosuch: no such layer"]


def test_expected_decodable_takes_node_names_as_layers_does(nets, tmp_path):
    """``--expect-decodable`` reads names as ``--layers`` does (tensor, node or module); a node name was 'no such
    layer'."""
    renamed = onnx.ModelProto()
    renamed.CopyFrom(nets.good_proto)
    next(n for n in renamed.graph.node if n.output[0] == nets.good_layers[0]).name = "/block/conv"
    path = save_proto(tmp_path, "renamed.onnx", renamed)
    data = json.loads(invoke(path, *FAST, "--expect-decodable", f"/block/conv,{nets.good_layers[1]}", "--json").stdout)
    check = next(c for c in data["checks"] if c["name"] == "expected-layers")
    assert check["status"] == "pass", check


def assert_one_error_line(result, fragment: str):
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert fragment in lines[0], result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("case, fragment", [
    ("missing", "not found"),
    ("garbage", "not a readable ONNX model"),
    ("vector", "no image input"),
])
def test_model_that_cannot_be_checked_exits_2(nets, case, fragment):
    for extra in ([], ["--json"]):
        assert_one_error_line(invoke(getattr(nets, case), *FAST, *extra), fragment)


@pytest.mark.parametrize("args, fragment", [
    (["--max-dead", "1.5"], "max dead"),
    (["--tolerance", "0"], "tolerance"),
    (["--neurons-per-layer", "0"], "neurons per layer"),
    (["--dtype", "float16"], "dtype"),
    (["--layers", "nosuch"], "no layer named 'nosuch'"),
    (["--images", "builtin:nosuch"], "builtin:nosuch"),
])
def test_bad_options_exit_2(nets, args, fragment):
    assert_one_error_line(invoke(nets.good, *FAST, *args), fragment)


# ---- JUnit -----------------------------------------------------------------------------------------
def test_junit_pass_and_fail(nets, tmp_path):
    good, bad = tmp_path / "good.xml", tmp_path / "reports" / "bad.xml"
    assert invoke(nets.good, *FAST, "--junit", good).exit_code == 0
    assert invoke(nets.nan, *FAST, "--junit", bad).exit_code == 1
    root = ET.parse(good).getroot()
    assert root.tag == "testsuites" and root.get("tests") == "5" and root.get("failures") == "0"
    [suite] = root.findall("testsuite")
    assert suite.get("name") == str(nets.good) and suite.get("tests") == "5" and suite.get("errors") == "0"
    assert [c.get("name") for c in suite.findall("testcase")] == ALL_CHECKS
    assert not suite.findall("testcase/failure") and float(suite.get("time")) > 0
    classes = {c.get("classname") for c in suite.findall("testcase")}  # the model's path: no dots, no hierarchy
    assert len(classes) == 1 and classes.pop().count(".") == 2, classes

    root = ET.parse(bad).getroot()
    [suite] = root.findall("testsuite")
    failed = [c.get("name") for c in suite.findall("testcase") if c.find("failure") is not None]
    assert failed == ["finite-weights", "identity", "degenerate-filters", "dead-neurons"]
    assert suite.get("failures") == root.get("failures") == "4"
    failure = suite.find("testcase[@name='finite-weights']/failure")
    assert "NaN" in failure.get("message") + failure.text and failure.get("type") == "CheckFailed"
    assert sorted(p.name for p in bad.parent.iterdir()) == ["bad.xml"]  # no temporary file left


def test_junit_records_a_model_that_cannot_be_checked(nets, tmp_path):
    report = tmp_path / "error.xml"
    assert_one_error_line(invoke(nets.garbage, "--junit", report), "not a readable ONNX model")
    [suite] = ET.parse(report).getroot().findall("testsuite")
    assert (suite.get("tests"), suite.get("errors"), suite.get("failures")) == ("1", "1", "0")
    error = suite.find("testcase[@name='load']/error")
    assert "not a readable ONNX model" in error.get("message")


def test_junit_into_a_folder_is_refused(nets, tmp_path):
    assert_one_error_line(invoke(nets.good, *FAST, "--junit", tmp_path), "is a folder")


# ---- the library -------------------------------------------------------------------------------------
def test_check_model_api(nets):
    report = check_model(str(nets.good), images="builtin:gratings:4", neurons_per_layer=2, sample=2)
    assert isinstance(report, _check.CheckReport) and report.passed
    assert [c.name for c in report.checks] == ALL_CHECKS
    assert report.sampled == [nets.good_layers[0], nets.good_layers[-1]]
    assert "on 4 probe images" in report.check("dead-neurons").summary
    report = check_model(str(nets.good), images=None, layers=[nets.good_layers[1]])
    assert report.sampled == [nets.good_layers[1]] and report.check("dead-neurons").status == "skip"


def test_layers_all_checks_every_decodable_layer(nets):
    """--layers all: every decodable layer, whatever --sample and --max-rf (those bound the default sample)."""
    result = invoke(nets.good, *FAST, "--json", "--layers", "all", "--sample", "2", "--max-rf", "1")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["sampled"] == nets.good_layers
    assert check_model(str(nets.good), images=None, layers="all").sampled == nets.good_layers


def test_layers_left_out_by_max_rf(nets):
    report = check_model(str(nets.good), max_rf=1, images=None)
    assert report.sampled == [] and report.passed
    assert report.check("identity").status == "skip" and "at most 1 px" in report.check("identity").summary


def test_dead_probe_follows_batchnorm_and_relu(load):
    b = netgen.NetBuilder(height=12, width=12)
    x = b.conv("input", 4, 3)
    y = b.relu(b.batchnorm(x))
    b.conv(y, 2, 3)
    model = load(b.build())
    assert _check._activation_of(model, x) == y
    assert _check._activation_of(model, b.layers[-1]) == b.layers[-1]


@pytest.mark.parametrize("name", ["relu_chain", "relu_residual", "maxpool_variants", "mixed_nonlinear"])
def test_identity_holds_on_nonlinear_zoo(name, load):
    """Every nonlinearity weights mode reads as identity is linearized the same way."""
    proto = dict(netgen.relu_zoo())[name]
    report = check_model(load(proto), images=None, sample=4, neurons_per_layer=3)
    identity = report.check("identity")
    if name == "maxpool_variants":  # a dilated MaxPool: AveragePool has no dilations, the identity is skipped
        assert identity.status == "skip" and "dilated" in identity.summary
        return
    assert identity.status == "pass", identity.details
    assert identity.value < 1e-5


def test_linearized_silu_and_pools(load):
    b = netgen.NetBuilder(height=12, width=12, seed=5)
    x = b.conv("input", 4, 3)
    silu = b._node("Mul", [x, b.sigmoid(x)], b.shapes[x])
    b._node("GlobalMaxPool", [b.maxpool(silu, 2, 2)], (4, 1, 1), layer=True)
    proto = b.build()
    model = load(proto)
    linear = linearized(proto, model.patterns)  # the patterns the loaded model found (SiLU)
    ops = ["Conv", "Identity", "Identity", "AveragePool", "GlobalAveragePool"]
    assert [n.op_type for n in linear.graph.node] == ops
    assert [n.output[0] for n in linear.graph.node] == [n.output[0] for n in proto.graph.node]
    images = np.random.default_rng(0).standard_normal((2, 3, 12, 12)).astype(np.float32)
    act = netgen.run_ort(linear, images, [b.layers[-1]])[b.layers[-1]]
    decoded = fdsub_onnx.decode(model, b.layers[-1])
    error = identity_error(decoded, act, images)
    assert error.positions > 0 and error.within(1e-5), error
    wrong = identity_error(decoded, netgen.run_ort(proto, images, [b.layers[-1]])[b.layers[-1]], images)
    assert not wrong.within(1e-2), wrong  # the real (nonlinear) network is not what weights mode decodes
