"""The seed's walk-through runs as a script and as a notebook."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow
def test_walkthrough_script_runs():
    result = subprocess.run([sys.executable, str(EXAMPLES / "walkthrough.py")], capture_output=True, text=True,
                            env=os.environ, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "epoch 1/1 | batch 300/300" in result.stdout
    assert "what is your name?" in result.stdout.split("batch 300/300")[-1]  # the sample follows the training log


@pytest.mark.slow
def test_walkthrough_notebook_runs():
    """Every cell, in a kernel, with the training cut to 30 batches: the script above trains all 300."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(EXAMPLES / "walkthrough.ipynb", as_version=4)
    training = next(cell for cell in notebook.cells if "total_batches = 1, 300" in cell.source)
    training.source = training.source.replace("total_batches = 1, 300", "total_batches = 1, 30")
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(EXAMPLES)}}).execute()
    outputs = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for o in cell.get("outputs", []))
    assert "batch 30/30" in outputs and "what is your name?" in outputs
