"""`fdsub check MODEL` and `fdsub zoo ZOO.toml`: pass/fail checks of models for CI (exit 0 pass, 1 fail, 2 error)."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import fdsub_onnx
from fdsub_onnx import CHECK_IMAGES as DEFAULT_IMAGES
from fdsub_onnx import FdsubError
from fdsub_onnx.cli import _common as common

JSON = typer.Option(False, "--json", help="Print one JSON object instead of the table.")
JUNIT = typer.Option(None, "--junit", metavar="FILE", help="Also write a JUnit XML report to FILE.")
STYLE = {"pass": "green", "fail": "bold red", "skip": "yellow", "error": "bold red"}


def check(
    model: str = common.MODEL,
    layers: Optional[str] = typer.Option(
        None, "--layers", "-l", metavar="NAMES",
        help="Layers to decode and probe, comma separated, or all: every decodable layer "
             "(default: --sample layers from the first to the deepest).",
    ),
    sample: int = typer.Option(3, "--sample", callback=common.count_limit,
                               help="Without --layers: how many decodable layers, evenly spread."),
    neurons_per_layer: int = typer.Option(4, "--neurons-per-layer", "-k", callback=common.count_limit,
                                          help="Neurons decoded per layer."),
    max_rf: Optional[int] = typer.Option(
        None, "--max-rf", metavar="PX",
        help="Without --layers: sample only layers whose receptive field is at most PX "
             "(default: any that fits the image); layers decoded per position (after an upsampling) are sampled "
             "whatever PX.",
    ),
    images: str = typer.Option(
        DEFAULT_IMAGES, "--images", "-i", metavar="SPEC",
        help="Probe images of the dead-neuron check: a .npy/.npz array, a folder or builtin:glyphs|gratings|blobs[:N].",
    ),
    preset: str = common.PRESET,
    mean: Optional[str] = common.MEAN,
    std: Optional[str] = common.STD,
    scale: Optional[float] = common.SCALE,
    bgr: Optional[bool] = common.BGR,
    min_coverage: Optional[float] = typer.Option(
        None, "--min-coverage", metavar="X",
        help="Fail when less than this share of the layers is decodable (default: coverage reported, not a limit).",
    ),
    max_dead: float = typer.Option(0.5, "--max-dead", help="Largest share of dead neurons allowed in a sampled layer."),
    max_degenerate: float = typer.Option(
        0.0, "--max-degenerate", help="Largest share of decoded filters allowed to be NaN, all zero or constant.",
    ),
    tolerance: float = typer.Option(
        1e-4, "--tolerance", help="Largest error of the weights identity, relative to the largest |activation|.",
    ),
    expect_decodable: Optional[str] = typer.Option(
        None, "--expect-decodable", metavar="N|NAMES",
        help="Also check the decodable layers: exactly N of them, or these names (comma separated).",
    ),
    dtype: str = typer.Option(
        "float64", "--dtype",
        help="Decoding precision of the identity check: float64 (float32 rounding is no model defect) or float32.",
    ),
    input_shape: Optional[str] = common.INPUT_SHAPE,
    as_json: bool = JSON,
    junit: Optional[Path] = JUNIT,
    memory_budget: Optional[str] = common.MEMORY_BUDGET,
    plan: bool = common.PLAN,
) -> None:
    """Check MODEL for decoding: coverage, weights identity, NaN/Inf weights, dead neurons, degenerate filters.

    The identity is checked on a linearized copy of the model. Exit 0 when every check passes, 1 when one
    fails, 2 when MODEL cannot be checked.
    """
    start = time.perf_counter()
    if junit is not None:
        fdsub_onnx.check_junit_path(junit)
    try:
        shape = common.parse_input_shape(input_shape)
        with common.spinner(f"loading {model}"):
            loaded = fdsub_onnx.load_model(model, shape)
            probes = fdsub_onnx.open_images(images, loaded.input_shape[1:],
                                            **common.preprocessing(preset, mean, std, scale, bgr))
            cost = fdsub_onnx.estimate_check(loaded, _names(layers), sample, neurons_per_layer, max_rf, len(probes),
                                             dtype=dtype)
        if common.planned(plan, cost, "check fewer --layers or a smaller --sample or --neurons-per-layer"):
            return
        with common.spinner(f"checking {model}") as say:
            report = fdsub_onnx.check_model(
                loaded, layers=_names(layers), sample=sample, neurons_per_layer=neurons_per_layer, max_rf=max_rf,
                images=probes,
                min_coverage=min_coverage, max_dead=max_dead, max_degenerate=max_degenerate, tolerance=tolerance,
                expect_decodable=_expected(expect_decodable), dtype=dtype, progress=say,
            )
    except FdsubError as exc:
        if junit is not None:  # CI still gets a report naming the error
            _write_junit_quietly(junit, [fdsub_onnx.junit_suite(None, model, str(exc), time.perf_counter() - start)])
        raise
    if junit is not None:
        fdsub_onnx.write_junit(fdsub_onnx.junit_document([fdsub_onnx.junit_suite(report, model)], "fdsub check"), junit)
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
    else:
        _print_report(report)
    if loaded.dequantized:
        typer.echo(f"note: {fdsub_onnx.dequantized_note(loaded.dequantized)}", err=True)
    if not report.passed:
        raise typer.Exit(1)


def zoo(
    zoo_file: Path = typer.Argument(..., metavar="ZOO", help="The zoo .toml file.", show_default=False),
    models: Optional[str] = typer.Option(
        None, "--models", "-m", metavar="NAMES", help="Check only these zoo models, comma separated (default: all).",
    ),
    as_json: bool = JSON,
    junit: Optional[Path] = JUNIT,
    cluster: Optional[str] = common.CLUSTER,
    memory_budget: Optional[str] = common.MEMORY_BUDGET,
    plan: bool = common.PLAN,
) -> None:
    """Check every model listed in ZOO (models/zoo.toml) and print one summary table.

    Exit 0 when every model passes, 1 when one fails, 2 when one cannot be checked (or ZOO cannot be read).
    """
    if junit is not None:
        fdsub_onnx.check_junit_path(junit)
    entries = fdsub_onnx.read_zoo(zoo_file)
    if models is not None:
        wanted = _names(models) or []
        unknown = [n for n in wanted if n not in {e.name for e in entries}]
        if unknown:
            raise FdsubError(f"no model named {', '.join(map(repr, unknown))} in {zoo_file}; "
                             f"it lists {', '.join(e.name for e in entries)}")
        entries = [e for e in entries if e.name in wanted]
    with common.spinner(f"planning {len(entries)} models"):
        cost = fdsub_onnx.estimate_zoo(entries)
    if common.planned(plan, cost, "check fewer --models, or lower sample / neurons_per_layer in the zoo file"):
        return
    start = time.perf_counter()
    with common.cluster(cluster) as client, common.spinner(f"checking {len(entries)} models") as say:
        results = fdsub_onnx.run_zoo(entries, progress=say, client=client)
    seconds = time.perf_counter() - start
    if junit is not None:
        suites = [fdsub_onnx.junit_suite(r.report, r.model.name, r.error,  # its diff's time is the diff suite's
                                         r.seconds - (r.diff.seconds if r.diff is not None else 0.0))
                  for r in results]
        suites += [fdsub_onnx.diff_suite(r.diff) for r in results if r.diff is not None]
        fdsub_onnx.write_junit(fdsub_onnx.junit_document(suites, f"fdsub zoo {zoo_file}"), junit)
    statuses = [r.status for r in results]
    overall = "error" if "error" in statuses else "fail" if "fail" in statuses else "pass"
    if as_json:
        typer.echo(json.dumps({"zoo": str(zoo_file), "status": overall, "seconds": round(seconds, 3),
                               "models": [r.to_json() for r in results]}, indent=2))
    else:
        _print_zoo(results, overall, seconds)
    if overall != "pass":
        raise typer.Exit(2 if overall == "error" else 1)


# ---- options ------------------------------------------------------------------------------------
def _names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise FdsubError(f"give at least one name, comma separated; got {text!r}")
    return names


def _expected(text: str | None):
    if text is None:
        return None
    return int(text) if text.strip().isdigit() else _names(text)


def _write_junit_quietly(path: Path, suites) -> None:
    with contextlib.suppress(FdsubError):  # the original error is the one to report
        fdsub_onnx.write_junit(fdsub_onnx.junit_document(suites, "fdsub check"), path)


# ---- output -------------------------------------------------------------------------------------
def _console() -> Console:
    return common.stdout_console()


def _status(status: str) -> str:
    return f"[{STYLE[status]}]{status.upper()}[/]"


def _print_report(report) -> None:
    console = _console()
    table = Table(title=escape(f"{report.model} (input {report.input_shape}; sampled layers: "
                               f"{', '.join(report.sampled) or 'none'})"), title_justify="left")
    for column in ("check", "status", "value", "limit", "result"):
        table.add_column(column, overflow="fold", justify="right" if column in ("value", "limit") else "left")
    for c in report.checks:
        details = c.details if c.status != "pass" or c.name in ("identity", "dead-neurons") else []
        text = "\n".join([c.summary, *(f"  {d}" for d in details[:10])])
        if len(details) > 10:
            text += f"\n  ... {len(details) - 10} more"
        table.add_row(escape(c.name), _status(c.status), _number(c.value), _number(c.limit), escape(text))
    console.print(table)
    failed = [c.name for c in report.checks if c.failed]
    verdict = f"{_status('fail')}: {', '.join(failed)}" if failed else _status("pass")
    console.print(f"{verdict} ({len(report.checks)} checks, {report.seconds:.1f} s)")


def _drift(result) -> str:
    """The largest filter drift from the entry's baseline, or - where it has none."""
    if result.diff is None:
        return "-"
    return f"{max((d.worst for d in result.diff.layers), default=0.0):.2g}"


