"""Results print as one screen in a notebook or a REPL: what they hold, not their arrays (issue 28)."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
from PIL import Image

import fdsub_onnx as fd

DEMO = Path(__file__).resolve().parents[2] / "models" / "demo.onnx"


def test_results_print_in_one_screen_without_their_arrays():
    model = fd.load_model(str(DEMO))
    layer = [lay.name for lay in fd.inspect_model(model).layers if lay.decodable][2]
    images = fd.open_images("builtin:blobs:8", model.input_shape[1:])
    shown = [fd.decode(model, layer), fd.capture_top(model, layer, images, top=3),
             fd.decode(model, layer, mode="local", images=images, top=2, neurons="0-1", per_instance=True),
             fd.diff(model, model)]
    for result in shown:
        text = repr(result)
        assert len(text.splitlines()) <= 20 and "array(" not in text and "..." not in text.splitlines()[-1][:3], text
        assert layer in text or "DiffReport" in text


def test_results_show_a_table_and_their_filters_in_a_notebook():
    """``_repr_html_``: a summary table, and for filters an inline PNG grid of at most 32 (one screen)."""
    model = fd.load_model(str(DEMO))
    layers = [lay for lay in fd.inspect_model(model).layers if lay.decodable]
    layer = layers[2].name
    images = fd.open_images("builtin:blobs:8", model.input_shape[1:])
    decoded = fd.decode(model, layers[-2].name)
    comparison = fd.compare_layers(model, [layers[2]], [np.arange(4)], images, modes=("weights",))[0]
    shown = {"Decoded": decoded, "TopN": fd.capture_top(model, layer, images, top=3),
             "DiffReport": fd.diff(model, model), "LayerComparison": comparison}
    for name, result in shown.items():
        page = result._repr_html_()
        assert page.startswith(f"<b>{name}(") and "<table>" in page or name == "LayerComparison", (name, page[:200])
        assert len(repr(result).splitlines()) <= 20, repr(result)
        for data in re.findall(r'src="data:image/png;base64,([^"]+)"', page):
            grid = Image.open(io.BytesIO(base64.b64decode(data)))
            assert grid.width * grid.height <= 1024 * 1024, (name, grid.size)
    assert len(decoded.neurons) > 32 and "first 32 of" in shown["Decoded"]._repr_html_()
    assert 'src="data:image/png;base64,' in shown["LayerComparison"]._repr_html_()
