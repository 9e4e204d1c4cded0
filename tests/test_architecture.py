"""The one-way architecture (docs/architecture.md): no part imports a higher one, the CLI uses the public API only,
nothing imports inside a function to dodge a circle, and no module cites a file outside the repository."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import fdsub_onnx

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fdsub_onnx"
#: lowest first; a module may import its own part and the parts before it
LAYERS = ("errors", "defaults", "neurons", "data", "graph", "compose", "runtime", "modes", "evaluate", "present")


def _part(module: str) -> str | None:
    """The part of ``fdsub_onnx.<part>...`` (None for the package's own __init__)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    names = list(rel.parts)
    if names[-1] == "__init__":
        names = names[:-1]
    return ".".join(names)


def _imports(tree: ast.AST, module: str, is_package: bool):
    """(line, imported fdsub_onnx module, inside a function?) for every import of the package in ``tree``."""
    functions = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f)}
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] + [f"{target}.{a.name}" for a in node.names]
        for name in names:
            if name == "fdsub_onnx" or name.startswith("fdsub_onnx."):
                yield node.lineno, name, id(node) in functions


def upward_imports(path: Path, text: str | None = None) -> list[str]:
    """The imports in ``path`` (a module of fdsub_onnx) of a part above its own, or inside a function."""
    module = _module_name(path)
    own = _part(module)
    tree = ast.parse(text if text is not None else path.read_text())
    problems = []
    for line, name, in_function in _imports(tree, module, path.name == "__init__.py"):
        part = _part(name)
        if in_function:
            problems.append(f"{path.name}:{line} imports {name} inside a function")
        if own is None or part is None or part not in LAYERS or own not in LAYERS:
            continue
        if LAYERS.index(part) > LAYERS.index(own):
            problems.append(f"{module}:{line} imports {name}, a higher part ({part} above {own})")
    return problems


LIBRARY = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_upward_or_function_level_import(path):
    assert upward_imports(path) == []


def test_the_check_catches_an_upward_import():
    """A graph module importing modes, and a function-level import, are both reported (the check can fail)."""
    path = PACKAGE / "graph" / "geometry.py"
    assert upward_imports(path, "from ..modes.decode import decode\n")
    assert upward_imports(path, "def f():\n    from .model import Model\n")
    assert upward_imports(path, "from .model import Model\n") == []


def test_every_part_is_a_known_layer():
    parts = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert parts | modules == set(LAYERS)


@pytest.mark.parametrize("path", sorted((ROOT / "cli").glob("*.py")), ids=lambda p: p.name)
def test_cli_uses_the_public_api_only(path):
    """Commands import ``fdsub_onnx`` names from ``__all__`` (or the CLI's own modules), nothing deeper."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fdsub_onnx"):
            if node.module.startswith("fdsub_onnx.cli"):
                continue
            assert node.module == "fdsub_onnx", f"{path.name}:{node.lineno} imports from {node.module}"
            missing = [a.name for a in node.names if a.name not in fdsub_onnx.__all__]
            assert not missing, f"{path.name}:{node.lineno} imports {missing}, not in fdsub_onnx.__all__"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                assert not alias.name.startswith("fdsub_onnx.") or alias.name.startswith("fdsub_onnx.cli"), alias.name
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "fdsub_onnx":
            assert node.attr in fdsub_onnx.__all__ + ["__version__"], f"{path.name}:{node.lineno} uses {node.attr}"


def test_public_api_exports_what_it_lists():
    assert sorted(set(fdsub_onnx.__all__)) == sorted(fdsub_onnx.__all__)
    assert all(hasattr(fdsub_onnx, name) for name in fdsub_onnx.__all__)


OUTSIDE = re.compile(r"(\.\./shared|(?<!docs/)\bMETHOD\.md|STYLE\.md|SEED-paper)")


@pytest.mark.parametrize("path", LIBRARY + sorted((ROOT / "cli").glob("*.py")), ids=lambda p: p.name)
def test_no_module_cites_a_file_outside_the_repository(path):
    assert not OUTSIDE.search(path.read_text()), f"{path} cites a file outside the repository"
    for cited in re.findall(r"docs/[\w.-]+\.md", path.read_text()):
        assert (ROOT / cited).exists(), f"{path} cites {cited}, which does not exist"
