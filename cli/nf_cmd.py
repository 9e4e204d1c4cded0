"""`fdsub nf`: the Neuron Feature comparator, the activation-weighted mean of each neuron's top-N patches."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

import fdsub_onnx
from fdsub_onnx import FdsubError, load_top, save_with_top
from fdsub_onnx.cli import _common as common
from fdsub_onnx.cli.decode_cmd import DEFAULT_OUT, sanitize

DEFAULT_TOP = 100


def nf(
    model: str = common.MODEL,
    layer: str = common.LAYER,
    images: str = common.IMAGES,
    count: Optional[int] = typer.Option(
        None, "--top", help=f"Instances averaged per neuron.  [default: {DEFAULT_TOP}]",
    ),
    neurons: Optional[str] = common.NEURONS,
    preset: str = common.PRESET,
    mean: Optional[str] = common.MEAN,
    std: Optional[str] = common.STD,
    scale: Optional[float] = common.SCALE,
    bgr: Optional[bool] = common.BGR,
    from_top: Optional[Path] = typer.Option(
        None, "--from-top", metavar="DIR", help="Use the instances of a `fdsub top` result instead of capturing them.",
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", metavar="DIR", help="Output folder.  [default: fdsub-out/<layer>-nf]",
    ),
    input_shape: Optional[str] = common.INPUT_SHAPE,
    device: str = common.DEVICE,
    cluster: Optional[str] = common.CLUSTER,
) -> None:
    """Average each neuron's top-N patches, weighted by activation; write DIR/decoded.npz, filters.png and top.npz."""
    shape = common.parse_input_shape(input_shape)
    if from_top is not None and (count is not None or neurons is not None):
        raise FdsubError("--top and --neurons come from the --from-top result; leave them out")
    common.check_out_dir(out)
    device = common.device_for(device)
    loaded, target, image_set = common.load_with_images(
        model, layer, images, common.preprocessing(preset, mean, std, scale, bgr), shape)
    top = load_top(from_top) if from_top is not None else None
    if top is not None and top.layer != target:
        raise FdsubError(f"--from-top {from_top} holds layer {top.layer!r}, not {target!r}")
    with common.cluster(cluster) as client:
        if top is None:
            with common.progress_bar(f"{target} top") as progress:
                top = fdsub_onnx.capture_top(loaded, target, image_set, top=DEFAULT_TOP if count is None else count,
                                             neurons=neurons, progress=progress, device=device, client=client)
        with common.progress_bar(f"{target} nf") as progress:
            result = fdsub_onnx.neuron_feature(loaded, top, image_set, progress=progress, client=client)
    paths = save_with_top(result, top, out if out is not None else DEFAULT_OUT / f"{sanitize(target)}-nf")
    k, c, ry, rx = result.filters.shape
    typer.echo(f"neuron feature of {k} neuron{'s' if k != 1 else ''} of layer {target!r} "
               f"over the top {top.top} instances: filters [{k}, {c}, {ry}, {rx}]")
    for path in paths:
        typer.echo(f"  {path}")
    common.note_device(device)
