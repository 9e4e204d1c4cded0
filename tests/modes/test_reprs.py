"""Results print as one screen in a notebook or a REPL: what they hold, not their arrays (issue 28)."""

from __future__ import annotations

from pathlib import Path

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
