"""Layers by the names a user sees: a tensor, a node, or the module the exporter recorded (the column `inspect`
shows: dynamo exports name their tensors ``getitem_6``), and suggestions ranked across all three (issue 28)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

import fdsub_onnx as fd
from fdsub_onnx.cli.main import app

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="module")
def exports():
    """The same torch network exported by the TorchScript and the dynamo exporter."""
    return {tag: fd.load_model(str(FIXTURES / f"exporter_pair.{tag}.onnx")) for tag in ("ts", "dynamo")}


@pytest.mark.parametrize("module, ts, dynamo", [
    ("block.3", "/block/block.3/Conv_output_0", "conv2d_5"),
    ("se.1", "/se/se.1/Conv_output_0", "conv2d_2"),
    ("head", "logits", "logits"),
])
def test_a_module_name_finds_the_same_layer_in_both_exports(exports, module, ts, dynamo):
    """The dynamo export records the module of each node; the TorchScript export writes it into the node names
    (``/block/block.3/Conv``): the module name finds the layer in both."""
    assert fd.find_layer(exports["ts"], module).output[0] == ts
    assert fd.find_layer(exports["dynamo"], module).output[0] == dynamo


def test_a_nested_module_path_is_read_from_torchscript_node_names(tmp_path):
    """TorchScript names a module's node by each level's attribute (``/layer4/layer4.1/conv2/Conv``): its module is
    ``layer4.1.conv2``."""
    from onnx import helper

    from fdsub_onnx.graph.model import module_path

    node = helper.make_node("Conv", ["x", "w"], ["y"], name="/layer4/layer4.1/conv2/Conv")
    assert module_path(node) == "layer4.1.conv2"
    assert module_path(helper.make_node("Conv", ["x", "w"], ["y"], name="/stem/stem.0/Conv")) == "stem.0"
    assert module_path(helper.make_node("Conv", ["x", "w"], ["y"], name="conv_1")) is None


def test_suggestions_are_ranked_across_tensor_node_and_module_names(exports):
    with pytest.raises(fd.FdsubError, match=r"no layer named 'block.2'.*did you mean.*'block.3'"):
        fd.find_layer(exports["dynamo"], "block.2")
    with pytest.raises(fd.FdsubError, match=r"no layer named 'conv2d_9'.*did you mean.*'conv2d_5'"):
        fd.find_layer(exports["dynamo"], "conv2d_9")


def test_the_cli_takes_a_module_name(exports, tmp_path):
    result = CliRunner().invoke(app, ["decode", str(FIXTURES / "exporter_pair.dynamo.onnx"), "--layer", "block.3",
                                      "-n", "0-1", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "conv2d_5" in result.output
    diff = CliRunner().invoke(app, ["diff", str(FIXTURES / "exporter_pair.ts.onnx"),
                                    str(FIXTURES / "exporter_pair.dynamo.onnx"), "--layers", "block.3", "--json"])
    assert diff.exit_code == 0, diff.output
    assert '"layer_b": "conv2d_5"' in diff.stdout
