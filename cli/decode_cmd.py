"""`fdsub decode MODEL --layer NAME`: decode neurons into image-space filters, saved as npz and PNG."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import typer

import fdsub_onnx
from fdsub_onnx import FdsubError, decode_instances, gather_statistics, load_model, save_decoded, save_with_top
from fdsub_onnx.cli import _common as common

DEFAULT_OUT = Path("fdsub-out")


DATA_MODES = ("fds", "local", "deconvnet")


def decode(
    model: str = common.MODEL,
    layer: str = common.LAYER,
    neurons: Optional[str] = common.NEURONS,
    mode: Optional[str] = typer.Option(
        None, "--mode",
        help="weights (data-free); fds, local or deconvnet (need --images).  "
             "[default: fds with --images, else weights]",
    ),
    images: Optional[str] = typer.Option(
        None, "--images", "-i", metavar="SPEC",
        help="Images: a .npy/.npz array [N, C, H, W], a folder of JPEG/PNG, or builtin:glyphs|gratings|blobs.",
    ),
    top: int = typer.Option(100, "--top", help="Data modes: instances per neuron."),
    select: str = typer.Option("positive", "--select", help="fds: all, positive, max or topk:K lower neurons."),
    per_instance: bool = typer.Option(
        False, "--per-instance", help="local/deconvnet: also write instance_filters and instance_bias.",
    ),
    preset: str = common.PRESET,
    mean: Optional[str] = common.MEAN,
    std: Optional[str] = common.STD,
    scale: Optional[float] = common.SCALE,
    bgr: Optional[bool] = common.BGR,
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", metavar="DIR", help="Output folder.  [default: fdsub-out/<layer>]",
    ),
    input_shape: Optional[str] = common.INPUT_SHAPE,
    dtype: str = typer.Option("float32", "--dtype", help="float32 or float64."),
    gate_reference: Optional[str] = typer.Option(
        None, "--gate-reference", metavar="SPEC",
        help="weights mode: hold channel gates (squeeze-and-excitation) and layer norms at their mean over these "
             "images.  [default: their value on the all-zeros input, the dataset mean after normalization]",
    ),
    device: str = common.DEVICE,
    position: Optional[str] = typer.Option(
        None, "--position", metavar="QY,QX",
        help="weights mode: the output position to decode at (row,column of the layer's map), or 'interior': the "
             "filter of every position whose receptive field lies in the image.  [default: the map's centre]",
    ),
    route: str = typer.Option(
        "auto", "--route",
        help="weights mode: auto (the cheapest that is exact and fits), bottom-up, adjoint or meet.",
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Say which route decoded the layer, and its cost."),
) -> None:
    """Decode neurons of a layer of MODEL into filters over the image; write DIR/decoded.npz and DIR/filters.png.

    With images, also DIR/top.npz and DIR/top.json: the instances the decode used.
    """
    shape = common.parse_input_shape(input_shape)
    at = _parse_position(position)
    common.check_out_dir(out)
    device = common.device_for(device)
    mode = mode or ("fds" if images is not None else "weights")
    if mode in DATA_MODES:
        if images is None:
            raise FdsubError(f"--mode {mode} needs --images (a .npy/.npz array, a folder of images or builtin:glyphs)")
        loaded, target, image_set = common.load_with_images(
        model, layer, images, common.preprocessing(preset, mean, std, scale, bgr), shape)
        result = _decode_with_images(loaded, target, neurons, image_set, mode, top, select, per_instance, dtype, device)
    else:
        if images is not None:
            raise FdsubError(f"--images has no use in {mode} mode; leave it out or use --mode fds")
        with common.spinner(f"loading {model}"):
            loaded = load_model(model, shape)
            reference = None if gate_reference is None else fdsub_onnx.open_images(
                gate_reference, loaded.input_shape[1:], **common.preprocessing(preset, mean, std, scale, bgr))
        with common.progress_bar(f"decoding {layer}", unit="steps") as progress:
            result = fdsub_onnx.decode(loaded, layer, neurons=neurons, mode=mode, dtype=dtype, device=device,
                                       gate_reference=reference, position=at, route=route, progress=progress)
    folder = out if out is not None else DEFAULT_OUT / sanitize(result.layer)
    with common.spinner("writing results"):
        paths = (save_decoded(result, folder) if result.instances is None
                 else save_with_top(result, result.instances, folder))
    k, c, ry, rx = result.filters.shape
    sy, sx = result.stride
    typer.echo(
        f"decoded {k} neuron{'s' if k != 1 else ''} of layer {result.layer!r} ({result.mode} mode): "
        f"filters [{k}, {c}, {ry}, {rx}], stride {sy}x{sx}, origin {','.join(map(str, result.origin))}"
    )
    for path in paths:
        typer.echo(f"  {path}")
    if result.position is not None:
        where = ("every position whose receptive field lies in the image" if result.exact_at == "interior"
                 else "this position only")
        typer.echo(f"decoded at output position {','.join(map(str, result.position))}; the filters hold at {where}")
    if verbose and result.plan is not None:
        typer.echo(f"route: {result.plan.describe()}", err=True)
    if result.gates:
        where = "their mean over --gate-reference" if gate_reference else "their value on the all-zeros input"
        typer.echo(f"note: {len(result.gates)} channel gates / layer norms below {result.layer!r} held at {where} "
                   "(saved as `gates` in decoded.npz)", err=True)
    common.note_device(device)


def _decode_with_images(loaded, target, neurons, image_set, mode, top, select, per_instance, dtype, device):
    """The data modes, each with a progress bar: fds over its substituted layers, local/deconvnet over instances."""
    if mode == "fds":
        with common.progress_bar(f"{target} statistics (2 passes)") as progress:
            substitution = gather_statistics(loaded, target, image_set, top=top, select=select,
                                             progress=progress, device=device)
        with common.spinner(f"decoding {target}"):
            return fdsub_onnx.decode(loaded, target, neurons=neurons, mode="fds", dtype=dtype,
                                     substitution=substitution, device=device)
    with common.progress_bar(f"{target} top") as progress:
        instances = fdsub_onnx.capture_top(loaded, target, image_set, top=top, neurons=neurons, progress=progress,
                                           device=device)
    with common.progress_bar(f"{target} {mode}", unit="instances") as progress:
        return decode_instances(loaded, target, image_set, rule=mode, per_instance=per_instance, instances=instances,
                                progress=progress, device=device, dtype=dtype)


def _parse_position(text: str | None):
    if text is None or text == "interior":
        return text
    try:
        qy, qx = (int(v) for v in text.split(","))
    except ValueError:
        raise FdsubError(f"--position must be two integers ROW,COLUMN (e.g. 3,3) or 'interior', got {text!r}") from None
    return qy, qx


def sanitize(name: str) -> str:
    """A tensor name as a safe folder name: runs of other characters become '_'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "layer"
