"""`fdsub fidelity`: how well each decoding predicts its neurons on held-out images (a JSON file and a table)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from fdsub_onnx import FIDELITY_MODES, compare_modes, open_images, save_fidelity
from fdsub_onnx.cli import _common as common
from fdsub_onnx.cli.decode_cmd import DEFAULT_OUT, sanitize


def fidelity(
    model: str = common.MODEL,
    layer: str = common.LAYER,
    images: str = common.IMAGES,
    holdout: str = typer.Option(
        ..., "--holdout", metavar="SPEC", show_default=False,
        help="Held-out images the predictions are scored on (same forms as --images).",
    ),
    top: int = typer.Option(
        100, "--top", help="Instances per neuron for the data modes; also the N of the top-N share.",
    ),
    neurons: Optional[str] = common.NEURONS,
    modes: str = typer.Option(",".join(FIDELITY_MODES), "--modes", help="Decodings to compare, comma separated."),
    preset: str = common.PRESET,
    mean: Optional[str] = common.MEAN,
    std: Optional[str] = common.STD,
    scale: Optional[float] = common.SCALE,
    bgr: Optional[bool] = common.BGR,
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", metavar="DIR", help="Output folder.  [default: fdsub-out/<layer>-fidelity]",
    ),
    input_shape: Optional[str] = common.INPUT_SHAPE,
    device: str = common.DEVICE,
    cluster: Optional[str] = common.CLUSTER,
) -> None:
    """Compare decodings of a layer: correlation with the true activation and share of the true top-N on HOLDOUT."""
    shape = common.parse_input_shape(input_shape)
    common.check_out_dir(out)
    device = common.device_for(device)
    loaded, target, image_set = common.load_with_images(
        model, layer, images, common.preprocessing(preset, mean, std, scale, bgr), shape)
    held = open_images(holdout, loaded.input_shape[1:], **common.preprocessing(preset, mean, std, scale, bgr))
    chosen = [m.strip() for m in modes.split(",") if m.strip()]
    with common.cluster(cluster) as client, common.progress_bar(f"{target} fidelity", unit="steps") as progress:
        result = compare_modes(loaded, target, image_set, held, modes=chosen, top=top, neurons=neurons,
                               progress=progress, device=device, client=client)
    folder = out if out is not None else DEFAULT_OUT / f"{sanitize(target)}-fidelity"
    paths = save_fidelity(result, folder)
    table = Table(title=f"fidelity of {len(result['neurons'])} neurons of {target!r} "
                        f"on {result['images']} held-out images")
    for column in ("decoding", "mean correlation", f"mean top-{result['top']} share"):
        table.add_column(column, justify="left" if column == "decoding" else "right")
    for name, scores in result["decodings"].items():
        r = scores["mean_correlation"]
        table.add_row(name, "-" if r is None else f"{r:.3f}", f"{scores['mean_top_share']:.2f}")
    Console().print(table)
    for path in paths:
        typer.echo(f"  {path}")
    common.note_device(device)
