"""`fdsub diff A B` and `fdsub fingerprint MODEL`: what changed neuron by neuron between two models (CI: exit 0 pass,
1 a limit crossed, 2 the models cannot be compared)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.markup import escape
from rich.table import Table

import fdsub_onnx
from fdsub_onnx.cli import _common as common
from fdsub_onnx.cli.check_cmd import JSON, JUNIT, _status

SHOWN_LAYERS = 40  # table rows at most (the most changed first); --json holds every layer


def diff(
    a: str = typer.Argument(..., metavar="A", help="The earlier model (.onnx) or its fingerprint folder.",
                            show_default=False),
    b: str = typer.Argument(..., metavar="B", help="The model to compare with it (.onnx).", show_default=False),
    layers: Optional[str] = typer.Option(None, "--layers", "-l", metavar="NAMES",
                                         help="A's layers to compare, comma separated (default: every matched one)."),
    neurons: Optional[str] = common.NEURONS,
    images: Optional[str] = typer.Option(
        None, "--images", "-i", metavar="SPEC",
        help="Also compare responses to these images: activation drift, top-N overlap, Spearman (a fingerprint's "
             "own images).",
    ),
    top: int = common.top_option("With --images: top-N images per neuron compared.", fdsub_onnx.DEFAULT_DIFF_TOP),
    instances: bool = typer.Option(
        False, "--instances",
        help="With --images: also the drift of each neuron's Neuron Feature and local filter, each model over its "
             "own top-N instances (a capture and a backward pass per layer and model).",
    ),
    max_drift: Optional[float] = typer.Option(
        None, "--max-drift", metavar="X", help="Fail when a neuron's filter drift ||F_B - F_A|| / ||F_A|| is over X.",
    ),
    max_activation_drift: Optional[float] = typer.Option(
        None, "--max-activation-drift", metavar="X", help="Fail when a neuron's activation drift is over X (--images).",
    ),
    min_top_overlap: Optional[float] = typer.Option(
        None, "--min-top-overlap", metavar="X", help="Fail when a neuron shares less than X of its top-N images.",
    ),
    require_all_matched: bool = typer.Option(
        False, "--require-all-matched", help="Fail when a layer or a neuron of either model has no counterpart.",
    ),
    preset: str = common.PRESET,
    mean: Optional[str] = common.MEAN,
    std: Optional[str] = common.STD,
    scale: Optional[float] = common.SCALE,
    bgr: Optional[bool] = common.BGR,
    batch_size: int = common.BATCH_SIZE,
    input_shape: Optional[str] = common.INPUT_SHAPE,
    as_json: bool = JSON,
    junit: Optional[Path] = JUNIT,
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", metavar="DIR",
        help="Also write DIR/diff.json, DIR/diff.html and DIR/drift.png (the most changed neurons: A, B, B - A).",
    ),
    memory_budget: Optional[str] = common.MEMORY_BUDGET,
    plan: bool = common.PLAN,
) -> None:
    """Compare B with A neuron by neuron: layers matched by name, else by structure; per neuron the drift of its
    weights filter (data-free) and, with --images, of its responses.

    Exit 0 when no limit is crossed, 1 when one is, 2 when the models cannot be compared.
    """
    if junit is not None:
        fdsub_onnx.check_junit_path(junit)
    if out is not None:
        fdsub_onnx.check_result_folder(out, "diff")
    shape = common.parse_input_shape(input_shape)
    with common.spinner(f"loading {b}"):
        second = fdsub_onnx.load_model(b, shape)
        first = a if Path(a).is_dir() else fdsub_onnx.load_model(a, shape)
        image_set = None if images is None else fdsub_onnx.open_images(
            images, second.input_shape[1:], **common.preprocessing(preset, mean, std, scale, bgr))
    with common.spinner(f"planning the comparison of {b} with {a}"):
        cost = fdsub_onnx.estimate_diff(first, second, layers=None if layers is None else layers.split(","),
                                        neurons=neurons, images=0 if image_set is None else len(image_set), top=top,
                                        instances=instances, batch_size=batch_size)
    fix = "compare fewer --layers or --neurons (e.g. --neurons 0-15: every layer's first 16)"
    if common.planned(plan, cost, fix + (", or leave --instances out" if instances else "")):
        return
    with common.spinner(f"comparing {b} with {a}"):
        report = fdsub_onnx.diff(first, second, layers=None if layers is None else layers.split(","),
                                 neurons=neurons, images=image_set, top=top, max_drift=max_drift,
                                 max_activation_drift=max_activation_drift, min_top_overlap=min_top_overlap,
                                 require_all_matched=require_all_matched, batch_size=batch_size,
                                 instances=instances)
    if junit is not None:
        fdsub_onnx.write_junit(fdsub_onnx.junit_document([fdsub_onnx.diff_suite(report)], "fdsub diff"), junit)
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
    else:
        _print_diff(report)
    if out is not None:
        for path in fdsub_onnx.save_diff(report, out):
            typer.echo(f"  {path}", err=as_json)
    if report.status != "pass":
        raise typer.Exit(1)


def fingerprint(
    model: str = common.MODEL,
    out: Path = typer.Option(..., "--out", "-o", metavar="DIR", help="The fingerprint folder.", show_default=False),
    layers: Optional[str] = typer.Option(None, "--layers", "-l", metavar="NAMES",
                                         help="Layers kept, comma separated (default: every decodable one)."),
    neurons: Optional[str] = common.NEURONS,
    images: Optional[str] = typer.Option(None, "--images", "-i", metavar="SPEC",
                                         help="Also keep each neuron's response to these images (for diff --images)."),
    preset: str = common.PRESET,
    mean: Optional[str] = common.MEAN,
    std: Optional[str] = common.STD,
    scale: Optional[float] = common.SCALE,
    bgr: Optional[bool] = common.BGR,
    batch_size: int = common.BATCH_SIZE,
    input_shape: Optional[str] = common.INPUT_SHAPE,
    memory_budget: Optional[str] = common.MEMORY_BUDGET,
    plan: bool = common.PLAN,
) -> None:
    """Save what a later `fdsub diff DIR NEW.onnx` needs of MODEL: its layers, weights filters and biases, and with
    --images its neurons' responses."""
    fdsub_onnx.check_result_folder(out, "fingerprint")
    with common.spinner(f"loading {model}"):
        loaded = fdsub_onnx.load_model(model, common.parse_input_shape(input_shape))
        image_set = None if images is None else fdsub_onnx.open_images(
            images, loaded.input_shape[1:], **common.preprocessing(preset, mean, std, scale, bgr))
    cost = fdsub_onnx.estimate_fingerprint(loaded, layers=None if layers is None else layers.split(","),
                                           neurons=neurons, images=0 if image_set is None else len(image_set),
                                           batch_size=batch_size)
    if common.planned(plan, cost, "keep fewer --layers or --neurons (e.g. --neurons 0-15: every layer's first 16)"):
        return
    with common.spinner(f"fingerprinting {model}"):
        paths = fdsub_onnx.save_fingerprint(loaded, out, layers=None if layers is None else layers.split(","),
                                            neurons=neurons, images=image_set, batch_size=batch_size)
    typer.echo(f"fingerprint of {model}" + ("" if image_set is None else f" with {len(image_set)} images") + ":")
    for path in paths:
        typer.echo(f"  {path}")


