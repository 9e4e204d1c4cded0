"""What the commands share: the --input-shape and --cluster options, the progress spinner and the progress bar."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.status import Status
from rich.text import Text

import fdsub_onnx
from fdsub_onnx import FdsubError

MODEL = typer.Argument(..., metavar="MODEL", help="The .onnx file.", show_default=False)
NEURONS = typer.Option(None, "--neurons", "-n", metavar="SPEC", help="Neurons, e.g. 0,5,10-20.  [default: all]")
LAYER = typer.Option(
    ..., "--layer", "-l", show_default=False,
    help="Output tensor name of the layer (node names work too); `fdsub inspect` lists them.",
)
IMAGES = typer.Option(
    ..., "--images", "-i", metavar="SPEC", show_default=False,
    help="Images: a .npy/.npz array [N, C, H, W], a folder of JPEG/PNG, or builtin:glyphs|gratings|blobs.",
)
PRESET = typer.Option("raw", "--preset", help="Preprocessing: raw, torchvision, caffe or tf.")
MEAN = typer.Option(None, "--mean", metavar="M[,M,M]", help="Subtracted after --scale (overrides the preset).")
STD = typer.Option(None, "--std", metavar="S[,S,S]", help="Divided by after --mean (overrides the preset).")
SCALE = typer.Option(None, "--scale", help="Multiplies the 0-1 pixel values first (overrides the preset).")
BGR = typer.Option(None, "--bgr/--rgb", help="Channel order (overrides the preset).", show_default=False)
DEVICE = typer.Option("auto", "--device", help="cpu, gpu, or auto: the GPU when CuPy sees one, else the CPU.")
CLUSTER = typer.Option(
    None, "--cluster", metavar="local:N|tcp://HOST:PORT",
    help="Run the passes over the images on a Dask cluster: N worker processes here, or a running scheduler "
         "(pip install 'fdsub-onnx[dask]'); same results as one process.",
)


def device_for(name: str):
    """Resolve --device before any work (``--device gpu`` without a usable GPU is a one-line error)."""
    return fdsub_onnx.resolve_device(name)


def note_device(device) -> None:
    """After a successful run: one line on stderr saying why it ran (partly) on the CPU, if it did."""
    if device.notice:
        typer.echo(f"note: {device.notice}", err=True)


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


def check_out_dir(out) -> None:
    """Refuse an --out that names a file, before any work."""
    if out is not None and out.exists() and not out.is_dir():
        raise FdsubError(f"--out {out} is a file; give a folder")


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


@contextmanager
def spinner(message: str) -> Iterator[Status]:
    """A spinner on stderr while the block runs (shown only on a terminal)."""
    with Console(stderr=True).status(message) as status:
        yield status


class _Rate(ProgressColumn):
    """Items (images, layers) per second since the bar appeared (a resumed run does not count what it skipped)."""

    def render(self, task) -> Text:
        done = task.completed - task.fields.get("first", 0)
        elapsed = task.elapsed or 0.0
        rate = f"{done / elapsed:,.1f}" if elapsed > 0 and done > 0 else "-"
        return Text(f"{rate} {task.fields.get('unit', 'images')}/s")


@contextmanager
def progress_bar(description: str, unit: str = "images") -> Iterator[Callable[[int, int], None]]:
    """A ``progress(done, total)`` callback drawing a bar on stderr, started at its first call.

    Starting late keeps errors raised before any work to their one line.
    """
    progress = None
    task = None

    def update(done: int, total: int) -> None:
        nonlocal progress, task
        if progress is None:
            progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _Rate(),
                TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
            )
            progress.start()
            task = progress.add_task(description, total=total, completed=done, first=done, unit=unit)
        progress.update(task, completed=done, total=total)

    try:
        yield update
    finally:
        if progress is not None:
            progress.stop()
