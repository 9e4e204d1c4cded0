"""`python -m fdsub_onnx.cli` runs the `fdsub` command."""

from fdsub_onnx.cli.main import app

app(prog_name="fdsub")
