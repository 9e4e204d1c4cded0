"""`fdsub top` (capture each neuron's top-N instances, resumable, shardable) and `fdsub merge` (combine shards)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

import fdsub_onnx
from fdsub_onnx import FdsubError, load_model, load_top, merge_top, save_top
from fdsub_onnx._images import open_images
from fdsub_onnx.cli._common import INPUT_SHAPE, parse_input_shape, progress_bar, spinner
from fdsub_onnx.cli.decode_cmd import DEFAULT_OUT, sanitize


def top(
    model: str = typer.Argument(..., metavar="MODEL", help="The .onnx file.", show_default=False),
    layer: str = typer.Option(
        ..., "--layer", "-l", show_default=False,
        help="Output tensor name of the layer (node names work too); `fdsub inspect` lists them.",
    ),
    images: str = typer.Option(
        ..., "--images", "-i", metavar="SPEC", show_default=False,
        help="Images: a .npy array [N, C, H, W], a folder of images, or builtin:NAME.",
    ),
    count: int = typer.Option(100, "--top", help="Instances kept per neuron."),
    neurons: Optional[str] = typer.Option(
        None, "--neurons", "-n", metavar="SPEC", help="Neurons to capture, e.g. 0,5,10-20.  [default: all]",
    ),
    per_image: int = typer.Option(1, "--per-image", help="Instances allowed per image and neuron."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per onnxruntime run."),
    preset: str = typer.Option("raw", "--preset", help="Preprocessing: raw, torchvision, caffe or tf."),
    shard: Optional[str] = typer.Option(
        None, "--shard", metavar="I/N", help="Scan only block I of N (0-based); combine with `fdsub merge`.",
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", metavar="DIR", help="Output folder.  [default: fdsub-out/<layer>]",
    ),
    input_shape: Optional[str] = INPUT_SHAPE,
) -> None:
    """Find each neuron's strongest instances (image, position) over IMAGES; write DIR/top.npz and DIR/top.json.

    An interrupted run resumes when the same command is run again.
    """
    shape = parse_input_shape(input_shape)
    part = parse_shard(shard)
    if out is not None and out.exists() and not out.is_dir():
        raise FdsubError(f"--out {out} is a file; give a folder")
    with spinner(f"loading {model}"):
        loaded = load_model(model, shape)
        target = fdsub_onnx.find_layer(loaded, layer).output[0]
        image_set = open_images(images, loaded.input_shape[1:], preset=preset)
    if out is None:
        out = DEFAULT_OUT / (sanitize(target) + (f"-shard{part[0]}of{part[1]}" if part else ""))
    checkpoint = checkpoint_path(out)
    with progress_bar(f"{target}") as progress:
        result = fdsub_onnx.capture_top(
            loaded, target, image_set, top=count, neurons=neurons, per_image=per_image,
            batch_size=batch_size, shard=part, checkpoint=checkpoint, progress=progress,
        )
    paths = save_top(result, out)
    checkpoint.unlink(missing_ok=True)
    k, n = result.values.shape
    typer.echo(
        f"top {n} instance{'s' if n != 1 else ''} of {k} neuron{'s' if k != 1 else ''} of layer {result.layer!r} "
        f"over {result.images_done} image{'s' if result.images_done != 1 else ''} ({result.per_image} per image)"
    )
    if result.skipped:
        first = ", ".join(str(s[0] if isinstance(s, list) else s) for s in result.skipped[:3])
        typer.echo(f"  skipped {len(result.skipped)} unreadable image(s): {first}{', ...' if len(result.skipped) > 3 else ''}")
    for path in paths:
        typer.echo(f"  {path}")


def merge(
    parts: list[Path] = typer.Argument(..., metavar="DIR...", help="Folders written by `fdsub top --shard`.", show_default=False),
    out: Path = typer.Option(..., "--out", "-o", metavar="DIR", help="Output folder.", show_default=False),
    count: Optional[int] = typer.Option(None, "--top", help="Instances kept per neuron.  [default: as the parts]"),
) -> None:
    """Combine partial top-N results (shards) exactly into one; write DIR/top.npz and DIR/top.json."""
    result = merge_top([load_top(p) for p in parts], top=count)
    paths = save_top(result, out)
    typer.echo(f"merged {len(parts)} result{'s' if len(parts) != 1 else ''} of layer {result.layer!r} over {result.images_done} images")
    for path in paths:
        typer.echo(f"  {path}")


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """'1/4' -> (1, 4); None stays None; a clear error otherwise."""
    if text is None:
        return None
    i, _, n = text.partition("/")
    try:
        part = int(i), int(n)
    except ValueError:
        part = (-1, 0)
    if not 0 <= part[0] < part[1]:
        raise FdsubError(f"--shard must be I/N with 0 <= I < N, such as 0/4; got {text!r}")
    return part


def checkpoint_path(out: Path) -> Path:
    """The hidden file beside ``out`` that holds an unfinished run's state."""
    return out.parent / f".{out.name}.top-checkpoint.npz"
