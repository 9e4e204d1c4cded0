"""`fdsub top` (capture each neuron's top-N instances, resumable, shardable) and `fdsub merge` (combine shards)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

import fdsub_onnx
from fdsub_onnx import FdsubError, load_top, merge_top, save_top
from fdsub_onnx.cli import _common as common
from fdsub_onnx.cli.decode_cmd import DEFAULT_OUT, sanitize


def top(
    model: str = common.MODEL,
    layer: str = common.LAYER,
    images: str = common.IMAGES,
    count: int = typer.Option(100, "--top", help="Instances kept per neuron."),
    neurons: Optional[str] = common.NEURONS,
    per_image: int = typer.Option(1, "--per-image", help="Instances allowed per image and neuron."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per onnxruntime run."),
    preset: str = common.PRESET,
    mean: Optional[str] = common.MEAN,
    std: Optional[str] = common.STD,
    scale: Optional[float] = common.SCALE,
    bgr: Optional[bool] = common.BGR,
    shard: Optional[str] = typer.Option(
        None, "--shard", metavar="I/N", help="Scan only block I of N (0-based); combine with `fdsub merge`.",
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", metavar="DIR", help="Output folder.  [default: fdsub-out/<layer>]",
    ),
    input_shape: Optional[str] = common.INPUT_SHAPE,
    device: str = common.DEVICE,
    cluster: Optional[str] = common.CLUSTER,
) -> None:
    """Find each neuron's strongest instances (image, position) over IMAGES; write DIR/top.npz and DIR/top.json.

    An interrupted run resumes when the same command is run again.
    """
    shape = common.parse_input_shape(input_shape)
    part = parse_shard(shard)
    common.check_out_dir(out)
    device = common.device_for(device)
    loaded, target, image_set = common.load_with_images(
        model, layer, images, common.preprocessing(preset, mean, std, scale, bgr), shape)
    if out is None:
        out = DEFAULT_OUT / (sanitize(target) + (f"-shard{part[0]}of{part[1]}" if part else ""))
    checkpoint = checkpoint_path(out)
    with common.cluster(cluster) as client, common.progress_bar(f"{target}") as progress:
        result = fdsub_onnx.capture_top(
            loaded, target, image_set, top=count, neurons=neurons, per_image=per_image,
            batch_size=batch_size, shard=part, checkpoint=checkpoint, progress=progress, device=device,
            client=client,
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
        typer.echo(f"  skipped {len(result.skipped)} unreadable image(s): "
                   f"{first}{', ...' if len(result.skipped) > 3 else ''}")
    for path in paths:
        typer.echo(f"  {path}")
    common.note_device(device)


def merge(
    parts: list[Path] = typer.Argument(
        ..., metavar="DIR...", help="Folders written by `fdsub top --shard`.", show_default=False,
    ),
    out: Path = typer.Option(..., "--out", "-o", metavar="DIR", help="Output folder.", show_default=False),
    count: Optional[int] = typer.Option(None, "--top", help="Instances kept per neuron.  [default: as the parts]"),
) -> None:
    """Combine partial top-N results (shards) exactly into one; write DIR/top.npz and DIR/top.json."""
    result = merge_top([load_top(p) for p in parts], top=count)
    paths = save_top(result, out)
    typer.echo(f"merged {len(parts)} result{'s' if len(parts) != 1 else ''} of layer {result.layer!r} "
               f"over {result.images_done} images")
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