def _print_diff(report) -> None:
    console = common.stdout_console()
    images = report.images > 0
    table = Table(title=escape(f"{report.model_b} against {report.model_a}"
                               + (f" ({report.images} images)" if images else "")), title_justify="left")
    columns = ["layer (A)", "layer (B)", "neurons", "filter drift max (neuron)", "mean", "cosine min", "bias drift max"]
    columns += ["activation drift max", "top overlap min", "spearman min"] if images else []
    instances = any(d.nf_drift is not None for d in report.layers)
    columns += ["NF drift max", "local drift max"] if instances else []
    for column in [*columns, "status"]:
        table.add_column(column, overflow="fold", justify="left" if column.startswith(("layer", "status")) else "right")
    for d in report.layers[:SHOWN_LAYERS]:
        at = int(np.argmax(d.filter_drift)) if d.filter_drift else 0
        row = [escape(d.layer_a), "" if d.layer_b == d.layer_a else escape(d.layer_b),
               str(len(d.neurons)) + (f" (+{len(d.unmatched_neurons_a)} unmatched)" if d.unmatched_neurons_a else ""),
               f"{d.worst:.3g} ({d.neurons[at]})" if d.neurons else "-", _mean(d.filter_drift),
               f"{min(d.cosine, default=1.0):.4f}", f"{max(d.bias_drift, default=0.0):.3g}"]
        if images:
            row += [f"{max(d.activation_drift):.3g}", f"{min(d.top_overlap):.2f}", f"{min(d.spearman):.3f}"]
        if instances:
            row += [_largest(d.nf_drift), _largest(d.local_drift)]
        table.add_row(*row, _status("fail" if d.failures else "pass"))
    console.print(table)
    if len(report.layers) > SHOWN_LAYERS:
        console.print(f"... {len(report.layers) - SHOWN_LAYERS} more layers, less changed (--json lists them all)")
    for side, unmatched in (("A", report.unmatched_a), ("B", report.unmatched_b)):
        for u in unmatched:
            console.print(f"unmatched in {side}: {escape(u['layer'])}: {escape(u['reason'])}", highlight=False)
    failures = report.failures
    for line in failures:
        console.print(f"fail: {escape(line)}", highlight=False)
    verdict = _status("fail" if failures else "pass")
    console.print(f"{verdict}: {len(report.layers)} layers matched, {len(report.unmatched_a)} of A and "
                  f"{len(report.unmatched_b)} of B unmatched ({report.seconds:.1f} s)")


def _mean(values) -> str:
    finite = [v for v in values if np.isfinite(v)]
    return f"{np.mean(finite):.3g}" if finite else "-"


def _largest(values) -> str:
    finite = [v for v in values or [] if np.isfinite(v)]
    return f"{max(finite):.3g}" if finite else "-"
