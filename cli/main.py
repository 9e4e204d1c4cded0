"""The `fdsub` app: sub-commands registered here (``COMMANDS``), behind one error handler.

Every failure the user can fix ends as one line ``error: <problem>; <fix>`` and exit 2: a command's
FdsubError, and click's own parse errors (unknown option or command, a value of the wrong type, a missing
option), which typer would otherwise draw as a box. The help is click's plain text: flags with their types
(``--sample <int>``), defaults shown, and fast, because nothing here imports onnx (``fdsub_onnx`` loads its parts
on first use).
"""

from __future__ import annotations

import functools
import os
import sys

import typer
from typer.core import TyperGroup

import fdsub_onnx
from fdsub_onnx import FdsubError
from fdsub_onnx.cli import check_cmd, decode_cmd, diff_cmd, fidelity_cmd, inspect_cmd, nf_cmd, report_cmd, top_cmd

USAGE_EXIT = 2
#: click's base error class (typer 0.12 uses click's own; later typers vendor click, with their own classes)
CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class _Fdsub(TyperGroup):
    """The command group, parsing in click's non-standalone mode so that its errors come back to be said in one
    line (typer's standalone mode prints them in a box)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        for stream in (sys.stdout, sys.stderr):  # names of files that are not UTF-8 print escaped, never crash
            if hasattr(stream, "reconfigure"):
                stream.reconfigure(errors="backslashreplace")
        try:
            code = super().main(args, prog_name or "fdsub", complete_var, standalone_mode=False, **extra)
        except typer.Abort:
            code = _said("error: interrupted", 130)
        except CLICK_ERROR as exc:
            code = _said(parse_error(exc, self), USAGE_EXIT)
        code = code if isinstance(code, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


def parse_error(exc, group) -> str:
    """Click's message as the one ``error:`` line, with where to look for the fix."""
    message = " ".join(exc.format_message().split()).rstrip(".")
    ctx = getattr(exc, "ctx", None)
    path = ctx.command_path if ctx is not None else "fdsub"
    commands = ", ".join(group.list_commands(ctx) if ctx is not None else group.commands)
    if message == "Missing command":
        return f"error: no command given; choose one of {commands} (`fdsub --help` says what each does)"
    if message.startswith("No such command"):
        return f"error: {message}; the commands are {commands} (`fdsub --help`)"
    return f"error: {message} (`{path} --help` lists the options)"


def _said(line: str, code: int) -> int:
    typer.echo(line, err=True)
    return code


app = typer.Typer(
    name="fdsub",
    cls=_Fdsub,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["--help", "-h"]},
)


def guarded(command):
    """Wrap a command: a FdsubError becomes `error: <message>` (exit 2), anything else one line (exit 1); a
    command's ``--memory-budget`` holds while it runs.

    With FDSUB_DEBUG=1 an unexpected exception is re-raised with its traceback.
    """

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            with fdsub_onnx.budget(kwargs.get("memory_budget")):
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
    """Decode the neurons of a network exported to ONNX (CNNs, vision transformers) into image-space filters
    (Filter Decoding with Substitution). Start with `fdsub inspect MODEL`; the README has the workflow."""


COMMANDS = {  # name: (function, one-line summary for `fdsub --help`)
    "inspect": (inspect_cmd.inspect, "Layers: stride, receptive field, origin, decodable."),
    "decode": (decode_cmd.decode, "Decode neurons into image-space filters."),
    "top": (top_cmd.top, "Each neuron's strongest instances over images."),
    "merge": (top_cmd.merge, "Combine `fdsub top --shard` results into one."),
    "nf": (nf_cmd.nf, "Neuron Feature: mean of the top-N patches."),
    "fidelity": (fidelity_cmd.fidelity, "How well each decoding predicts its neurons."),
    "report": (report_cmd.report, "One HTML page comparing every decoding."),
    "check": (check_cmd.check, "Check a model for decoding (CI: exit 0/1/2)."),
    "zoo": (check_cmd.zoo, "Run `fdsub check` on every model of a zoo file."),
    "diff": (diff_cmd.diff, "What changed neuron by neuron between two models (CI: exit 0/1/2)."),
    "fingerprint": (diff_cmd.fingerprint, "Save what a later `fdsub diff` against a model needs."),
}
for _name, (_function, _summary) in COMMANDS.items():
    app.command(_name, short_help=_summary)(guarded(_function))
