"""What the commands share (cli/_common.py): progress as plain lines on stderr when it is not a terminal, as a
CliRunner's is, a CI log or ``2>log``; rich's bar and spinner on a terminal."""

from __future__ import annotations

import io
import re
import time
from pathlib import Path

import pytest
from clirun import assert_one_error_line, invoke  # tests/helpers is on sys.path (tests/conftest.py)
from rich.console import Console

from fdsub_onnx.cli import _common

DEMO = Path(__file__).resolve().parents[2] / "models" / "demo.onnx"


def plain(text: str) -> list[str]:
    """The lines of a captured stderr, checked free of escape codes and carriage returns."""
    assert "\x1b" not in text and "\r" not in text, repr(text)
    return text.splitlines()


def test_top_says_each_stage_start_and_end(tmp_path, monkeypatch):
    monkeypatch.setattr(_common, "SPINNER_GRACE", 0)  # every stage counts as slow enough to be said
    result = invoke("top", DEMO, "--layer", "conv2", "--images", "builtin:glyphs:64", "--out", tmp_path / "top")
    assert result.exit_code == 0, result.output
    lines = plain(result.stderr)
    assert any(re.fullmatch(r"conv2 top: 0/64 images(, ETA [\d.]+ s)?", line) for line in lines), lines
    assert any(re.fullmatch(r"conv2 top: 64/64 images in [\d.]+ s", line) for line in lines), lines
    assert not any("images/s" in line for line in lines), lines  # the default interval is longer than this run
    assert "top.npz" in result.stdout and "conv2 top" not in result.stdout  # progress is stderr's


def test_an_advancing_stage_says_its_rate_and_time_left(tmp_path, monkeypatch):
    monkeypatch.setattr(_common, "PROGRESS_INTERVAL", 0)
    monkeypatch.setattr(_common, "SPINNER_GRACE", 0)
    result = invoke("top", DEMO, "--layer", "conv2", "--images", "builtin:glyphs:64", "--batch-size", 8, "--top", 4,
                    "--out", tmp_path / "top")
    assert result.exit_code == 0, result.output
    moving = [line for line in plain(result.stderr) if re.fullmatch(
        r"conv2 top: \d+/64 images, [\d.,]+ images/s, ETA [\d.]+ s", line)]
    assert len(moving) >= 2, result.stderr


def test_fds_decode_says_its_statistics_and_its_slow_stages(tmp_path, monkeypatch):
    monkeypatch.setattr(_common, "SPINNER_GRACE", 0)  # every spinner stage counts as slow
    result = invoke("decode", DEMO, "--layer", "conv2", "--images", "builtin:glyphs:32", "--top", 4,
                    "--out", tmp_path / "fds")
    assert result.exit_code == 0, result.output
    lines = plain(result.stderr)
    for stage in (f"loading {DEMO}", "decoding conv2", "writing results"):
        at = lines.index(stage)
        assert re.fullmatch(rf"{re.escape(stage)}: done in [\d.]+ s", lines[at + 1]), lines
    assert any(re.fullmatch(r"conv2 statistics \(2 passes\): 64/64 images in [\d.]+ s", line) for line in lines), lines


def test_quick_stages_before_bad_input_leave_its_one_error_line(tmp_path):
    """Loading took less than SPINNER_GRACE: the neurons, refused next, are the only line."""
    result = invoke("decode", DEMO, "--layer", "conv2", "--neurons", 999, "--images", "builtin:glyphs:8",
                    "--mode", "local", "--out", tmp_path / "o")
    assert "out of range" in assert_one_error_line(result)


def test_a_slow_stage_then_an_error_says_the_stage_and_one_error_line(tmp_path, monkeypatch):
    """A stage that ran past the grace said so; a failed stage has no end line, and its error is the last line."""
    monkeypatch.setattr(_common, "SPINNER_GRACE", 0)
    result = invoke("decode", DEMO, "--layer", "conv2", "--neurons", 999, "--out", tmp_path / "o")
    lines = plain(result.stderr)
    assert result.exit_code == 2 and lines[-1].startswith("error: ") and "out of range" in lines[-1], lines
    assert [line for line in lines if line.startswith("error")] == lines[-1:]
    assert lines[:2] == [f"loading {DEMO}", f"loading {DEMO}: done in {lines[1].rsplit(' in ', 1)[1]}"], lines
    assert not any(line.startswith("decoding conv2:") for line in lines), lines  # failed: no end line


