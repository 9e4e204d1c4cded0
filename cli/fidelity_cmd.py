"""`fdsub fidelity`: how well each decoding predicts its neurons on held-out images (a JSON file and a table)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table
from rich.text import Text

import fdsub_onnx
from fdsub_onnx import FIDELITY_MODES, FdsubError
from fdsub_onnx.cli import _common as common


def fidelity(
    model: str = common.MODEL,
    layer: str = common.LAYER,
    images: str = common.IMAGES,
    holdout: str = typer.Option(
        ..., "--holdout", metavar="SPEC", show_default=False,
        help="Held-out images the predictions are scored on (same forms as --images); more than --top of them.",
    ),
    top: int = common.top_option("Instances per neuron for the data modes; also the N of the top-N share."),
    neurons: Optional[str] = common.NEURONS,
    modes: str = typer.Option(",".join(FIDELITY_MODES), "--modes", metavar="A,B",
                              help="Decodings to compare, comma separated."),
    select: str = common.SELECT,
    weighting: str = common.WEIGHTING,
    batch_size: int = common.BATCH_SIZE,
    preset: str = common.PRESET,
    mean: Optional[str] = common.MEAN,
    std: Optional[str] = common.STD,
    scale: Optional[float] = common.SCALE,
    bgr: Optional[bool] = common.BGR,
    out: Optional[Path] = common.out_option("fdsub-out/<layer>-fidelity"),
    grid: int = common.GRID,
    input_shape: Optional[str] = common.INPUT_SHAPE,
    device: Optional[str] = common.DEVICE,
    cluster: Optional[str] = common.CLUSTER,
    memory_budget: Optional[str] = common.MEMORY_BUDGET,
    plan: bool = common.PLAN,
) -> None:
    """Compare decodings of a layer on HOLDOUT: correlation with the true activation, share of the true top-N and the
    two-choice score; write DIR/fidelity.json and the filters scored (DIR/<mode>-decoded.npz, <mode>-filters.png)."""
    shape = common.parse_input_shape(input_shape)
    device = common.device_for(device)
    prep = common.preprocessing(preset, mean, std, scale, bgr)
    loaded, target, image_set = common.load_with_images(model, layer, images, prep, shape)
    held = fdsub_onnx.open_images(holdout, loaded.input_shape[1:], **prep)
    if len(held) <= top:
        raise FdsubError(f"--holdout has {len(held)} images, not more than --top {top}: every top-{top} share would "
                         f"be 1.00; give more held-out images or --top {max(1, len(held) // 2)} or lower")
    folder = common.output_folder(out, f"{common.sanitize(layer)}-fidelity", "fidelity")
    chosen = [m.strip() for m in modes.split(",") if m.strip()]
    cost = fdsub_onnx.estimate_compare(loaded, [target], "all" if neurons is None else neurons, len(image_set),
                                       top=top, holdout=len(held), modes=chosen, batch_size=batch_size,
                                       command="fidelity")  # all neurons by default, as compare_modes scores them
    if common.planned(plan, cost, "score fewer --neurons or --modes, lower --top or --batch-size, or use --cluster"):
        return
    with (common.cluster(cluster) as client,
          common.progress_bar(f"{target} fidelity", unit="steps", estimate=cost.seconds) as progress):
        compared = fdsub_onnx.compare_modes(loaded, target, image_set, held, modes=chosen, top=top, neurons=neurons,
                                            select=select, weighting=weighting, batch_size=batch_size,
                                            progress=progress, device=device, client=client)
    result = compared.scores
    paths = fdsub_onnx.save_fidelity(result, folder, compared.decoded, grid)
    table = Table(title=Text(f"fidelity of {len(result['neurons'])} neurons of {target!r} "
                             f"on {result['images']} held-out images"))
    for column in ("decoding", "mean correlation", f"mean top-{result['top']} share", "mean two-choice", "degenerate"):
        table.add_column(column, justify="left" if column == "decoding" else "right")
    for name, scores in result["decodings"].items():
        table.add_row(name, *(_shown(scores[key], digits) for key, digits in (
            ("mean_correlation", 3), ("mean_top_share", 2), ("mean_two_choice", 3))),
            str(sum(kind is not None for kind in scores["degenerate"])))
    common.stdout_console().print(table)
    for path in paths:
        typer.echo(f"  {path}")
    shown = {}  # one note for the PNGs that show the same share
    for mode, one in compared.decoded.items():
        if text := common.grid_note("{name}", one, grid):
            shown.setdefault(text, []).append(mode)
    for text, drawn in shown.items():
        name = "*-filters.png" if len(drawn) == len(compared.decoded) else f"{'/'.join(drawn)}-filters.png"
        typer.echo(f"note: {text.replace('{name}', name)}", err=True)
    undefined = [name for name, scores in result["decodings"].items() if scores["mean_correlation"] is None]
    degenerate = [text for name, d in compared.decoded.items()
                  for text in common.degenerate_warnings(loaded, d, "see `fdsub decode --help`")[0]]
    common.warn(common.top_warning(top, image_set), undefined and (
        f"no correlation for {', '.join(undefined)}: the predictions or the activations do not vary "
        "(or are NaN) on the held-out images"), *degenerate)
    common.note_device(device)


def _shown(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
