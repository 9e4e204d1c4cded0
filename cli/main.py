"""The `fdsub` app: sub-commands registered here, one per module, behind one error handler."""

from __future__ import annotations

import functools
import os

import typer

import fdsub_onnx
from fdsub_onnx import FdsubError
from fdsub_onnx.cli import check_cmd, decode_cmd, fidelity_cmd, inspect_cmd, nf_cmd, report_cmd, top_cmd

app = typer.Typer(
    name="fdsub",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def guarded(command):
    """Wrap a command: a FdsubError becomes `error: <message>` (exit 2), anything else one line (exit 1).

    With FDSUB_DEBUG=1 an unexpected exception is re-raised with its traceback.
    """

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except FdsubError as exc:
            _fail(f"error: {exc}", 2)
        except KeyboardInterrupt:
            _fail("error: interrupted", 130)
        except Exception as exc:
            if os.environ.get("FDSUB_DEBUG") == "1":
                raise
            what = f"{type(exc).__name__}: {exc}"
            _fail(f"internal error: {what}; please report it (FDSUB_DEBUG=1 shows the traceback)", 1)

    return run


def _fail(message: str, code: int):
    typer.echo(" ".join(message.splitlines()), err=True)
    raise typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fdsub-onnx {fdsub_onnx.__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version and exit.",
    ),
) -> None:
    """Decode the neurons of a CNN exported to ONNX into image-space filters (Filter Decoding with Substitution)."""


app.command("inspect")(guarded(inspect_cmd.inspect))
app.command("decode")(guarded(decode_cmd.decode))
app.command("top")(guarded(top_cmd.top))
app.command("merge")(guarded(top_cmd.merge))
app.command("nf")(guarded(nf_cmd.nf))
app.command("fidelity")(guarded(fidelity_cmd.fidelity))
app.command("check")(guarded(check_cmd.check))
app.command("zoo")(guarded(check_cmd.zoo))
app.command("report")(guarded(report_cmd.report))
