"""`fdsub zoo`: models/zoo.toml (the demo model and the onnx package's light topologies) checks clean, and
the zoo runner reports failing, erroring and malformed entries with exit codes 1 and 2."""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import netgen  # tests/ is on sys.path (tests/conftest.py)
import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from fdsub_onnx.cli.main import app
from fdsub_onnx.evaluate.zoo import LIGHT_PREFIX, light_name, light_paths, read_zoo, run_zoo

ZOO = Path(__file__).resolve().parents[2] / "models" / "zoo.toml"
runner = CliRunner()


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("FDSUB_DEBUG", raising=False)


def invoke(*args):
    return runner.invoke(app, ["zoo", *(str(a) for a in args)])


def test_zoo_file_lists_the_demo_and_every_light_topology():
    models = read_zoo(ZOO)
    light = {m.source[len(LIGHT_PREFIX):] for m in models if m.source.startswith(LIGHT_PREFIX)}
    assert len(light_paths()) == 9 and light == {light_name(p) for p in light_paths()}
    assert all(m.randomize for m in models if m.source.startswith(LIGHT_PREFIX))
    demo = next(m for m in models if m.name == "demo")
    assert Path(demo.path) == ZOO.parent / "demo.onnx" and not demo.randomize
    assert all(m.decodable is not None and m.input_shape is not None for m in models)


def test_zoo_runs_clean(tmp_path):
    """The CI zoo run: every model passes every check (about 25-40 s on 2 cores)."""
    report = tmp_path / "zoo.xml"
    start = time.perf_counter()
    result = invoke(ZOO, "--junit", report)
    seconds = time.perf_counter() - start
    print(f"\nfdsub zoo {ZOO.name}: {seconds:.1f} s")
    assert result.exit_code == 0, result.output
    names = [m.name for m in read_zoo(ZOO)]
    rows = [line for line in result.output.splitlines() if line.startswith("│")]
    assert [row.split("│")[1].strip() for row in rows] == names
    assert all(" PASS " in row for row in rows), result.output
    assert "FAIL" not in result.output and "ERROR" not in result.output
    assert result.output.strip().splitlines()[-1].startswith(f"PASS: {len(names)} passed, 0 failed, 0 errors")
    root = ET.parse(report).getroot()
    assert root.tag == "testsuites" and (root.get("failures"), root.get("errors")) == ("0", "0")
    suites = root.findall("testsuite")
    assert [s.get("name") for s in suites] == names
    for suite in suites:
        cases = [c.get("name") for c in suite.findall("testcase")]
        assert cases == ["coverage", "expected-layers", "finite-weights", "identity", "degenerate-filters",
                         "dead-neurons"], (suite.get("name"), cases)
        assert not suite.findall("testcase/skipped"), suite.get("name")  # every check really ran


# ---- small zoos ----------------------------------------------------------------------------------------
def small_net(seed: int) -> onnx.ModelProto:
    b = netgen.NetBuilder(height=16, width=16, seed=seed)
    b.conv(b.relu(b.conv("input", 6, 3)), 4, 3)
    return b.build()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("zoo")
    onnx.save(small_net(1), str(path / "good.onnx"))
    bad = small_net(2)
    init = bad.graph.initializer[0]
    value = numpy_helper.to_array(init).copy()
    value.flat[0] = np.nan
    init.CopyFrom(numpy_helper.from_array(value, init.name))
    onnx.save(bad, str(path / "nan.onnx"))
    return path


def write_zoo(folder: Path, text: str) -> Path:
    path = folder / f"zoo{abs(hash(text))}.toml"
    path.write_text(text)
    return path


HEADER = '[defaults]\nimages = "builtin:blobs:4"\nneurons_per_layer = 2\n'


