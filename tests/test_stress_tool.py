"""tools/stress.py reads back the numbers a notebook glued."""

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from stress import glued_numbers  # noqa: E402


def test_glued_numbers_of_an_executed_notebook():
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        "from myst_nb import glue\n"
        "glue('speedup', 3.5, display=False)\n"
        "glue('shown', 'text')\n"
        "print('not glued')")]
    NotebookClient(nb, timeout=60, kernel_name="python3").execute()
    assert glued_numbers(nb) == {"speedup": "3.5", "shown": "'text'"}
