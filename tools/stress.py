"""Run every notebook under the conditions a reader's machine may have.

    python tools/stress.py [--modes quiet quiet busy haswell] [--out _build/stress] [NB ...]

Modes:
  quiet    the notebooks as `make test` runs them (run it twice: a claim must hold twice);
  busy     beside a busy process at low priority that keeps one core spinning all along:
           `nice -n 10`, in a session of its own whose autogroup is niced to 10 too
           (with Linux's autogroups a plain `nice` only ranks processes of one session,
           so a niced process in another terminal would get a full half of the CPU);
  haswell  with OPENBLAS_CORETYPE=Haswell: other BLAS kernels, other float32 rounding.

For every mode and notebook it records whether every cell ran (asserts included), the
wall time, and every number the notebook glued. It writes `report.md` (pass/fail and
times per mode, with each notebook's time against its first quiet run) and `glued.csv`
(one row per glued number and run) under --out, rewritten after every notebook so that
an interrupted run keeps what it measured, and exits 1 if any run failed. A notebook
whose cell runs past 10 minutes (the book build's limit) or whose kernel dies counts as failed.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

ROOT = Path(__file__).resolve().parent.parent
GLUE_MIME = "application/papermill.record/text/plain"
MODES = {"quiet": {}, "busy": {}, "haswell": {"OPENBLAS_CORETYPE": "Haswell"}}
BUSY_LOOP = """
try:  # lower this session's autogroup, where the kernel has autogroups
    with open("/proc/self/autogroup", "w") as f:
        f.write("10")
except OSError:
    pass
while True:
    pass
"""


def start_busy_process() -> subprocess.Popen:
    """One core spinning at low priority, in a session (and autogroup) of its own."""
    return subprocess.Popen(["nice", "-n", "10", sys.executable, "-c", BUSY_LOOP],
                            start_new_session=True)


def glued_numbers(nb) -> dict[str, str]:
    """name -> text of every `myst_nb.glue` value of an executed notebook."""
    found = {}
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            name = out.get("metadata", {}).get("scrapbook", {}).get("name")
            data = out.get("data", {})
            text = data.get(GLUE_MIME, data.get("text/plain"))  # glued hidden / shown
            if name and text is not None:
                found[name] = text
    return found


def run_notebook(path: Path) -> tuple[bool, float, str, dict[str, str]]:
    """(passed, seconds, first error, glued values) of one execution of `path`."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    try:
        client.execute()
        passed, error = True, ""
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as err:
        passed, error = False, str(err).strip().splitlines()[-1][:200]
    return passed, time.perf_counter() - start, error, glued_numbers(nb)


def write_report(out: Path, modes: list[str], results: list, glued: list) -> None:
    """report.md and glued.csv of the runs so far."""
    quiet_time = {name: s for run, mode, name, ok, s, _ in results if mode == "quiet"
                  and run == modes.index("quiet") + 1} if "quiet" in modes else {}
    lines = ["| run | mode | notebook | result | seconds | x first quiet run | error |",
             "|---|---|---|---|---|---|---|"]
    for run, mode, name, ok, seconds, error in results:
        ratio = f"{seconds / quiet_time[name]:.2f}" if name in quiet_time else ""
        lines.append(f"| {run} | {mode} | {name} | {'ok' if ok else 'FAILED'} | "
                     f"{seconds:.0f} | {ratio} | {error} |")
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with open(out / "glued.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("run", "mode", "notebook", "name", "value"), *glued])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=lambda p: Path(p).resolve(),
                        help="default: chapters/*.ipynb and exercises/*.ipynb")
    parser.add_argument("--modes", nargs="+", default=["quiet", "quiet", "busy", "haswell"],
                        choices=sorted(MODES))
    parser.add_argument("--out", type=Path, default=ROOT / "_build" / "stress")
    args = parser.parse_args(argv)
    notebooks = args.notebooks or sorted([*ROOT.glob("chapters/*.ipynb"),
                                          *ROOT.glob("exercises/*.ipynb")])
    args.out.mkdir(parents=True, exist_ok=True)
    results, glued = [], []
    for run, mode in enumerate(args.modes, start=1):
        saved = dict(os.environ)
        os.environ.update(MODES[mode])
        busy = None
        if mode == "busy":
            busy = start_busy_process()
        try:
            for path in notebooks:
                passed, seconds, error, values = run_notebook(path)
                name = path.relative_to(ROOT).as_posix()
                results.append((run, mode, name, passed, seconds, error))
                glued += [(run, mode, name, key, value) for key, value in values.items()]
                print(f"run {run} ({mode}): {name} {'ok' if passed else 'FAILED'} "
                      f"{seconds:.0f} s {error}", flush=True)
                write_report(args.out, args.modes, results, glued)
        finally:
            if busy is not None:
                busy.kill()
            os.environ.clear()
            os.environ.update(saved)
    print(f"report: {args.out / 'report.md'}; glued numbers: {args.out / 'glued.csv'}")
    return 0 if all(r[3] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
