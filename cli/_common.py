"""What the commands share: their options (--cluster among them), output folders, warnings, the Dask client,
the spinner and the progress bar.

Nothing here imports onnx: the library's names are looked up on ``fdsub_onnx`` when a command runs, so that
``--help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Column
from rich.text import Text

import fdsub_onnx
from fdsub_onnx import DEFAULT_BATCH, DEFAULT_SELECT, DEFAULT_TOP, DEFAULT_WEIGHTING, FdsubError

DEFAULT_OUT = Path("fdsub-out")
DATA_MODES = ("fds", "local", "deconvnet")
BAR_LABEL = 20  # characters of a progress bar's label: the bar fits 80 columns whatever the layer is called
UNITS = {"images": "img", "instances": "inst"}  # short names in the rate column

MODEL = typer.Argument(..., metavar="MODEL", help="The .onnx file.", show_default=False)
NEURONS = typer.Option(None, "--neurons", "-n", metavar="SPEC", help="Neurons, e.g. 0,5,10-20, or all.  [default: all]")
LAYER = typer.Option(
    ..., "--layer", "-l", metavar="NAME", show_default=False,
    help="Output tensor name of the layer (node names work too); `fdsub inspect` lists them.",
)
IMAGES_HELP = ("Images: a folder of JPEG/PNG, one image file, a .npy/.npz array [N, C, H, W], "
               "or builtin:glyphs|gratings|blobs[:N].")
IMAGES = typer.Option(..., "--images", "-i", metavar="SPEC", show_default=False, help=IMAGES_HELP)
PRESET = typer.Option("raw", "--preset", metavar="NAME", help="Preprocessing: raw, torchvision, caffe or tf.")
MEAN = typer.Option(None, "--mean", metavar="M[,M,M]", help="Subtracted after --scale (overrides the preset).")
STD = typer.Option(None, "--std", metavar="S[,S,S]", help="Divided by after --mean (overrides the preset).")
SCALE = typer.Option(None, "--scale", metavar="X", help="Multiplies the 0-1 pixel values first (overrides the preset).")
BGR = typer.Option(None, "--bgr/--rgb", help="Channel order (overrides the preset).", show_default=False)
DEVICE = typer.Option(
    None, "--device", metavar="cpu|gpu|auto",
    help="Where to compute; auto: the GPU when CuPy sees one, else the CPU.  [default: auto]",
)
BATCH_SIZE = typer.Option(DEFAULT_BATCH, "--batch-size", metavar="N", min=1, help="Images per onnxruntime run.")
SELECT = typer.Option(DEFAULT_SELECT, "--select", metavar="RULE",
                      help="fds: all, positive, max or topk:K lower neurons.")
WEIGHTING = typer.Option(DEFAULT_WEIGHTING, "--weighting", metavar="gate|activation",
                         help="fds: weight each lower neuron by its mean gate (slope) or its mean activation.")
INPUT_SHAPE = typer.Option(
    None, "--input-shape", metavar="N,C,H,W",
    help="Input size for models with dynamic height/width, e.g. 1,3,224,224.",
)
CLUSTER = typer.Option(
    None, "--cluster", metavar="ADDRESS",
    help="Run the passes over the images on a Dask cluster: local:N (N worker processes here) or "
         "tcp://HOST:PORT (a running scheduler); pip install 'fdsub-onnx[dask]'. Same results as one process.",
)


def top_option(help: str, default: int | None = DEFAULT_TOP):
    """``--top N`` (a positive integer), with its own help and default."""
    return typer.Option(default, "--top", metavar="N", min=1, help=help)


def out_option(default: str):
    """``--out DIR``, saying where results go without it."""
    return typer.Option(None, "--out", "-o", metavar="DIR", help=f"Output folder.  [default: {default}]")


# ---- devices ------------------------------------------------------------------------------------
def device_for(name: str | None):
    """Resolve --device before any work (``--device gpu`` without a usable GPU is a one-line error).

    Without --device it is ``auto``, quietly: the note that no GPU was found is for those who asked for one.
    """
    device = fdsub_onnx.resolve_device(name or "auto")
    return device if name is not None else dataclasses.replace(device, notice="")


def note_device(device) -> None:
    """After a successful run: one line on stderr saying why it ran (partly) on the CPU, if it did."""
    if device.notice:
        typer.echo(f"note: {device.notice}", err=True)


def warn(*texts: str | None) -> None:
    """``warning:`` lines on stderr, after the results: a failed run says only its one ``error:`` line."""
    for text in texts:
        if text:
            typer.echo(f"warning: {' '.join(text.split())}", err=True)


# ---- images ---------------------------------------------------------------------------------------
def preprocessing(preset: str, mean: str | None, std: str | None, scale: float | None, bgr: bool | None) -> dict:
    """The --preset/--mean/--std/--scale/--bgr options as keyword arguments of ``open_images``."""
    return {"preset": preset, "mean": _numbers("--mean", mean), "std": _numbers("--std", std), "scale": scale,
            "bgr": bgr}


def _numbers(option: str, text: str | None):
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise FdsubError(f"{option} takes one number or one per channel, such as 0.5 or 0.485,0.456,0.406; "
                         f"got {text!r}") from None


def load_with_images(model: str, layer: str, images: str, prep: dict, input_shape: tuple[int, ...] | None):
    """Load the model, resolve the layer's output tensor and open the image set (behind a spinner)."""
    with spinner(f"loading {model}"):
        loaded = fdsub_onnx.load_model(model, input_shape)
        target = fdsub_onnx.find_layer(loaded, layer).output[0]
        return loaded, target, fdsub_onnx.open_images(images, loaded.input_shape[1:], **prep)


