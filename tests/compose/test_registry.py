"""The op registry: every op is one class holding every reading of it (``compose/ops``), and nothing else names
an op type.

An op class gives each reading of ``READINGS`` or refuses it with a reason (``OpRule.refuses``), the message the
reading raises; a toy op defined here, in one place, decodes in ``weights`` and ``local`` mode with the identities
holding against onnxruntime; no module outside ``compose/ops/`` and ``graph/`` has a string literal that is a
registered op type.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest
from checks import assert_identity, assert_instance_identity, random_images
from netgen import NetBuilder, run_ort

import fdsub_onnx as fd
from fdsub_onnx.compose.ops import READINGS, RULES, OpRule
from fdsub_onnx.compose.ops._rule import data, no_bias
from fdsub_onnx.errors import NotDecodable

PACKAGE = Path(fd.__file__).resolve().parent
#: where op types may be named: the op modules, and the graph's preparation, patterns and validation
OP_PLACES = ("compose/ops/", "graph/")


@pytest.mark.parametrize("name", sorted(RULES))
def test_every_op_gives_or_refuses_every_reading(name):
    op = RULES[name]
    for reading in READINGS:
        if op.implements(reading):
            continue
        reason = op.refuses.get(reading)
        assert reason, f"{name}: reading {reading!r} neither implemented nor refused with a reason"
        with pytest.raises(NotDecodable, match=re.escape(reason)):
            getattr(op, reading)(None, [], [], None, None) if reading != "apply" else op.apply(None, [], None)


def test_the_registry_is_its_classes():
    """One instance per class, under the class's name; family bases are not ops."""
    for name, op in RULES.items():
        assert type(op).__name__ == name
    assert not {"OpRule", "Nonlinear", "Elementwise", "Slope", "Arithmetic"} & set(RULES)


def test_no_module_outside_the_ops_names_an_op_type():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith(OP_PLACES):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in RULES:
                found.append(f"{rel}:{node.lineno}: {node.value!r}")
    assert not found, "op types named outside compose/ops and graph:\n" + "\n".join(found)


def _toy_net(seed=0):
    """conv -> Neg -> ReLU -> conv: Neg is an ONNX op the package has no class for."""
    b = NetBuilder(height=9, width=9, seed=seed)
    x = b.conv("input", 3, 3)
    c, h, w = b.shapes[x]
    neg = b._node("Neg", [x], (c, h, w))
    last = b.conv(b.relu(neg), 2, 3)
    return b.build([last]), last


def test_a_toy_op_is_one_class(load, monkeypatch):
    """Before its class Neg is refused; defining the class (here, in one place) makes it decodable in weights and
    local mode, exactly."""
    proto, last = _toy_net()
    model = load(proto)
    assert not {lay.name: lay for lay in fd.inspect_model(model).layers}[last].decodable
    monkeypatch.setitem(RULES, "Neg", None)  # taken out again after the test

    class Neg(OpRule):
        linear = True
        cone = "aligned"

        def apply(self, node, inputs, ctx):
            x = data(inputs[0])
            return x.derive(bank=ctx.engine.affine(x.bank, np.full(x.channels, -1.0), np.zeros(x.channels)))

        def backward(self, node, ins, is_data, out, grad):
            return [-grad], no_bias(grad)

    assert isinstance(RULES["Neg"], Neg)
    assert all(RULES["Neg"].implements(reading) for reading in READINGS)
    model = load(proto)
    images = random_images(model, 6, seed=3)
    weights = fd.decode(model, last, dtype="float64")
    linear = proto  # no nonlinearity below the last conv but the ReLU, which weights mode reads as the identity
    from zoo import linearized

    assert_identity(weights, run_ort(linearized(linear, {}, {}), images, [last])[last], images, rtol=1e-6)
    local = fd.decode(model, last, mode="local", images=fd.ArrayImages(images), top=3, per_instance=True,
                      dtype="float64")
    assert_instance_identity(local, run_ort(proto, images, [last])[last], images, rtol=1e-6)
