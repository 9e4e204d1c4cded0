"""What the commands share: their options (--cluster among them), output folders, warnings, the Dask client,
the spinner and the progress bar.

Nothing here imports onnx: the library's names are looked up on ``fdsub_onnx`` when a command runs, so that
``--help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    TextColumn,
)
from rich.table import Column
from rich.text import Text

import fdsub_onnx
from fdsub_onnx import DEFAULT_BATCH, DEFAULT_GRID, DEFAULT_SELECT, DEFAULT_TOP, DEFAULT_WEIGHTING, FdsubError

DEFAULT_OUT = Path("fdsub-out")
DATA_MODES = ("fds", "local", "deconvnet")
BAR_LABEL = 20  # characters of a progress bar's label: the bar fits 80 columns whatever the layer is called
UNITS = {"images": "img", "instances": "inst"}  # short names in the rate column

MODEL = typer.Argument(..., metavar="MODEL", help="The .onnx file.", show_default=False)
NEURONS = typer.Option(None, "--neurons", "-n", metavar="SPEC", help="Neurons, e.g. 0,5,10-20, or all.  [default: all]")
LAYER = typer.Option(
    ..., "--layer", "-l", metavar="NAME", show_default=False,
    help="The layer: its output tensor, its node, or its module (the names `fdsub inspect` lists).",
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
#: the largest count an option takes: past it a count overflows the 64-bit integers of NumPy and onnxruntime (a
#: count beyond what it counts is fine: a batch larger than the images is the images)
COUNT_MAX = 2**62


def count_limit(value):
    """A count past ``COUNT_MAX`` refused in one line (a callback, so that --help does not show the bound)."""
    if value is not None and value > COUNT_MAX:
        raise typer.BadParameter(f"{value} is more than any count this command takes (at most 2^62)")
    return value


BATCH_SIZE = typer.Option(DEFAULT_BATCH, "--batch-size", metavar="N", min=1, callback=count_limit,
                          help="Images per onnxruntime run.")
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


MEMORY_BUDGET = typer.Option(
    None, "--memory-budget", metavar="SIZE",
    help="Memory this command may use, e.g. 6G or 512M; a request over it is refused before any work.  "
         "[default: the smaller of 4 GiB and 60% of the memory available now]",
)
# --memory-budget is applied by cli.main.guarded around the whole command
PLAN = typer.Option(False, "--plan", help="Print the cost plan (peak memory and time of each stage) and exit.")
GRID = typer.Option(DEFAULT_GRID, "--grid", metavar="N", min=1, callback=count_limit,
                    help="Neurons drawn in the filters PNG: the first N decoded (decoded.npz holds them all).")


def top_option(help: str, default: int | None = DEFAULT_TOP):
    """``--top N`` (a positive integer), with its own help and default."""
    return typer.Option(default, "--top", metavar="N", min=1, callback=count_limit, help=help)


def out_option(default: str):
    """``--out DIR``, saying where results go without it."""
    return typer.Option(None, "--out", "-o", metavar="DIR", help=f"Output folder.  [default: {default}]")


# ---- budget and plan --------------------------------------------------------------------------
#: a plan longer than this says how to make it shorter (a newcomer's first `report` on ResNet50 planned 20 min)
LONG_PLAN_SECONDS = 300.0


def planned(plan: bool, cost, fix: str) -> bool:
    """With --plan: print the cost plan, and the command is done (True). Otherwise refuse, in one line and before
    any work, a plan over the memory budget (``fix``: the knobs that bring it under, and a long plan down)."""
    long = cost.seconds > LONG_PLAN_SECONDS
    if plan:
        for line in cost.lines():
            typer.echo(line)
        if long:
            typer.echo(f"note: about {cost.seconds / 60:.0f} min; to make it shorter: {fix}")
        return True
    cost.require(fix)
    if long:
        typer.echo(f"note: planned at about {cost.seconds / 60:.0f} min (--plan shows its stages); to make it "
                   f"shorter: {fix}", err=True)
    return False


# ---- devices ------------------------------------------------------------------------------------
def device_for(name: str | None):
    """Resolve --device before any work (``--device gpu`` without a usable GPU is a one-line error).

    Without --device it is ``auto``, quietly: the note that no GPU was found is for those who asked for one.
    """
    if name is not None and name.strip() not in ("cpu", "gpu", "auto"):
        raise FdsubError(f"--device must be cpu, gpu or auto, got {name!r}")
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


def grid_note(name: str, decoded, grid: int) -> str | None:
    """The note saying that the PNG ``name`` draws fewer of ``decoded``'s neurons than it holds, and how to see more
    (``--grid``, or nothing when PIL's image size limit is what stops it); None when it draws them all."""
    count, field = len(decoded.neurons), decoded.filters.shape[2:]
    shown = fdsub_onnx.grid_cells(count, field, grid)
    if shown == count:
        return None
    fit = fdsub_onnx.grid_cells(count, field)
    if fit > shown:
        return f"{name} shows {shown} of {count} neurons; --grid {fit} for more"
    return (f"{name} shows {shown} of {count} neurons: more cells of {field[0]}x{field[1]} pixels would pass PIL's "
            "image size limit (decoded.npz holds them all)")


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


def parse_count(text: str, option: str) -> int | str:
    """'200' -> 200, 'all' -> 'all'; a clear error otherwise."""
    if text.strip() == "all":
        return "all"
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise FdsubError(f"{option} must be a positive integer or all; got {text!r}")
    return count


# ---- progress --------------------------------------------------------------------------------------
# When stderr is a terminal, rich draws a spinner or a bar in place. Anywhere else (a pipe, `2>log`, CI) progress is
# plain lines: a stage's start, then at most one line every PROGRESS_INTERVAL seconds while it advances, then its end.
# A failed stage writes no end line: its `error:` line follows. A stage (spinner or bar) says nothing unless it runs
# past SPINNER_GRACE seconds, so that bad input found after a quick stage (the neurons, a result folder that cannot
# be written) still ends in its one `error:` line.
PROGRESS_INTERVAL = 10.0  # seconds between two plain progress lines of one stage
SPINNER_GRACE = 5.0  # seconds a stage runs before its first plain line (stderr not a terminal)


@contextmanager
def spinner(message: str, console: Console | None = None) -> Iterator[Callable[[str], None]]:
    """A spinner on stderr while the block runs; yields ``say(text)`` to change its message. Messages are plain text:
    a path or layer name holding ``[/]`` is not markup. Not on a terminal: plain lines (see ``_PlainSpinner``)."""
    shown = console or Console(stderr=True)
    if not shown.is_terminal:
        with _PlainSpinner(message, shown.file) as say:
            yield say
        return
    with shown.status(Text(message)) as status:
        yield lambda text: status.update(Text(text))


class _PlainSpinner:
    """A spinner as lines: ``loading m.onnx`` once it has run SPINNER_GRACE seconds, then what ``say`` tells at most
    every PROGRESS_INTERVAL seconds (the latest message), and ``loading m.onnx: done in 7.2 s`` when the block ends
    without an error. A block over within the grace writes nothing: a quick load followed by bad input still ends
    in one `error:` line."""

    def __init__(self, message: str, file):
        self.message, self.file = message, file
        self.pending: str | None = None
        self.started = self.last = 0.0
        self.shown = False
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.ticker = threading.Thread(target=self._tick, daemon=True)

    def __enter__(self) -> Callable[[str], None]:
        self.started = time.monotonic()
        self.ticker.start()
        return self.say

    def __exit__(self, kind, *_) -> None:
        self.stop.set()
        self.ticker.join()
        spent = time.monotonic() - self.started
        with self.lock:
            if kind is None and spent >= SPINNER_GRACE:
                self._start()
            if kind is None and self.shown:
                _line(self.file, f"{self.message}: done in {_duration(spent)}")

    def say(self, text: str) -> None:
        with self.lock:
            self.pending = text
            if self.shown and time.monotonic() - self.last >= PROGRESS_INTERVAL:
                self._flush()

    def _tick(self) -> None:
        if self.stop.wait(SPINNER_GRACE):
            return
        with self.lock:
            self._start()
            self._flush()
        while not self.stop.wait(max(PROGRESS_INTERVAL, 0.05)):
            with self.lock:
                self._flush()

    def _start(self) -> None:
        if not self.shown:
            self.shown = True
            self.last = time.monotonic()
            _line(self.file, self.message)

    def _flush(self) -> None:
        if self.pending is not None:
            self.last = time.monotonic()
            _line(self.file, self.pending)
            self.pending = None


def _line(file, text: str) -> None:
    """One plain progress line (no markup, no escape codes, no carriage return)."""
    print(" ".join(text.split()), file=file, flush=True)


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


def _count(value: float) -> str:
    """A count of units: whole as an integer, a fraction of steps (a report's passes) with one decimal."""
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def _rate(per_second: float) -> str:
    """Units per second, readable when slow: 12.3, 0.052 (never 0.0 while something advances)."""
    return f"{per_second:,.1f}" if per_second >= 1 else f"{per_second:.2g}"


def _duration(seconds: float) -> str:
    """26 s, 4 min 05 s, 1 h 05 min."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def _remaining(done: float, first: float, total: float, elapsed: float, estimate: float | None) -> float | None:
    """Seconds left: from the rate once something advanced, else from ``estimate`` (total seconds) while it has not
    run out, else unknown (not "ETA 0.0 s" while nothing has moved)."""
    if done > first and elapsed > 0:
        return (total - done) * elapsed / (done - first)
    if estimate is not None and elapsed < estimate:
        return estimate - elapsed
    return None


class _Done(ProgressColumn):
    """``done/total`` (fractions of steps shown, so that a slow step is seen to move)."""

    def render(self, task) -> Text:
        return Text("" if task.total is None else f"{_count(task.completed)}/{_count(task.total)}")


class _Rate(ProgressColumn):
    """Items (images, layers) per second since the bar appeared (a resumed run does not count what it skipped)."""

    def render(self, task) -> Text:
        done = task.completed - task.fields.get("first", 0)
        elapsed = task.elapsed or 0.0
        rate = _rate(done / elapsed) if elapsed > 0 and done > 0 else "-"
        unit = task.fields.get("unit", "images")
        return Text(f"{rate} {UNITS.get(unit, unit)}/s")


class _Remaining(ProgressColumn):
    """Time left: rich's own from the recent rate, else from the rate since the start or the caller's estimate."""

    def render(self, task) -> Text:
        left = task.time_remaining
        if left is None and task.total is not None:
            left = _remaining(task.completed, task.fields.get("first", 0), task.total, task.elapsed or 0.0,
                              task.fields.get("estimate"))
        if left is None:
            return Text("-:--:--", style="progress.remaining")
        minutes, seconds = divmod(int(left), 60)
        hours, minutes = divmod(minutes, 60)
        return Text(f"{hours}:{minutes:02d}:{seconds:02d}", style="progress.remaining")


def _label(text: str) -> str:
    """At most BAR_LABEL characters: the end of a long layer name is what tells layers apart."""
    return text if len(text) <= BAR_LABEL else "…" + text[-(BAR_LABEL - 1):]


@contextmanager
def progress_bar(description: str, unit: str = "images", console: Console | None = None,
                 estimate: float | None = None) -> Iterator[Callable[[int, int], None]]:
    """A ``progress(done, total)`` callback drawing a bar on stderr, started at its first call (or as a pulsing bar
    when none came SPINNER_GRACE seconds in: a bottom-up decode counts no steps).

    Starting late keeps errors raised before any work to their one line. The label is plain text (a layer named
    ``[/]`` is not markup) and cut so that the bar fits 80 columns. ``estimate``: the stage's expected seconds in
    all, if the caller can tell (a cost model), for the time left before the first units are done. Not on a
    terminal (a pipe, a log file): plain lines instead (``_PlainBar``).
    """
    shown = console or Console(stderr=True)
    if not shown.is_terminal:
        bar = _PlainBar(description, unit, estimate, shown.file)
        finished = False
        try:
            yield bar.update
            finished = True
        finally:
            bar.close(finished)
        return
    progress = task = None
    counted = False  # whether a callback came (the bar may have been opened by the timer, counting nothing)
    lock = threading.Lock()

    def open_bar(done, total) -> None:
        nonlocal progress, task
        progress = Progress(
            TextColumn("{task.description}", markup=False, table_column=Column(no_wrap=True)),
            BarColumn(bar_width=12), _Done(), _Rate(), _Remaining(), console=shown,
        )
        progress.start()
        task = progress.add_task(_label(description), total=total, completed=done, first=done, unit=unit,
                                 estimate=estimate)

    def update(done: int, total: int) -> None:
        nonlocal counted
        with lock:
            if progress is None:
                open_bar(done, total)
            elif not counted:  # opened by the timer: the rate counts from here
                progress.update(task, first=done)
            counted = True
            progress.update(task, completed=done, total=total)

    def waiting() -> None:  # no callback SPINNER_GRACE seconds in (a decode counting no steps): a pulsing bar
        with lock:
            if progress is None:
                open_bar(0, None)

    timer = threading.Timer(SPINNER_GRACE, waiting)
    timer.daemon = True
    timer.start()
    try:
        yield update
    finally:
        timer.cancel()
        with lock:
            if progress is not None:
                progress.stop()


class _PlainBar:
    """A progress bar as lines, once the stage has run SPINNER_GRACE seconds: ``fds statistics: 96/320 images, 12.3
    images/s, ETA 18 s``, again at most every PROGRESS_INTERVAL seconds, and ``..: 320/320 images in 26 s`` at the
    end. A quick stage says nothing, so bad input found after it (a result folder that cannot be written) still
    ends in one `error:` line. A stage that has counted nothing by then (a decode reporting no steps) is said as a
    spinner's."""

    def __init__(self, description: str, unit: str, estimate: float | None, file):
        self.description, self.unit, self.estimate, self.file = description, unit, estimate, file
        self.opened = time.monotonic()
        self.started: float | None = None  # the first call
        self.first = self.done = self.total = 0
        self.last = 0.0
        self.shown = self.counted = False  # a line said; a line with counts said
        self.lock = threading.Lock()
        self.timer = threading.Timer(SPINNER_GRACE, self._grace)
        self.timer.daemon = True
        self.timer.start()

    def update(self, done: int, total: int) -> None:
        with self.lock:
            now = time.monotonic()
            self.done, self.total = done, total
            if self.started is None:
                self.started, self.first = now, done
            if not self.shown and now - self.opened >= SPINNER_GRACE:
                self._show(now)
            elif self.shown and (not self.counted or now - self.last >= PROGRESS_INTERVAL):
                self.last, self.counted = now, True
                self._say(self._pace(now))

    def close(self, finished: bool) -> None:
        """The end line when the block finished and something was said (none after an error: its line follows)."""
        self.timer.cancel()
        with self.lock:
            if not (finished and self.shown):
                return
            spent = _duration(time.monotonic() - self.opened)
            if self.started is None:
                _line(self.file, f"{self.description}: done in {spent}")
            else:
                self._say(f" in {spent}")

    def _grace(self) -> None:
        with self.lock:
            if not self.shown:
                self._show(time.monotonic())

    def _show(self, now: float) -> None:
        self.shown, self.last = True, now
        if self.started is None:
            _line(self.file, self.description)
        else:
            self.counted = True
            self._say(self._pace(now))

    def _pace(self, now: float) -> str:
        """``, 12.3 images/s, ETA 18 s`` (the rate once something advanced, the ETA once it can be told)."""
        elapsed = now - self.started
        moved = self.done > self.first and elapsed > 0
        left = _remaining(self.done, self.first, self.total, elapsed, self.estimate)
        return ((f", {_rate((self.done - self.first) / elapsed)} {self.unit}/s" if moved else "")
                + ("" if left is None else f", ETA {_duration(left)}"))

    def _say(self, tail: str) -> None:
        _line(self.file, f"{self.description}: {_count(self.done)}/{_count(self.total)} {self.unit}{tail}")


def plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def stdout_console() -> Console:
    """The console tables print on: the terminal's width, else $COLUMNS, else 160 columns (a pipe, a file)."""
    console = Console(highlight=False)
    if not console.is_terminal and not os.environ.get("COLUMNS", "").isdigit():
        console = Console(width=160, highlight=False)
    return console