def _print_zoo(results, overall: str, seconds: float) -> None:
    console = _console()
    table = Table(title="fdsub zoo", title_justify="left")
    drift = any(r.diff is not None for r in results)
    for column in ("model", "coverage", "identity error", "dead", "degenerate", *(["drift"] if drift else []),
                   "status", "seconds"):
        table.add_column(column, overflow="fold", justify="left" if column in ("model", "status") else "right")
    for r in results:
        shown = [_drift(r)] if drift else []
        if r.report is None:
            table.add_row(escape(r.model.name), "-", "-", "-", "-", *["-"] * len(shown), _status("error"),
                          f"{r.seconds:.1f}")
            continue
        rep = r.report
        identity, dead, degenerate = (rep.check(n) for n in ("identity", "dead-neurons", "degenerate-filters"))
        table.add_row(
            escape(r.model.name), f"{rep.decodable}/{rep.layers}", _value(identity, "{:.1e}"), _value(dead, "{:.0%}"),
            _value(degenerate, "{:.0%}"), *shown, _status(r.status), f"{r.seconds:.1f}",
        )
    console.print(table)
    for r in results:
        if r.report is None:
            console.print(f"{escape(r.model.name)}: error: {escape(r.error or '')}", highlight=False)
        else:
            for c in r.report.checks:
                if c.failed:
                    console.print(f"{escape(r.model.name)}: {c.name} failed: {escape(c.summary)}", highlight=False)
            for line in (r.diff.failures if r.diff is not None else []):
                console.print(f"{escape(r.model.name)}: drift from its baseline: {escape(line)}", highlight=False)
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "error")}
    console.print(f"{_status(overall)}: {counts['pass']} passed, {counts['fail']} failed, {counts['error']} errors "
                  f"of {len(results)} models ({seconds:.1f} s)")


def _number(value) -> str:
    return "-" if value is None else f"{value:.3g}"


def _value(check, form: str) -> str:
    if check is None or check.value is None:
        return "skip" if check is not None else "-"
    return form.format(check.value)