def top_warning(top: int, images, per_image: int = 1) -> str | None:
    """When ``--top`` asks for more instances than the images hold (the rest of the slots stay empty)."""
    most = len(images) * per_image
    if top > most:
        return (f"--top {top} but the {len(images)} image(s) give at most {most} instance(s) per neuron "
                f"({per_image} per image); the other {top - most} slot(s) stay empty")
    return None


def nonfinite_warning(model, values, what: str) -> str | None:
    """A result holding NaN or Inf gets a warning naming the cause (NaN/Inf weights, or the images)."""
    values = np.asarray(values)
    bad = int(np.count_nonzero(~np.isfinite(values)))
    if not bad:
        return None
    weights = fdsub_onnx.nonfinite_weights(model)
    cause = (f"the model's weights hold NaN/Inf ({', '.join(repr(name) for name, *_ in weights[:3])}"
             f"{', ...' if len(weights) > 3 else ''}; `fdsub check` lists them)" if weights
             else "the images drive activations to NaN/Inf (check --preset, --mean, --std, --scale)")
    return f"{bad} value(s) of the {what} are NaN or Inf: {cause}"


def degenerate_warnings(model, decoded, fix: str) -> tuple[list[str], bool]:
    """Warnings naming the neurons whose filters are degenerate and why, and whether the composition overflowed
    (the result is unusable: the command exits 1; NaN weights are the model's, warned about only). ``fix``: what
    keeps the composition finite."""
    kinds = decoded.degenerate
    named = {kind: [str(int(n)) for n, k in zip(decoded.neurons, kinds) if k == kind] for kind in ("not finite",
                                                                                                   "all zero")}
    texts, overflow = [], False
    if named["not finite"]:
        weights = fdsub_onnx.nonfinite_weights(model)
        overflow = not weights and bool(np.isinf(decoded.filters).any() or np.isinf(decoded.bias).any() or (
            np.abs(decoded.filters[np.isfinite(decoded.filters)]).max(initial=0) > 1e30))
        cause = (nonfinite_warning(model, decoded.filters, "decoded filters") if weights else
                 f"the composition overflowed {decoded.filters.dtype} (values past "
                 f"{np.finfo(decoded.filters.dtype).max:.1e}); {fix}" if overflow else
                 "the images drive activations to NaN (check --preset, --mean, --std, --scale)")
        texts.append(f"{plural(len(named['not finite']), 'filter')} of {decoded.layer!r} not finite (neurons "
                     f"{_listed(named['not finite'])}): {cause}")
    if named["all zero"]:
        texts.append(f"{plural(len(named['all zero']), 'filter')} of {decoded.layer!r} all zero (neurons "
                     f"{_listed(named['all zero'])}): nothing of the layers below was kept (--select)")
    return texts, overflow


