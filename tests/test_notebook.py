"""docs/notebook.ipynb runs from top to bottom (nbclient), and what it shows fits a screen (issue 28)."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "docs" / "notebook.ipynb"


def test_the_notebook_runs_and_each_result_fits_a_screen():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "outputs stripped"
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
                   ).execute()
    shown = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in shown if o.output_type == "error"]
    texts = [o["data"]["text/plain"] for o in shown if o.output_type == "execute_result" and "text/plain" in o["data"]]
    assert len(texts) == 5 and all(len(text.splitlines()) <= 20 and "array(" not in text for text in texts), texts
    assert any("image/png" in o.get("data", {}) for o in shown), "the neuron card shows as a picture"
