"""`fdsub nf`: the Neuron Feature comparator, the activation-weighted mean of each neuron's top-N patches."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

import fdsub_onnx
from fdsub_onnx import DEFAULT_TOP, FdsubError
from fdsub_onnx.cli import _common as common


def nf(
    model: str = common.MODEL,
    layer: str = common.LAYER,
    images: str = common.IMAGES,
    count: Optional[int] = common.top_option(f"Instances averaged per neuron.  [default: {DEFAULT_TOP}]", None),
    neurons: Optional[str] = common.NEURONS,
    batch_size: int = common.BATCH_SIZE,
    preset: str = common.PRESET,
    mean: Optional[str] = common.MEAN,
    std: Optional[str] = common.STD,
    scale: Optional[float] = common.SCALE,
    bgr: Optional[bool] = common.BGR,
    from_top: Optional[Path] = typer.Option(
        None, "--from-top", metavar="DIR", help="Use the instances of a `fdsub top` result instead of capturing them.",
    ),
    out: Optional[Path] = common.out_option("fdsub-out/<layer>-nf"),
    grid: int = common.GRID,
    input_shape: Optional[str] = common.INPUT_SHAPE,
    device: Optional[str] = common.DEVICE,
    cluster: Optional[str] = common.CLUSTER,
    memory_budget: Optional[str] = common.MEMORY_BUDGET,
    plan: bool = common.PLAN,
) -> None:
    """Average each neuron's top-N patches, weighted by activation; write DIR/decoded.npz, filters.png and top.npz."""
    shape = common.parse_input_shape(input_shape)
    if from_top is not None and (count is not None or neurons is not None):
        raise FdsubError("--top and --neurons come from the --from-top result; leave them out")
    device = common.device_for(device)
    loaded, target, image_set = common.load_with_images(
        model, layer, images, common.preprocessing(preset, mean, std, scale, bgr), shape)
    folder = common.output_folder(out, f"{common.sanitize(layer)}-nf", "nf")
    top = fdsub_onnx.load_top(from_top) if from_top is not None else None
    if top is not None and top.layer != target:
        raise FdsubError(f"--from-top {from_top} holds layer {top.layer!r}, not {target!r}; give --layer "
                         f"{top.layer!r} or a `fdsub top` result of {target!r}")
    cost = (fdsub_onnx.estimate_nf(loaded, target, neurons, len(image_set), DEFAULT_TOP if count is None else count,
                                   batch_size) if top is None else
            fdsub_onnx.estimate_nf(loaded, target, top.neurons, 0, top.top, batch_size))
    if common.planned(plan, cost, "ask for fewer --neurons, a lower --top or --batch-size, or use --cluster"):
        return
    with common.cluster(cluster) as client:
        if top is None:
            count = DEFAULT_TOP if count is None else count
            with common.progress_bar(f"{target} top", estimate=cost.stages[0].seconds) as progress:
                top = fdsub_onnx.capture_top(loaded, target, image_set, top=count, neurons=neurons,
                                             batch_size=batch_size, progress=progress, device=device, client=client)
        with common.progress_bar(f"{target} nf", estimate=cost.stages[-1].seconds) as progress:
            result = fdsub_onnx.neuron_feature(loaded, top, image_set, batch_size=batch_size, progress=progress,
                                               client=client)
    paths = fdsub_onnx.save_with_top(result, top, folder, grid)
    k, c, ry, rx = result.filters.shape
    typer.echo(f"neuron feature of {common.plural(k, 'neuron')} of layer {target!r} "
               f"over the top {top.top} instances: filters [{k}, {c}, {ry}, {rx}]")
    for path in paths:
        typer.echo(f"  {path}")
    shown = common.grid_note("filters.png", result, grid)
    if shown:
        typer.echo(f"note: {shown}", err=True)
    common.warn(common.top_warning(top.top, image_set) if from_top is None else None,
                common.nonfinite_warning(loaded, result.filters, "neuron features"))
    common.note_device(device)
