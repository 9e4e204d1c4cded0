"""`fdsub decode MODEL --layer NAME`: decode neurons into image-space filters, saved as npz and PNG."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import typer

import fdsub_onnx
from fdsub_onnx import load_model, save_decoded
from fdsub_onnx.cli._common import INPUT_SHAPE, LAYER, MODEL, NEURONS, check_out_dir, parse_input_shape, spinner

DEFAULT_OUT = Path("fdsub-out")


def decode(
    model: str = MODEL,
    layer: str = LAYER,
    neurons: Optional[str] = NEURONS,
    mode: str = typer.Option("weights", "--mode", help="Decoding mode: weights (data-free)."),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", metavar="DIR", help="Output folder.  [default: fdsub-out/<layer>]",
    ),
    input_shape: Optional[str] = INPUT_SHAPE,
    dtype: str = typer.Option("float32", "--dtype", help="float32 or float64."),
) -> None:
    """Decode neurons of a layer of MODEL into filters over the image; write DIR/decoded.npz and DIR/filters.png."""
    shape = parse_input_shape(input_shape)
    check_out_dir(out)
    with spinner(f"loading {model}") as status:
        loaded = load_model(model, shape)
        status.update(f"decoding {layer}")
        result = fdsub_onnx.decode(loaded, layer, neurons=neurons, mode=mode, dtype=dtype)
        status.update("writing results")
        paths = save_decoded(result, out if out is not None else DEFAULT_OUT / sanitize(result.layer))
    k, c, ry, rx = result.filters.shape
    sy, sx = result.stride
    typer.echo(
        f"decoded {k} neuron{'s' if k != 1 else ''} of layer {result.layer!r} ({result.mode} mode): "
        f"filters [{k}, {c}, {ry}, {rx}], stride {sy}x{sx}, origin {','.join(map(str, result.origin))}"
    )
    for path in paths:
        typer.echo(f"  {path}")


def sanitize(name: str) -> str:
    """A tensor name as a safe folder name: runs of other characters become '_'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "layer"
