"""`fdsub inspect MODEL`: the layers, their receptive-field geometry and whether they decode."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

import fdsub_onnx
from fdsub_onnx.cli._common import INPUT_SHAPE, MODEL, parse_input_shape, spinner, stdout_console


def inspect(
    model: str = MODEL,
    input_shape: Optional[str] = INPUT_SHAPE,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """List the layers of MODEL with stride, receptive field and origin, and whether each can be decoded."""
    shape = parse_input_shape(input_shape)
    with spinner(f"loading {model}"):
        summary = fdsub_onnx.inspect_model(fdsub_onnx.load_model(model, shape))
    if as_json:
        typer.echo(json.dumps(summary.to_json(), indent=2))
    else:
        _print_table(summary)


def _print_table(summary) -> None:
    """The layer table. Names are never split (they are what --layer takes, to be copied whole): when they do not
    fit the terminal the table is drawn wider and the terminal wraps its lines."""
    console = stdout_console()
    modules = any(layer.module for layer in summary.layers)  # dynamo exports: tensor names say little
    headers = ("layer", "node", *(("module",) if modules else ()), "op", "channels", "stride", "receptive field",
               "origin", "decodable")
    rows = [(layer.name, layer.node, *((_text(layer.module),) if modules else ()), layer.op, _text(layer.channels),
             _pair(layer.stride, "x"), _pair(layer.receptive_field, "x"), _pair(layer.origin, ","),
             (_per_position(layer) if layer.per_position else "yes") if layer.decodable
             else f"no: {layer.reason}") for layer in summary.layers]
    table = Table(title=Text(f"input {summary.input_name!r} {list(summary.input_shape)}"), title_justify="left")
    for column in headers[:-1]:
        table.add_column(column, no_wrap=True)
    table.add_column(headers[-1], overflow="fold")
    for row in rows:
        table.add_row(*(Text(v) for v in row))
    whole = [max(cell_len(v) for v in column) for column in zip(headers, *rows)]
    words = max(cell_len(word) for row in rows for word in row[-1].split()) if rows else 0
    needed = sum(whole[:-1]) + max(words, len(headers[-1])) + 3 * len(headers) + 1  # borders and padding
    if needed > console.width:
        console = Console(width=needed, highlight=False, file=console.file)
    console.print(table)
    decodable = sum(layer.decodable for layer in summary.layers)
    console.print(Text(f"{decodable} of {len(summary.layers)} layers decodable"))
    if summary.held:
        kinds = sorted({h["kind"] for h in summary.held})
        console.print(Text(f"note: weights mode holds {len(summary.held)} data-dependent factors ({', '.join(kinds)}) "
                           "at their value on the all-zeros input (the dataset mean after normalization); "
                           "`fdsub decode --gate-reference IMAGES` holds them at their mean over IMAGES"))
    if summary.dequantized:
        console.print(Text(f"note: {fdsub_onnx.dequantized_note(summary.dequantized)}"))


def _pair(values, sep: str) -> str:
    return "-" if values is None else sep.join(str(v) for v in values)


def _text(value) -> str:
    return "-" if value is None else str(value)


def _per_position(layer) -> str:
    """Why a layer decodes one position at a time: tokens of a patch grid, or the node after which it does."""
    if layer.patch_grid:
        extra, rows, columns = layer.patch_grid
        return f"per token ({rows}x{columns} patches" + (f" + {extra} before them)" if extra else ")")
    return f"per position (after {(layer.reason or 'an upsampling').split(':')[0]})"
