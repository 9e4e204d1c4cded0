"""Running the `fdsub` command line in tests: in process (typer's CliRunner), or in a child process whose memory
and time are capped (for inputs that, unbounded, would allocate without end or hang)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys

from typer.testing import CliRunner

from fdsub_onnx.cli.main import app

runner = CliRunner()
LIMIT_BYTES = 3 << 30  # address space of a capped child: a bounded run needs far less


def invoke(*args, **kwargs):
    """``fdsub ARGS`` in process; every argument as text."""
    return runner.invoke(app, [str(a) for a in args], **kwargs)


def assert_one_error_line(result, code=2, prefix="error: "):
    """The README's promise: exit ``code`` and exactly one line, ``error: ...``, no traceback."""
    lines = result.output.strip().splitlines()
    assert result.exit_code == code, result.output
    assert len(lines) == 1, result.output
    assert lines[0].startswith(prefix), result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    return lines[0]


class Capped:
    """What a capped child run gave: exit code and output, with ``output`` the stdout and stderr joined."""

    def __init__(self, completed: subprocess.CompletedProcess):
        self.exit_code = completed.returncode
        self.stdout, self.stderr = completed.stdout, completed.stderr
        self.output = completed.stdout + completed.stderr
        self.exception = None


def run_capped(*args, timeout: float = 60, limit: int = LIMIT_BYTES, cwd=None) -> Capped:
    """``fdsub ARGS`` in a child process limited to ``limit`` bytes of address space; killed after ``timeout`` s."""

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    env.pop("FDSUB_DEBUG", None)
    completed = subprocess.run([sys.executable, "-m", "fdsub_onnx.cli", *map(str, args)], capture_output=True,
                               text=True, timeout=timeout, preexec_fn=cap, env=env, cwd=cwd)
    return Capped(completed)
