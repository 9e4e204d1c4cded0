"""`fdsub decode MODEL --layer NAME`: decode neurons into image-space filters, saved as npz and PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

import fdsub_onnx
from fdsub_onnx import FdsubError
from fdsub_onnx.cli import _common as common

# names the tests and other commands know these by
DEFAULT_OUT = common.DEFAULT_OUT
sanitize = common.sanitize
DTYPES = ("float32", "float64")
FIX = "decode fewer --neurons, lower --top or --batch-size, or use --cluster"
DTYPE = typer.Option("float32", "--dtype", metavar="float32|float64", help="Precision of the filters.")


def decode(
    model: str = common.MODEL,
    layer: str = common.LAYER,
    neurons: Optional[str] = common.NEURONS,
    mode: Optional[str] = typer.Option(
        None, "--mode", metavar="MODE",
        help="weights (data-free); fds, local or deconvnet (need --images).  "
             "[default: fds with --images, else weights]",
    ),
    images: Optional[str] = typer.Option(None, "--images", "-i", metavar="SPEC", help=common.IMAGES_HELP),
    top: int = common.top_option("Data modes: instances per neuron."),
    select: str = common.SELECT,
    weighting: str = common.WEIGHTING,
    per_instance: bool = typer.Option(
        False, "--per-instance", help="local/deconvnet: also write instance_filters and instance_bias.",
    ),
    batch_size: int = common.BATCH_SIZE,
    preset: str = common.PRESET,
    mean: Optional[str] = common.MEAN,
    std: Optional[str] = common.STD,
    scale: Optional[float] = common.SCALE,
    bgr: Optional[bool] = common.BGR,
    out: Optional[Path] = common.out_option("fdsub-out/<layer>-<mode>"),
    input_shape: Optional[str] = common.INPUT_SHAPE,
    dtype: str = DTYPE,
    gate_reference: Optional[str] = typer.Option(
        None, "--gate-reference", metavar="SPEC",
        help="weights mode: hold channel gates (squeeze-and-excitation) and layer norms at their mean over these "
             "images.  [default: their value on the all-zeros input, the dataset mean after normalization]",
    ),
    device: Optional[str] = common.DEVICE,
    cluster: Optional[str] = common.CLUSTER,
    position: Optional[str] = typer.Option(
        None, "--position", metavar="QY,QX",
        help="weights mode: the output position to decode at (row,column of the layer's map; tokens: 0,T for token T), "
             "'interior': the filter of every position whose receptive field lies in the image; for tokens of a "
             "patch grid 'cls' (the class token) or 'patch:GY,GX'.  [default: the map's centre; tokens: the patch "
             "grid's centre]",
    ),
    route: str = typer.Option(
        "auto", "--route",
        help="weights mode: auto (the cheapest that is exact and fits), bottom-up, adjoint or meet.",
    ),
    grid: int = common.GRID,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Say which route decoded the layer, and its cost."),
    memory_budget: Optional[str] = common.MEMORY_BUDGET,
    plan: bool = common.PLAN,
) -> None:
    """Decode neurons of a layer of MODEL into filters over the image; write DIR/decoded.npz and DIR/filters.png.

    With images, also DIR/top.npz and DIR/top.json: the instances the decode used.
    """
    shape = common.parse_input_shape(input_shape)
    mode = _mode(mode, images)
    for option, value, default in (("--select", select, fdsub_onnx.DEFAULT_SELECT),
                                   ("--weighting", weighting, fdsub_onnx.DEFAULT_WEIGHTING)):
        if mode != "fds" and value != default:  # an option no mode here reads is a mistake, not a no-op
            raise FdsubError(f"{option} is read by --mode fds only; leave it out in {mode} mode")
    if cluster is not None and mode not in common.DATA_MODES:
        raise FdsubError(f"--cluster has no use in {mode} mode (it reads no images); leave it out")
    if dtype not in DTYPES:
        raise FdsubError(f"--dtype must be float32 or float64; got {dtype!r}")
    at = _parse_position(position)
    device = common.device_for(device)
    prep = common.preprocessing(preset, mean, std, scale, bgr)
    if mode in common.DATA_MODES:
        loaded, target, image_set = common.load_with_images(model, layer, images, prep, shape)
        folder = common.output_folder(out, f"{sanitize(layer)}-{mode}", fdsub_onnx.result_kind(mode))
        too_few = common.top_warning(top, image_set)
        cost = fdsub_onnx.estimate_decode(loaded, target, neurons, mode, len(image_set), top=top, batch_size=batch_size,
                                          dtype=dtype)
        if common.planned(plan, cost, FIX):
            return
        with common.cluster(cluster) as client:
            result = _decode_with_images(loaded, target, neurons, image_set, mode, top, select, weighting,
                                         per_instance, batch_size, dtype, device, client, cost)
    else:
        with common.spinner(f"loading {model}"):
            loaded = fdsub_onnx.load_model(model, shape)
            target = fdsub_onnx.find_layer(loaded, layer).output[0]
            folder = common.output_folder(out, f"{sanitize(layer)}-{mode}", fdsub_onnx.result_kind(mode))
            too_few = None
            reference = None if gate_reference is None else fdsub_onnx.open_images(
                gate_reference, loaded.input_shape[1:], **prep)
        cost = fdsub_onnx.estimate_decode(loaded, target, neurons, mode, dtype=dtype, position=at, route=route)
        if common.planned(plan, cost, FIX):
            return
        with common.progress_bar(f"decoding {target}", unit="steps") as progress:
            result = fdsub_onnx.decode(loaded, target, neurons=neurons, mode=mode, dtype=dtype, device=device,
                                       gate_reference=reference, position=at, route=route, progress=progress)
    with common.spinner("writing results"):
        paths = (fdsub_onnx.save_decoded(result, folder, grid) if result.instances is None
                 else fdsub_onnx.save_with_top(result, result.instances, folder, grid))
    k, c, ry, rx = result.filters.shape
    sy, sx = result.stride
    typer.echo(
        f"decoded {common.plural(k, 'neuron')} of layer {result.layer!r} ({result.mode} mode): "
        f"filters [{k}, {c}, {ry}, {rx}], stride {sy}x{sx}, origin {','.join(map(str, result.origin))}"
    )
    for path in paths:
        typer.echo(f"  {path}")
    if result.position is not None:
        where = ("every position whose receptive field lies in the image" if result.exact_at == "interior"
                 else "this position only")
        typer.echo(f"decoded at {fdsub_onnx.describe_position(loaded, result.layer, result.position)}; the filters "
                   f"hold at {where}")
    shown = common.grid_note("filters.png", result, grid)
    if shown:
        typer.echo(f"note: {shown}", err=True)
    if verbose and result.plan is not None:
        typer.echo(f"route: {result.plan.describe()}", err=True)
    if result.gates:
        where = ("their mean over each neuron's top instances (channel gates: over the images)" if mode == "fds"
                 else "their mean over --gate-reference" if gate_reference else "their value on the all-zeros input")
        typer.echo(f"note: {len(result.gates)} data-dependent factors (channel gates, layer norms, attention) below "
                   f"{result.layer!r} held at {where} (saved as `gates` in decoded.npz)", err=True)
    if loaded.dequantized:
        typer.echo(f"note: {fdsub_onnx.dequantized_note(loaded.dequantized)}", err=True)
    fix = ("--weighting activation carries each layer's scale into the next: use --weighting gate, or --dtype float64"
           if mode == "fds" and weighting == "activation" else "--dtype float64 holds more")
    degenerate, unusable = common.degenerate_warnings(loaded, result, fix)
    common.warn(too_few, *degenerate)
    common.note_device(device)
    if unusable:
        raise typer.Exit(1)


def _mode(mode: str | None, images: str | None) -> str:
    """--mode checked before anything is loaded, and against --images."""
    if mode is None:
        return "fds" if images is not None else "weights"
    if mode not in fdsub_onnx.MODES:
        raise FdsubError(f"--mode {mode!r} is not a mode; choose one of {', '.join(fdsub_onnx.MODES)}")
    if mode in common.DATA_MODES and images is None:
        raise FdsubError(f"--mode {mode} needs --images (a folder of images, a .npy/.npz array or builtin:glyphs)")
    if mode not in common.DATA_MODES and images is not None:
        raise FdsubError(f"--images has no use in {mode} mode; leave it out or use --mode fds")
    return mode


def _decode_with_images(loaded, target, neurons, image_set, mode, top, select, weighting, per_instance, batch_size,
                        dtype, device, client, cost):
    """The data modes, each with a progress bar (its first time left from the ``cost`` plan's stages): fds over its
    substituted layers, local/deconvnet over instances (on the cluster: the passes over images; the per-instance
    backward passes run here)."""
    seconds = [stage.seconds for stage in cost.stages]
    if mode == "fds":
        with common.progress_bar(f"{target} statistics (2 passes)", estimate=seconds[0] + seconds[1]) as progress:
            substitution = fdsub_onnx.gather_statistics(loaded, target, image_set, top=top, select=select,
                                                        batch_size=batch_size, progress=progress, device=device,
                                                        client=client, weighting=weighting)
        with common.spinner(f"decoding {target}"):
            return fdsub_onnx.decode(loaded, target, neurons=neurons, mode="fds", dtype=dtype,
                                     substitution=substitution, device=device)
    with common.progress_bar(f"{target} top", estimate=seconds[0]) as progress:
        instances = fdsub_onnx.capture_top(loaded, target, image_set, top=top, neurons=neurons, batch_size=batch_size,
                                           progress=progress, device=device, client=client)
    with common.progress_bar(f"{target} {mode}", unit="instances", estimate=seconds[1]) as progress:
        return fdsub_onnx.decode_instances(loaded, target, image_set, rule=mode, per_instance=per_instance,
                                           instances=instances, progress=progress, device=device, dtype=dtype)


def _parse_position(text: str | None):
    if text is None or text == "interior" or text == "cls" or text.startswith("patch:"):
        return text
    try:
        qy, qx = (int(v) for v in text.split(","))
    except ValueError:
        raise FdsubError(f"--position must be two integers ROW,COLUMN (e.g. 3,3), 'interior', 'cls' or "
                         f"'patch:GY,GX', got {text!r}") from None
    return qy, qx
