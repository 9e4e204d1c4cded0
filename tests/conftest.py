"""Shared pytest setup: `import netgen` (and the other helpers) from tests/helpers, a model loader, hypothesis profiles.

Hypothesis profiles: "ci" (the default, few examples, whole suite stays fast) and "dev"
(more examples); pick one with HYPOTHESIS_PROFILE=dev.
"""

from __future__ import annotations

import os
import sys

import pytest
from hypothesis import HealthCheck, settings

from fdsub_onnx.compose import backend

TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers")
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

settings.register_profile("ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def load(tmp_path_factory):
    """``load(proto, input_shape=None)``: save a ModelProto to a fresh folder, return ``load_model`` of it.

    Session-scoped so that hypothesis tests may use it.
    """

    from checks import load_proto  # importable once TESTS is on sys.path

    def _load(proto, input_shape=None):
        return load_proto(proto, tmp_path_factory.mktemp("model"), input_shape)

    return _load


@pytest.fixture(autouse=True)
def split_all_work(monkeypatch):
    """Tests' networks are small: ``on_cores`` would run them in one piece (``SPLIT_BYTES``); splitting every
    piece of work keeps the multi-core path of each caller under test (a piece's rows, its bounds)."""
    monkeypatch.setattr(backend, "SPLIT_BYTES", 0)
