"""Notebook conventions: no committed outputs, student versions generated, solutions hidden."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(p for p in ROOT.glob("**/*.ipynb")
                   if not any(part.startswith(".") or part == "_build" for part in p.parts))


def test_there_are_notebooks():
    assert any(p.parent.name == "chapters" for p in NOTEBOOKS)
    assert any(p.parent.name == "exercises" for p in NOTEBOOKS)


def test_notebooks_are_committed_without_outputs():
    dirty = [str(p.relative_to(ROOT)) for p in NOTEBOOKS
             if any(c.get("outputs") or c.get("execution_count")
                    for c in json.loads(p.read_text())["cells"] if c["cell_type"] == "code")]
    assert dirty == []


def test_student_versions_match_their_sources():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "make_student.py"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def test_every_solution_is_hidden_behind_a_click_in_the_book():
    for path in sorted((ROOT / "exercises").glob("*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            if "### BEGIN SOLUTION" in "".join(cell["source"]):
                assert "hide-input" in cell.get("metadata", {}).get("tags", []), path.name
