"""`fdsub top` (capture each neuron's top-N instances, resumable, shardable) and `fdsub merge` (combine shards)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import typer

import fdsub_onnx
from fdsub_onnx import FdsubError
from fdsub_onnx.cli import _common as common


def top(
    model: str = common.MODEL,
    layer: str = common.LAYER,
    images: str = common.IMAGES,
    count: int = common.top_option("Instances kept per neuron."),
    neurons: Optional[str] = common.NEURONS,
    per_image: int = typer.Option(1, "--per-image", metavar="K", min=1, callback=common.count_limit,
                                  help="Instances allowed per image and neuron."),
    batch_size: int = common.BATCH_SIZE,
    preset: str = common.PRESET,
    mean: Optional[str] = common.MEAN,
    std: Optional[str] = common.STD,
    scale: Optional[float] = common.SCALE,
    bgr: Optional[bool] = common.BGR,
    shard: Optional[str] = typer.Option(
        None, "--shard", metavar="I/N", help="Scan only block I of N (0-based); combine with `fdsub merge`.",
    ),
    out: Optional[Path] = common.out_option("fdsub-out/<layer>-top, or <layer>-top-shard<I>of<N>"),
    input_shape: Optional[str] = common.INPUT_SHAPE,
    device: Optional[str] = common.DEVICE,
    cluster: Optional[str] = common.CLUSTER,
    memory_budget: Optional[str] = common.MEMORY_BUDGET,
    plan: bool = common.PLAN,
) -> None:
    """Find each neuron's strongest instances (image, position) over IMAGES; write DIR/top.npz and DIR/top.json.

    An interrupted run (Ctrl-C) resumes when the same command is run again.
    """
    shape = common.parse_input_shape(input_shape)
    part = parse_shard(shard)
    device = common.device_for(device)
    loaded, target, image_set = common.load_with_images(
        model, layer, images, common.preprocessing(preset, mean, std, scale, bgr), shape)
    default = f"{common.sanitize(layer)}-top" + (f"-shard{part[0]}of{part[1]}" if part else "")
    out = common.output_folder(out, default, "top")
    cost = fdsub_onnx.estimate_top(loaded, target, neurons, len(image_set), top=count, batch_size=batch_size)
    if common.planned(plan, cost, "ask for fewer --neurons, a lower --top or --batch-size, or use --shard"):
        return
    checkpoint = checkpoint_path(out)
    if checkpoint.exists() and not checkpoint.is_file():
        raise FdsubError(f"{checkpoint} (where top keeps its checkpoint for --out {out}) is not a file; remove it or "
                         "give another --out")
    done = fdsub_onnx.checkpoint_progress(checkpoint) if checkpoint.is_file() else None
    if done is not None:
        typer.echo(f"resuming from {checkpoint}: {done} of {len(image_set)} images done", err=True)
    try:
        with common.cluster(cluster) as client, common.progress_bar(f"{target} top", estimate=cost.seconds) as progress:
            result = fdsub_onnx.capture_top(
                loaded, target, image_set, top=count, neurons=neurons, per_image=per_image,
                batch_size=batch_size, shard=part, checkpoint=checkpoint, progress=progress, device=device,
                client=client,
            )
        paths = fdsub_onnx.save_top(result, out)
    except KeyboardInterrupt:  # the checkpoint stays: running the command again resumes
        done = fdsub_onnx.checkpoint_progress(checkpoint) if checkpoint.is_file() else None
        if done is not None:
            typer.echo(f"note: {done} of {len(image_set)} images done are saved in {checkpoint}; run the same "
                       "command again to resume", err=True)
        raise
    except BaseException:
        checkpoint.unlink(missing_ok=True)  # a failed run leaves nothing beside --out
        raise
    checkpoint.unlink(missing_ok=True)
    typer.echo(f"{_kept(result)} of layer {result.layer!r} over {common.plural(result.images_done, 'image')} "
               f"({result.per_image} per image)")
    if result.skipped:
        first = ", ".join(str(s[0] if isinstance(s, list) else s) for s in result.skipped[:3])
        typer.echo(f"  skipped {len(result.skipped)} unreadable image(s): "
                   f"{first}{', ...' if len(result.skipped) > 3 else ''}")
    for path in paths:
        typer.echo(f"  {path}")
    common.warn(common.top_warning(count, image_set, per_image))
    common.note_device(device)


def merge(
    parts: list[Path] = typer.Argument(
        ..., metavar="DIR...", help="Folders written by `fdsub top --shard`.", show_default=False,
    ),
    out: Path = typer.Option(..., "--out", "-o", metavar="DIR", help="Output folder.", show_default=False),
    count: Optional[int] = typer.Option(None, "--top", metavar="N", min=1, callback=common.count_limit,
                                        help="Instances kept per neuron.  [default: as the parts]"),
) -> None:
    """Combine partial top-N results (shards) exactly into one; write DIR/top.npz and DIR/top.json."""
    out = common.output_folder(out, "", "top")
    result = fdsub_onnx.merge_top([fdsub_onnx.load_top(p) for p in parts], top=count)
    paths = fdsub_onnx.save_top(result, out)
    typer.echo(f"merged {common.plural(len(parts), 'result')} of layer {result.layer!r}: {_kept(result)} over "
               f"{common.plural(result.images_done, 'image')}")
    for path in paths:
        typer.echo(f"  {path}")


def _kept(result) -> str:
    """"top 5 instances of 8 neurons", or what was filled when the images gave fewer than --top."""
    k, n = result.values.shape
    filled = int((result.image_index >= 0).sum(axis=1).max(initial=0))
    kept = f"top {common.plural(n, 'instance')}" if filled == n else f"top {filled} of {n} instance slots filled"
    return f"{kept} of {common.plural(k, 'neuron')}"


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """'1/4' -> (1, 4); None stays None; a clear error otherwise."""
    if text is None:
        return None
    i, _, n = text.partition("/")
    try:
        part = int(i), int(n)
    except ValueError:
        part = (-1, 0)
    if not 0 <= part[0] < part[1] or part[1] > np.iinfo(np.int32).max:
        raise FdsubError(f"--shard must be I/N with 0 <= I < N, such as 0/4; got {text!r}")
    return part


def checkpoint_path(out: Path) -> Path:
    """The hidden file beside ``out`` that holds an unfinished run's state."""
    return out.parent / f".{out.name}.top-checkpoint.npz"
