"""Every example command of the README and docs/ runs (issue 28): each ```sh block's `fdsub ...` lines, in order,
one folder per page, on the demo model with builtin images in place of the user's model and photos.

Those that need a GPU, a cluster or a model zoo run only with FDSUB_DOCS_ALL=1 (``make test`` skips them and says
why); a GPU one then needs a GPU, a `tcp://` cluster one a real cluster (those stay skipped)."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from clirun import invoke

from fdsub_onnx.compose.backend import gpu_unavailable

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DEMO = str(ROOT / "models" / "demo.onnx")
IMAGES = "builtin:glyphs:12"
#: what the examples name -> what runs here (the demo model is 64 x 64 with layers conv1..conv4)
STANDS_FOR = {
    "model.onnx": DEMO, "float.onnx": DEMO, "int8.onnx": DEMO, "release.onnx": DEMO, "release-1.onnx": DEMO,
    "release-2.onnx": DEMO, "next.onnx": DEMO,
    "photos/": IMAGES, "train/": IMAGES, "val/": IMAGES, "/shared/train": IMAGES, "/shared/val": IMAGES,
    "layer3.1.conv2": "conv2", "/features/features.28/Conv_output_0": "conv4", "1,3,224,224": "1,3,64,64",
    "models/zoo.toml": str(ROOT / "models" / "zoo.toml"),
    "100": "6",  # --top 100: the 12 builtin images hold fewer; a holdout must hold more than the top
}
ALL = os.environ.get("FDSUB_DOCS_ALL") == "1"
SLOW = ("--cluster", "zoo ", "--layers all --neurons all", "--device gpu")  # run with FDSUB_DOCS_ALL=1
NEVER = ("tcp://",)  # a real cluster's address: documentation of a setup, not runnable here
MAY_FAIL = ("check", "diff", "zoo")  # exit 1 is their verdict (a limit crossed), not an error


def commands(page: Path) -> list[str]:
    """The `fdsub` lines of the page's ```sh blocks, comments cut, `a && b` split."""
    found = []
    for block in re.findall(r"```sh\n(.*?)```", page.read_text(encoding="utf-8"), re.S):
        for line in block.splitlines():
            line = line.split(" #", 1)[0].strip()
            found += [part.strip() for part in line.split("&&") if part.strip().startswith("fdsub ")]
    return found


def runnable(command: str) -> str | None:
    """Why a command does not run in ``make test`` (None: it runs)."""
    if any(mark in command for mark in NEVER):
        return "needs a real cluster"
    if not ALL and any(mark in command for mark in SLOW):
        return "GPU, cluster or zoo: FDSUB_DOCS_ALL=1"
    if "--device gpu" in command and gpu_unavailable():
        return f"needs a GPU ({gpu_unavailable()})"
    return None


def test_the_docs_have_example_commands():
    every = [c for page in PAGES for c in commands(page)]
    assert len(every) >= 45, len(every)
    assert sum(runnable(c) is None for c in every) >= 38


@pytest.mark.parametrize("page", [p for p in PAGES if commands(p)], ids=lambda p: p.name)
def test_every_example_command_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.save("x.npy", np.random.default_rng(0).uniform(0, 1, (12, 3, 64, 64)).astype(np.float32))
    ran, skipped = 0, []
    for command in commands(page):
        why = runnable(command)
        if why:
            skipped.append((command, why))
            continue
        args = [STANDS_FOR.get(a, a) for a in shlex.split(command)[1:]]
        shards = [args]
        if "--shard" in args:  # the page shows shard 0 of 4 and says "... --shard 3/4": run them all
            at = args.index("--shard")
            out = args.index("--out")
            shards = [args[:at + 1] + [f"{i}/4"] + args[at + 2 : out + 1] + [f"out/s{i}"] + args[out + 2 :]
                      for i in range(4)]
        for one in shards:
            result = invoke(*one)
            allowed = (0, 1) if one[0] in MAY_FAIL else (0,)
            assert result.exit_code in allowed, f"{page.name}: {command}\n{result.output[-2000:]}"
            assert "Traceback" not in result.output, f"{page.name}: {command}\n{result.output[-2000:]}"
        ran += 1
    assert ran or skipped, page.name