def test_zoo_exit_codes_and_json(folder):
    good = write_zoo(folder, HEADER + '[[models]]\npath = "good.onnx"\ndecodable = 2\n')
    result = invoke(good, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["status"] == "pass" and [m["name"] for m in data["models"]] == ["good"]
    assert data["models"][0]["report"]["decodable"] == 2

    failing = write_zoo(folder, HEADER + '[[models]]\npath = "good.onnx"\n[[models]]\npath = "nan.onnx"\n')
    result = invoke(failing)
    assert result.exit_code == 1, result.output
    assert "nan: finite-weights failed" in result.output
    assert result.output.strip().splitlines()[-1].startswith("FAIL: 1 passed, 1 failed, 0 errors of 2 models")

    expected_wrong = write_zoo(folder, HEADER + '[[models]]\npath = "good.onnx"\ndecodable = 3\n')
    result = invoke(expected_wrong)
    assert result.exit_code == 1 and "expected-layers failed" in result.output


def test_zoo_model_errors_exit_2_and_the_others_still_run(folder, tmp_path):
    zoo = write_zoo(folder, HEADER + '[[models]]\npath = "missing.onnx"\n[[models]]\npath = "good.onnx"\n'
                                     '[[models]]\npath = "onnx-light:nosuch"\n')
    report = tmp_path / "zoo.xml"
    result = invoke(zoo, "--junit", report)
    assert result.exit_code == 2, result.output
    assert "missing: error: model file not found" in result.output
    assert "nosuch: error: onnx-light:nosuch: the onnx package has no such light model" in result.output
    root = ET.parse(report).getroot()
    assert [(s.get("name"), s.get("errors")) for s in root.findall("testsuite")] == [
        ("missing", "1"), ("good", "0"), ("nosuch", "1")]
    assert root.get("errors") == "2" and root.get("failures") == "0"
    data = json.loads(invoke(zoo, "--json").stdout)
    assert [m["status"] for m in data["models"]] == ["error", "pass", "error"] and data["status"] == "error"


def test_zoo_models_option(folder):
    zoo = write_zoo(folder, HEADER + '[[models]]\npath = "good.onnx"\n[[models]]\npath = "nan.onnx"\n')
    assert invoke(zoo, "--models", "good").exit_code == 0
    result = invoke(zoo, "--models", "good,other")
    assert result.exit_code == 2 and "no model named 'other'" in result.output


@pytest.mark.parametrize("text, fragment", [
    ("[[models]\npath = 1", "not valid TOML"),
    ('[[models]]\nname = "x"\n', "needs path"),
    ('[[models]]\npath = "good.onnx"\nneurons = 3\n', "unknown key(s) neurons"),
    ('[defaults]\nfast = true\n[[models]]\npath = "good.onnx"\n', "unknown key(s) fast"),
    ('[[models]]\npath = "good.onnx"\ninput_shape = [3, 16, 16]\n', "input_shape"),
    ('[[models]]\npath = "good.onnx"\n[[models]]\npath = "good.onnx"\n', "appear twice"),
    ("title = 'zoo'\n", "unknown table(s) title"),
], ids=["toml", "no-path", "model-key", "defaults-key", "input-shape", "twice", "table"])
def test_malformed_zoo_file_exits_2(folder, text, fragment):
    result = invoke(write_zoo(folder, text))
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert fragment in lines[0] and "Traceback" not in result.output


def test_junit_folder_is_refused_before_any_work(folder, tmp_path):
    zoo = write_zoo(folder, HEADER + '[[models]]\npath = "good.onnx"\n')
    result = invoke(zoo, "--junit", tmp_path)
    assert result.exit_code == 2 and result.output.startswith(f"error: --junit {tmp_path} is a folder")


def test_missing_zoo_file_exits_2(tmp_path):
    result = invoke(tmp_path / "nosuch.toml")
    assert result.exit_code == 2 and result.output.strip() == f"error: zoo file not found: {tmp_path / 'nosuch.toml'}"


@pytest.mark.parametrize("text, fragment", [
    ('[[models]]\npath = "good.onnx"\nsample = "three"\n', "model 1: sample"),
    ('[[models]]\npath = "good.onnx"\nseed = "abc"\n', "model 1: seed"),
    ('[[models]]\npath = "good.onnx"\nlayers = [1, 2]\n', "model 1: layers"),
    ('[[models]]\npath = "good.onnx"\nimages = 5\n', "model 1: images"),
    ('[defaults]\ntolerance = "tight"\n[[models]]\npath = "good.onnx"\n', "model 1: tolerance"),
    ('[[models]]\npath = "good.onnx"\nrandomize = "yes"\n', "model 1: randomize"),
    ('[[models]]\npath = "good.onnx"\n[[models]]\npath = "good.onnx"\nname = 7\n', "model 2: name"),
    ('[[models]]\npath = "good.onnx"\nmean = {a = 1}\n', "model 1: mean"),
    ('[[models]]\npath = "good.onnx"\nsample = true\n', "model 1: sample"),
    ("a = " + "[" * 5000 + "]" * 5000 + "\n", "nested"),
    ('models = 3\n', "[[models]]"),
    ('[[models]]\npath = ["good.onnx"]\n', "needs path"),
], ids=["sample", "seed", "layers", "images", "defaults", "randomize", "name", "mean", "bool", "deep", "models-int",
        "path-list"])
def test_zoo_values_of_the_wrong_type_name_the_entry_and_key(folder, text, fragment):
    """Root cause 8: `sample = "three"` and friends ended in internal errors."""
    result = invoke(write_zoo(folder, text))
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert fragment in lines[0], lines[0]


def test_a_zoo_error_names_the_zoo_files_key(tmp_path):
    """A model with dynamic height and width in a zoo without its input_shape: the error says the zoo entry's key,
    not the command line's --input-shape (issue 28)."""
    from onnx import TensorProto, helper

    weight = numpy_helper.from_array(np.ones((2, 3, 3, 3), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["input", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, "h", "w"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    zoo = tmp_path / "zoo.toml"
    zoo.write_text('[[models]]\npath = "m.onnx"\n')
    [result] = run_zoo(read_zoo(zoo))
    assert "input_shape = [1, C, H, W]" in result.error and "--input-shape" not in result.error
