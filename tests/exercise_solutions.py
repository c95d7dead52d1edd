"""The solutions of an exercise notebook, loaded for the grader tests.

`solutions("ex01_attention")` runs the imports of the notebook and every cell that holds
a `### BEGIN SOLUTION` or `### BEGIN ANSWER` block (nothing else: no model is loaded)
and returns the resulting names, so the tests grade exactly the code the book shows.
"""

import ast
import json
from pathlib import Path
from types import SimpleNamespace

EXERCISES = Path(__file__).resolve().parent.parent / "exercises"


def solutions(name: str, **given) -> SimpleNamespace:
    """Names defined by the solution cells of exercises/<name>.ipynb; `given` are extra
    globals those cells need (for example the `model` the notebook loads)."""
    cells = ["".join(c["source"]) for c in json.loads((EXERCISES / f"{name}.ipynb").read_text())
             ["cells"] if c["cell_type"] == "code"]
    namespace = {"__name__": f"exercises.{name}", **given}
    for source in cells:
        tree = ast.parse(source)
        if "### BEGIN SOLUTION" in source or "### BEGIN ANSWER" in source:
            exec(compile(source, name, "exec"), namespace)
        else:
            imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
            exec(compile(ast.Module(imports, []), name, "exec"), namespace)
    return SimpleNamespace(**{k: v for k, v in namespace.items() if not k.startswith("__")})
