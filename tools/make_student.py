"""Generate the student version of every exercise notebook.

Source notebooks live in `exercises/*.ipynb` and contain the solutions, marked as in
nbgrader:

    ### BEGIN SOLUTION          -> replaced by `raise NotImplementedError(...)`
    ### END SOLUTION
    ### BEGIN ANSWER            -> removed (a prediction the reader writes on the line
    ### END ANSWER                 above, `name = ...`)
    ### BEGIN HIDDEN TESTS      -> removed
    ### END HIDDEN TESTS

The hidden tests sit in cells of their own tagged `remove-cell`, so the book does not
show them; the graded cases themselves live in `kvlib.grading`. The student versions
are written to `exercises/student/` with outputs cleared, the `hide-input` tag (which
hides solutions behind a click in the book) removed, and the cells that are left empty
or are tagged `book-only` (the link to the student version) dropped.

    python tools/make_student.py          # write the student versions
    python tools/make_student.py --check  # exit 1 if a committed version is stale
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIR = ROOT / "exercises"
STUDENT_DIR = SOURCE_DIR / "student"
STUB = 'raise NotImplementedError("your code here")'
BLOCK = re.compile(r"^([ \t]*)### BEGIN (SOLUTION|ANSWER|HIDDEN TESTS)\n.*?^[ \t]*### END \2\n?",
                   re.M | re.S)


DEFINITION = re.compile(r"^(?:def|class) (\w+)", re.M)


def strip_source(source: str) -> tuple[str, bool]:
    """Student text of one cell, and whether a stub now runs at top level."""
    top_level_stub = False

    def replace(match: re.Match) -> str:
        nonlocal top_level_stub
        indent, kind = match.group(1), match.group(2)
        if kind != "SOLUTION":
            return ""
        top_level_stub |= indent == ""
        return f"{indent}{STUB}\n"

    return BLOCK.sub(replace, source), top_level_stub


def calls_any(source: str, names: set[str]) -> bool:
    """Whether the cell calls one of `names` (a function or class the student writes)."""
    return any(re.search(rf"\b{name}\(", source) for name in names)


def student_notebook(nb: dict) -> dict:
    """The student version of one notebook. A cell that runs a stub, at top level or by
    calling a function left for the student, is tagged `raises-exception` for nbval."""
    cells, stubbed = [], set()
    for cell in nb["cells"]:
        cell = json.loads(json.dumps(cell))
        if "book-only" in cell.get("metadata", {}).get("tags", []):
            continue
        source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        if cell["cell_type"] == "code":
            stripped, top_level_stub = strip_source(source)
            defined = set(DEFINITION.findall(stripped))
            runs_stub = top_level_stub or calls_any(stripped, stubbed - defined)
            if stripped != source:
                stubbed |= defined
            source = stripped
            if not source.strip():
                continue
            cell["outputs"], cell["execution_count"] = [], None
            tags = [t for t in cell.get("metadata", {}).get("tags", []) if t != "hide-input"]
            if runs_stub and "raises-exception" not in tags:
                tags.append("raises-exception")
            cell.setdefault("metadata", {})["tags"] = tags
            if not tags:
                del cell["metadata"]["tags"]
        cell["source"] = source.splitlines(keepends=True)
        cells.append(cell)
    return {**nb, "cells": cells}


def render(nb: dict) -> str:
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args()
    stale = []
    for source in sorted(SOURCE_DIR.glob("*.ipynb")):
        target = STUDENT_DIR / source.name
        text = render(student_notebook(json.loads(source.read_text())))
        if args.check:
            if not target.exists() or target.read_text() != text:
                stale.append(target.relative_to(ROOT))
        else:
            STUDENT_DIR.mkdir(exist_ok=True)
            target.write_text(text)
    if stale:
        print("student notebooks out of date (run `make exercises`):",
              *map(str, stale), sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
