"""`fdsub report`: one self-contained HTML page comparing every decoding of some layers, with fidelity."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

import fdsub_onnx
from fdsub_onnx import REPORT_FIDELITY_IMAGES, REPORT_LAYERS, REPORT_NEURONS, REPORT_TOP
from fdsub_onnx.cli import _common as common


def report(
    model: str = common.MODEL,
    images: str = common.IMAGES,
    layers: Optional[str] = typer.Option(
        None, "--layers", "-l", metavar="A,B",
        help=f"Layers to report (output tensor, node or module names), or all: every decodable Conv layer and "
             f"token layer with a patch grid.  "
             f"[default: {REPORT_LAYERS} Conv layers from the first to the deepest]",
    ),
    neurons: Optional[str] = typer.Option(
        None, "--neurons", "-n", metavar="SPEC",
        help=f"Neurons of each layer, e.g. 0-31 (indices a layer lacks are left out), or all.  "
             f"[default: the first {REPORT_NEURONS}]",
    ),
    top: int = common.top_option("Instances per neuron: shown, and used by the data modes.", REPORT_TOP),
    holdout: Optional[str] = typer.Option(
        None, "--holdout", metavar="SPEC",
        help="Held-out images for the fidelity figures (same forms as --images).  [default: the --images]",
    ),
    fidelity_images: str = typer.Option(
        str(REPORT_FIDELITY_IMAGES), "--fidelity-images", metavar="N|all",
        help="Score fidelity on N of the fidelity images, evenly spaced, or on all of them.",
    ),
    select: str = common.SELECT,
    weighting: str = common.WEIGHTING,
    batch_size: int = common.BATCH_SIZE,
    preset: str = common.PRESET,
    mean: Optional[str] = common.MEAN,
    std: Optional[str] = common.STD,
    scale: Optional[float] = common.SCALE,
    bgr: Optional[bool] = common.BGR,
    out: Optional[Path] = common.out_option("fdsub-out/<model>-report"),
    input_shape: Optional[str] = common.INPUT_SHAPE,
    device: Optional[str] = common.DEVICE,
    cluster: Optional[str] = common.CLUSTER,
    memory_budget: Optional[str] = common.MEMORY_BUDGET,
    plan: bool = common.PLAN,
) -> None:
    """Write DIR/index.html: decoded filters (fds, weights, local), deconvnet, Neuron Feature, top patches and fidelity.

    One file, pictures embedded: open it in a browser, copy it anywhere.
    """
    shape = common.parse_input_shape(input_shape)
    sample = common.parse_count(fidelity_images, "--fidelity-images")
    device = common.device_for(device)
    prep = common.preprocessing(preset, mean, std, scale, bgr)
    folder = common.output_folder(out, f"{common.sanitize(Path(model).stem)}-report", "report")
    with common.spinner(f"loading {model}"):
        loaded = fdsub_onnx.load_model(model, shape)
        image_set = fdsub_onnx.open_images(images, loaded.input_shape[1:], **prep)
        held = fdsub_onnx.open_images(holdout, loaded.input_shape[1:], **prep) if holdout is not None else None
        scored = fdsub_onnx.fidelity_sample(held if held is not None else image_set, sample)[0]
        cost = fdsub_onnx.estimate_compare(loaded, layers, neurons, len(image_set), top=top, holdout=len(scored),
                                           batch_size=batch_size)
    if common.planned(plan, cost, "report fewer --layers or --neurons, lower --top or --batch-size, or use --cluster"):
        return
    notes = []
    with (common.cluster(cluster) as client,
          common.progress_bar("report", unit="steps", estimate=cost.seconds) as progress):
        path = fdsub_onnx.report(loaded, image_set, folder, layers=layers, neurons=neurons, top=top, holdout=held,
                                 select=select, weighting=weighting, progress=progress, device=device,
                                 note=notes.append, batch_size=batch_size, client=client, fidelity_images=sample)
    typer.echo(f"report of {model} ({path.stat().st_size / 2**20:.1f} MiB): open {path} in a browser")
    for text in notes:
        typer.echo(f"note: {text}", err=True)
    common.warn(common.top_warning(top, image_set))
    common.note_device(device)
