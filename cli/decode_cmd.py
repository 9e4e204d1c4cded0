"""`fdsub decode MODEL --layer NAME`: decode neurons into image-space filters, saved as npz and PNG."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import typer

import fdsub_onnx
from fdsub_onnx import FdsubError, load_model, save_decoded
from fdsub_onnx.cli._common import INPUT_SHAPE, parse_input_shape, spinner

DEFAULT_OUT = Path("fdsub-out")


def decode(
    model: str = typer.Argument(..., metavar="MODEL", help="The .onnx file.", show_default=False),
    layer: str = typer.Option(
        ..., "--layer", "-l", show_default=False,
        help="Output tensor name of the layer (node names work too); `fdsub inspect` lists them.",
    ),
    neurons: Optional[str] = typer.Option(
        None, "--neurons", "-n", metavar="SPEC", help="Neurons to decode, e.g. 0,5,10-20.  [default: all]",
    ),
    mode: str = typer.Option("weights", "--mode", help="Decoding mode: weights (data-free)."),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", metavar="DIR", help="Output folder.  [default: fdsub-out/<layer>]",
    ),
    input_shape: Optional[str] = INPUT_SHAPE,
    dtype: str = typer.Option("float32", "--dtype", help="float32 or float64."),
) -> None:
    """Decode neurons of a layer of MODEL into filters over the image; write DIR/decoded.npz and DIR/filters.png."""
    shape = parse_input_shape(input_shape)
    if out is not None and out.exists() and not out.is_dir():
        raise FdsubError(f"--out {out} is a file; give a folder")
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