def test_spinner_lines_follow_what_it_is_told():
    stream = io.StringIO()
    console = Console(file=stream)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_common, "SPINNER_GRACE", 0)
        patch.setattr(_common, "PROGRESS_INTERVAL", 0)
        with _common.spinner("checking [bold]m[/]", console=console) as say:
            say("decoding conv1")
            say("probing for dead neurons")
    lines = plain(stream.getvalue())
    assert lines[0] == "checking [bold]m[/]" and lines[-1].startswith("checking [bold]m[/]: done in "), lines
    assert lines[-2] == "probing for dead neurons", lines


def test_a_quick_bar_says_nothing():
    """A stage over within the grace (a capture of a few images before a result folder is refused) writes no line,
    so the command's one `error:` line stays alone."""
    stream = io.StringIO()
    with _common.progress_bar("conv2 top", console=Console(file=stream)) as bar:
        bar(0, 6)
        bar(6, 6)
    assert stream.getvalue() == ""


def test_a_quick_spinner_says_nothing():
    stream = io.StringIO()
    with _common.spinner("loading m.onnx", console=Console(file=stream)):
        pass
    assert stream.getvalue() == ""


def test_an_estimate_gives_the_time_left_before_any_rate(monkeypatch):
    monkeypatch.setattr(_common, "SPINNER_GRACE", 0)
    stream = io.StringIO()
    with _common.progress_bar("report", unit="steps", console=Console(file=stream), estimate=125) as bar:
        bar(0, 98)
    assert "report: 0/98 steps, ETA 2 min 05 s" in plain(stream.getvalue())
    stream = io.StringIO()  # on a terminal: rich's bar, the same estimate in its time column
    with _common.progress_bar("report", unit="steps", estimate=125,
                              console=Console(file=stream, width=80, force_terminal=True, color_system=None)) as bar:
        bar(0, 98)
    assert re.search(r"0/98 .* 0:02:0[45]", stream.getvalue()), stream.getvalue()


def test_slow_fractional_steps_are_seen_to_move(monkeypatch):
    """A report at "1/98 0.0 steps/s" for minutes: fractions of steps and slow rates are shown."""
    monkeypatch.setattr(_common, "PROGRESS_INTERVAL", 0)
    monkeypatch.setattr(_common, "SPINNER_GRACE", 0)
    stream = io.StringIO()
    with _common.progress_bar("report", unit="steps", console=Console(file=stream)) as bar:
        bar(1, 98)
        bar(1.4, 98)
    assert re.fullmatch(r"report: 1\.4/98 steps, [\d.,e-]+ steps/s, ETA .+", plain(stream.getvalue())[-2])
    assert _common._rate(0.015) == "0.015" and _common._rate(12.34) == "12.3"
    assert _common._remaining(0, 0, 20, 10.0, 5.0) is None  # the plan outrun and nothing moved: unknown, not 0 s
    assert _common._remaining(20, 20, 40, 3.0, 2.0) is None and _common._remaining(0, 0, 20, 1.0, 5.0) == 4.0
    assert [_common._duration(s) for s in (3.24, 26.4, 245, 3900)] == ["3.2 s", "26 s", "4 min 05 s", "1 h 05 min"]


def test_a_stage_that_counts_nothing_is_still_shown(monkeypatch):
    """A bottom-up decode calls progress only when done: past the grace it shows as a spinner would."""
    monkeypatch.setattr(_common, "SPINNER_GRACE", 0)
    stream = io.StringIO()
    with _common.progress_bar("decoding conv4", unit="steps", console=Console(file=stream)):
        pass
    lines = plain(stream.getvalue())
    assert lines[0] == "decoding conv4" and lines[1].startswith("decoding conv4: done in "), lines
    stream = io.StringIO()
    terminal = Console(file=stream, width=80, force_terminal=True, color_system=None)
    with _common.progress_bar("decoding conv4", unit="steps", console=terminal):
        time.sleep(0.3)  # the timer opens the bar
    assert "decoding conv4" in stream.getvalue()
