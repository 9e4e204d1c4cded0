"""What the commands share: the --input-shape option and the progress spinner."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.status import Status

from fdsub_onnx import FdsubError

INPUT_SHAPE = typer.Option(
    None, "--input-shape", metavar="N,C,H,W",
    help="Input size for models with dynamic height/width, e.g. 1,3,224,224.",
)


def parse_input_shape(text: str | None) -> tuple[int, ...] | None:
    """'1,3,224,224' -> (1, 3, 224, 224); None stays None; a clear error otherwise."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise FdsubError(f"--input-shape must be four positive integers N,C,H,W such as 1,3,224,224; got {text!r}")
    return shape


@contextmanager
def spinner(message: str) -> Iterator[Status]:
    """A spinner on stderr while the block runs (shown only on a terminal)."""
    with Console(stderr=True).status(message) as status:
        yield status
