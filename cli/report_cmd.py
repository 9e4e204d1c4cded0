"""`fdsub report`: one self-contained HTML page comparing every decoding of some layers, with fidelity."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from fdsub_onnx import REPORT_TOP as DEFAULT_TOP
from fdsub_onnx import load_model, open_images
from fdsub_onnx import report as make_report
from fdsub_onnx.cli import _common as common
from fdsub_onnx.cli.decode_cmd import DEFAULT_OUT, sanitize


def report(
    model: str = common.MODEL,
    images: str = common.IMAGES,
    layers: Optional[str] = typer.Option(
        None, "--layers", "-l", metavar="A,B",
        help="Layers to report (output tensor or node names).  [default: every decodable Conv layer]",
    ),
    neurons: Optional[str] = typer.Option(
        None, "--neurons", "-n", metavar="SPEC",
        help="Neurons of each layer, e.g. 0-15 (indices a layer lacks are left out).  [default: all]",
    ),
    top: int = typer.Option(DEFAULT_TOP, "--top", help="Instances per neuron: shown, and used by the data modes."),
    holdout: Optional[str] = typer.Option(
        None, "--holdout", metavar="SPEC",
        help="Held-out images for the fidelity figures (same forms as --images).  [default: the --images]",
    ),
    select: str = typer.Option("positive", "--select", help="fds: all, positive, max or topk:K lower neurons."),
    preset: str = common.PRESET,
    mean: Optional[str] = common.MEAN,
    std: Optional[str] = common.STD,
    scale: Optional[float] = common.SCALE,
    bgr: Optional[bool] = common.BGR,
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", metavar="DIR", help="Output folder.  [default: fdsub-out/<model>-report]",
    ),
    input_shape: Optional[str] = common.INPUT_SHAPE,
    device: str = common.DEVICE,
    cluster: Optional[str] = common.CLUSTER,
) -> None:
    """Write DIR/index.html: decoded filters (fds, weights, local), deconvnet, Neuron Feature, top patches and fidelity.

    One file, pictures embedded: open it in a browser, copy it anywhere.
    """
    shape = common.parse_input_shape(input_shape)
    common.check_out_dir(out)
    device = common.device_for(device)
    prep = common.preprocessing(preset, mean, std, scale, bgr)
    with common.spinner(f"loading {model}"):
        loaded = load_model(model, shape)
        image_set = open_images(images, loaded.input_shape[1:], **prep)
        held = open_images(holdout, loaded.input_shape[1:], **prep) if holdout is not None else None
    folder = out if out is not None else DEFAULT_OUT / f"{sanitize(Path(model).stem)}-report"
    notes = []
    with common.cluster(cluster) as client, common.progress_bar("report", unit="steps") as progress:
        path = make_report(loaded, image_set, folder, layers=layers, neurons=neurons, top=top, holdout=held,
                           select=select, progress=progress, device=device, note=notes.append, client=client)
    typer.echo(f"report of {model} ({path.stat().st_size / 2**20:.1f} MiB): open it in a browser")
    typer.echo(f"  {path}")
    for text in notes:
        typer.echo(f"note: {text}", err=True)
    common.note_device(device)
