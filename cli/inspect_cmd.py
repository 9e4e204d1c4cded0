"""`fdsub inspect MODEL`: the layers, their receptive-field geometry and whether they decode."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from fdsub_onnx import Summary, inspect_model, load_model
from fdsub_onnx.cli._common import INPUT_SHAPE, MODEL, parse_input_shape, spinner


def inspect(
    model: str = MODEL,
    input_shape: Optional[str] = INPUT_SHAPE,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """List the layers of MODEL with stride, receptive field and origin, and whether each can be decoded."""
    shape = parse_input_shape(input_shape)
    with spinner(f"loading {model}"):
        summary = inspect_model(load_model(model, shape))
    if as_json:
        typer.echo(json.dumps(summary.to_json(), indent=2))
    else:
        _print_table(summary)


def _print_table(summary: Summary) -> None:
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    table = Table(title=f"input {summary.input_name!r} {list(summary.input_shape)}", title_justify="left")
    modules = any(layer.module for layer in summary.layers)  # dynamo exports: tensor names say little
    columns = ("layer", "node", *(("module",) if modules else ()), "op", "channels", "stride", "receptive field",
               "origin", "decodable")
    for column in columns:
        table.add_column(column, overflow="fold")
    for layer in summary.layers:
        table.add_row(
            layer.name, layer.node, *((_text(layer.module),) if modules else ()), layer.op, _text(layer.channels),
            _pair(layer.stride, "x"), _pair(layer.receptive_field, "x"), _pair(layer.origin, ","),
            ("per position (after an upsampling)" if layer.per_position else "yes") if layer.decodable
            else f"no: {layer.reason}",
        )
    console.print(table, highlight=False)
    decodable = sum(layer.decodable for layer in summary.layers)
    console.print(f"{decodable} of {len(summary.layers)} layers decodable", highlight=False)
    if summary.held:
        kinds = sorted({h["kind"] for h in summary.held})
        console.print(f"note: weights mode holds {len(summary.held)} data-dependent factors ({', '.join(kinds)}) at "
                      "their value on the all-zeros input (the dataset mean after normalization); "
                      "`fdsub decode --gate-reference IMAGES` holds them at their mean over IMAGES", highlight=False)


def _pair(values, sep: str) -> str:
    return "-" if values is None else sep.join(str(v) for v in values)


def _text(value) -> str:
    return "-" if value is None else str(value)
