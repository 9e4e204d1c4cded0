"""What the README and the Makefile promise a new user: the inspect JSON example is the demo model's, `make demo`
is quiet and names the report once."""

from __future__ import annotations

import json
import re
from pathlib import Path

from clirun import invoke

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
CONTRACTS = (ROOT / "docs" / "contracts.md").read_text(encoding="utf-8")


def test_readme_inspect_json_example_is_the_demo_models():
    section = CONTRACTS.split("## The inspect JSON contract", 1)[1].split("```text", 1)[1].split("```", 1)[0]
    layers = section.split('"layers": [', 1)[1]
    shown = [json.loads(m) for m in re.findall(r'\{"name": .*?"patch_grid": (?:null|\[[^]]*\])\}', layers, re.S)]
    given = json.loads(re.search(r'"input": (\{.*?\})', section).group(1))
    actual = json.loads(invoke("inspect", ROOT / "models" / "demo.onnx", "--json").stdout)
    assert shown and actual["layers"][: len(shown)] == shown
    assert actual["input"] == given


def test_make_demo_is_quiet_and_names_the_report_once():
    makefile = (ROOT / "Makefile").read_text()
    installs = [line for line in makefile.splitlines() if "pip install" in line]
    assert installs and all(" -q " in line for line in installs), installs
    demo = makefile.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    assert "index.html" not in demo, "the report command prints the path itself"


def test_the_readme_workflow_runs_on_the_demo_model(tmp_path, monkeypatch):
    """Every command of the README's "Your model, your images" block runs: on the demo model, with builtin glyph
    images for photos/ and its conv2 for the layer named there (issue 28)."""
    import shlex

    block = README.split("## Your model, your images", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    commands = [line.split("#", 1)[0].strip() for line in block.strip().splitlines()]
    assert [c.split()[1] for c in commands] == ["inspect", "top", "decode", "report", "check"]
    monkeypatch.chdir(tmp_path)
    for command in commands:
        args = [{"model.onnx": str(ROOT / "models" / "demo.onnx"), "photos/": "builtin:glyphs:24",
                 "layer3.1.conv2": "conv2", "torchvision": "raw"}.get(a, a) for a in shlex.split(command)[1:]]
        result = invoke(*args)
        assert result.exit_code == 0, (command, result.output)