def _listed(names: list[str], most: int = 8) -> str:
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")


# ---- output folders --------------------------------------------------------------------------------
def output_folder(out: Path | None, default: str, kind: str) -> Path:
    """``--out``, or ``fdsub-out/<default>``; refused before any work when a result of ``kind`` cannot go there
    (a file, or another command's result)."""
    folder = out if out is not None else DEFAULT_OUT / default
    if out is not None and str(out) == "":
        raise FdsubError("--out is empty; give a folder")
    fdsub_onnx.check_result_folder(folder, kind)
    return folder


def sanitize(name: str) -> str:
    """A tensor name as a safe folder name: runs of other characters become '_'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "layer"


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


# ---- progress --------------------------------------------------------------------------------------
@contextmanager
def spinner(message: str) -> Iterator[Callable[[str], None]]:
    """A spinner on stderr while the block runs (shown only on a terminal); yields ``say(text)`` to change its
    message. Messages are plain text: a path or layer name holding ``[/]`` is not markup."""
    with Console(stderr=True).status(Text(message)) as status:
        yield lambda text: status.update(Text(text))


@contextmanager
def cluster(spec: str | None) -> Iterator[object]:
    """The Dask client of --cluster for the block (None without the option), closed after it."""
    if spec is None:
        yield None
        return
    with spinner(f"starting {spec}" if spec.startswith("local:") else f"connecting to {spec}"):
        client = fdsub_onnx.connect(spec)
    try:
        yield client
    finally:
        client.close()


class _Rate(ProgressColumn):
    """Items (images, layers) per second since the bar appeared (a resumed run does not count what it skipped)."""

    def render(self, task) -> Text:
        done = task.completed - task.fields.get("first", 0)
        elapsed = task.elapsed or 0.0
        rate = f"{done / elapsed:,.1f}" if elapsed > 0 and done > 0 else "-"
        unit = task.fields.get("unit", "images")
        return Text(f"{rate} {UNITS.get(unit, unit)}/s")


def _label(text: str) -> str:
    """At most BAR_LABEL characters: the end of a long layer name is what tells layers apart."""
    return text if len(text) <= BAR_LABEL else "…" + text[-(BAR_LABEL - 1):]


@contextmanager
def progress_bar(description: str, unit: str = "images",
                 console: Console | None = None) -> Iterator[Callable[[int, int], None]]:
    """A ``progress(done, total)`` callback drawing a bar on stderr (a terminal only), started at its first call.

    Starting late keeps errors raised before any work to their one line, and a pipe or log file gets no bar.
    The label is plain text (a layer named ``[/]`` is not markup) and cut so that the bar fits 80 columns.
    """
    progress = None
    task = None

    def update(done: int, total: int) -> None:
        nonlocal progress, task
        if progress is None:
            shown = console or Console(stderr=True)
            progress = Progress(
                TextColumn("{task.description}", markup=False, table_column=Column(no_wrap=True)),
                BarColumn(bar_width=12), MofNCompleteColumn(), _Rate(), TimeRemainingColumn(),
                console=shown, disable=not shown.is_terminal,
            )
            progress.start()
            task = progress.add_task(_label(description), total=total, completed=done, first=done, unit=unit)
        progress.update(task, completed=done, total=total)

    try:
        yield update
    finally:
        if progress is not None:
            progress.stop()


def plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def stdout_console() -> Console:
    """The console tables print on: the terminal's width, else $COLUMNS, else 160 columns (a pipe, a file)."""
    console = Console(highlight=False)
    if not console.is_terminal and not os.environ.get("COLUMNS", "").isdigit():
        console = Console(width=160, highlight=False)
    return console

