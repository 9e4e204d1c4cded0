"""Model validation at load (graph/validate.py): a broken file is refused with one line naming the tensor, node or
field at fault, before any NumPy work; odd names load and read well."""

from __future__ import annotations

import os
import threading

import numpy as np
import onnx
import pytest
from mutations import ACCEPTED, LAYERS, REFUSED, base_model

import fdsub_onnx as fd
from fdsub_onnx import FdsubError


def _save(tmp_path, proto, name="model.onnx"):
    path = tmp_path / name
    path.write_bytes(proto.SerializeToString())
    return path


def test_the_base_model_loads_and_decodes(tmp_path):
    model = fd.load_model(_save(tmp_path, base_model()))
    assert [layer.name for layer in fd.inspect_model(model).layers] == list(LAYERS)
    assert fd.decode(model, "c2").filters.shape == (6, 3, 8, 8)


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_broken_model_is_refused_naming_what_is_wrong(tmp_path, case):
    make, fragment = REFUSED[case]
    path = _save(tmp_path, make())
    with pytest.raises(FdsubError) as info:
        fd.inspect_model(fd.load_model(path))
    message = str(info.value)
    assert fragment in message and "\n" not in message, message
    assert str(path) in message, message


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_odd_but_valid_models_load(tmp_path, case):
    model = fd.load_model(_save(tmp_path, ACCEPTED[case]()))
    layers = fd.inspect_model(model).layers
    assert all(isinstance(layer.name, str) and isinstance(layer.node, str) for layer in layers)
    assert [layer.decodable for layer in layers] == [True, True, True]


def test_a_non_utf8_name_is_shown_escaped_and_usable_as_a_layer(tmp_path):
    model = fd.load_model(_save(tmp_path, ACCEPTED["non_utf8_name"]()))
    name = fd.inspect_model(model).layers[0].name
    assert name == "feat\\xffone"
    assert fd.decode(model, name).filters.shape == (4, 3, 3, 3)


def test_non_finite_weights_are_listed(tmp_path):
    model = fd.load_model(_save(tmp_path, ACCEPTED["nan_weight"]()))
    assert [name for name, *_ in fd.nonfinite_weights(model)] == ["w1"]
    assert fd.nonfinite_weights(fd.load_model(_save(tmp_path, base_model(), "ok.onnx"))) == []


def test_a_fifo_is_refused_without_opening_it(tmp_path):
    """Opening a FIFO for reading blocks until a writer comes: the loader must not open it."""
    fifo = tmp_path / "model.onnx"
    os.mkfifo(fifo)
    outcome = []

    def load():
        try:
            fd.load_model(fifo)
        except FdsubError as exc:
            outcome.append(str(exc))

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():  # unblock the reader so the test process can end
        with open(fifo, "wb"):
            pass
        thread.join(5)
        pytest.fail("load_model blocked on a FIFO")
    assert outcome and "not a regular file" in outcome[0]


def test_a_huge_declared_input_inspects_without_allocating(tmp_path):
    """Geometry is arithmetic: a 100000 x 100000 input must not make any array of its size."""
    proto = base_model()
    for dim, value in zip(proto.graph.input[0].type.tensor_type.shape.dim, (1, 3, 100000, 100000)):
        dim.dim_value = value
    proto.graph.node.append(onnx.helper.make_node("GlobalAveragePool", ["c2"], ["gap"], name="gap"))
    del proto.graph.output[:]
    proto.graph.output.append(onnx.helper.make_tensor_value_info("gap", onnx.TensorProto.FLOAT, [1, 6, 1, 1]))
    path = _save(tmp_path, proto)
    import tracemalloc

    tracemalloc.start()
    summary = fd.inspect_model(fd.load_model(path))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [layer.receptive_field for layer in summary.layers][:3] == [[3, 3], [4, 4], [8, 8]]
    assert summary.layers[3].receptive_field == [8 + 49997 * 2] * 2  # c2: stride 2, a 49998-wide map
    assert peak < 256 << 20, f"inspect allocated {peak / 2**20:.0f} MiB"


def test_checker_failure_is_one_line(tmp_path):
    proto = base_model()
    proto.graph.node[1].input[0] = "nowhere"
    with pytest.raises(FdsubError, match="nowhere") as info:
        fd.load_model(_save(tmp_path, proto))
    assert "\n" not in str(info.value)


def test_int64_shape_constants_stay_accepted(tmp_path):
    """Integer tensors where ONNX wants them (a Reshape's shape) are not 'int weights in a float graph'."""
    proto = base_model()
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.array([1, -1], np.int64), "shape"))
    proto.graph.node.append(onnx.helper.make_node("Reshape", ["c2", "shape"], ["flat"], name="flatten"))
    del proto.graph.output[:]
    proto.graph.output.append(onnx.helper.make_tensor_value_info("flat", onnx.TensorProto.FLOAT, [1, 216]))
    fd.load_model(_save(tmp_path, proto))


def test_auto_pad_with_pads_is_refused(tmp_path):
    """The ONNX specification forbids pads beside an auto_pad other than NOTSET; inspect accepted such a Conv
    (issue 28)."""
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((2, 3, 3, 3), np.float32), "w")
    node = helper.make_node("Conv", ["input", "w"], ["y"], auto_pad="SAME_UPPER", pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    with pytest.raises(fd.FdsubError, match="both auto_pad SAME_UPPER and pads"):
        fd.load_model(str(tmp_path / "m.onnx"))
