"""tools/stress.py reads back the numbers a notebook glued, and its busy process
runs at low priority."""

import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from stress import glued_numbers, start_busy_process  # noqa: E402


def test_glued_numbers_of_an_executed_notebook():
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        "from myst_nb import glue\n"
        "glue('speedup', 3.5, display=False)\n"
        "glue('shown', 'text')\n"
        "print('not glued')")]
    NotebookClient(nb, timeout=60, kernel_name="python3").execute()
    assert glued_numbers(nb) == {"speedup": "3.5", "shown": "'text'"}


def _eventually(check, seconds=30.0):
    """True once check() is; the child sets its priorities as it starts."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_busy_process_runs_at_low_priority_in_its_own_session():
    busy = start_busy_process()
    try:
        assert os.getsid(busy.pid) != os.getsid(0)
        assert _eventually(lambda: os.getpriority(os.PRIO_PROCESS, busy.pid) >= 10)
        autogroup = Path(f"/proc/{busy.pid}/autogroup")
        if autogroup.exists():  # Linux with CONFIG_SCHED_AUTOGROUP
            assert _eventually(lambda: autogroup.read_text().split()[-1] == "10"), \
                autogroup.read_text()
    finally:
        busy.kill()
        busy.wait()
