"""Fixtures the command-line tests share."""

from __future__ import annotations

import numpy as np
import pytest
from mutations import base_model  # tests/helpers is on sys.path (tests/conftest.py)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small valid model (``net.onnx``, layers c1, c2) and six random images (``images.npy``), per module."""
    folder = tmp_path_factory.mktemp("cli")
    (folder / "net.onnx").write_bytes(base_model().SerializeToString())
    np.save(folder / "images.npy", np.random.default_rng(1).random((6, 3, 16, 16)).astype(np.float32))
    return folder


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    """Errors as a user sees them: one line, no traceback (``FDSUB_DEBUG`` unset)."""
    monkeypatch.delenv("FDSUB_DEBUG", raising=False)
