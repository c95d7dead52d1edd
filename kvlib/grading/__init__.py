"""Graders for the exercises: run hidden cases against a learner's function and say
what is wrong, in words.

Each chapter has a module here (`kvlib.grading.ch01`, ...) whose `grade_*` functions
take the learner's function and return a `Report`; printing it (or leaving it as a
notebook cell's last value) shows the verdict. A function that
still raises `NotImplementedError` is reported as not implemented, not as a crash.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np


@dataclass
class Report:
    """Outcome of grading one exercise."""

    exercise: str
    passed: int = 0
    failures: list[str] = field(default_factory=list)
    not_implemented: bool = False

    @property
    def ok(self) -> bool:
        return not self.not_implemented and not self.failures and self.passed > 0

    def __str__(self) -> str:
        if self.not_implemented:
            return f"{self.exercise}: not implemented yet (the function raises NotImplementedError)"
        if self.ok:
            return f"{self.exercise}: all {self.passed} hidden cases pass"
        lines = [f"{self.exercise}: {len(self.failures)} of "
                 f"{self.passed + len(self.failures)} hidden cases fail"]
        return "\n".join(lines + [f"  - {f}" for f in self.failures])

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(str(self))


def run_cases(exercise: str, cases: list[tuple[str, Callable[[], str | None]]]) -> Report:
    """Run (description, check) pairs; a check returns None if fine, else what went wrong."""
    report = Report(exercise)
    for description, check in cases:
        try:
            problem = check()
        except NotImplementedError:
            return Report(exercise, not_implemented=True)
        except Exception as err:  # the learner's code crashed: say how, keep grading
            problem = f"raised {type(err).__name__}: {err}"
        if problem is None:
            report.passed += 1
        else:
            report.failures.append(f"{description}: {problem}")
    return report


def compare_arrays(got, want, rtol: float = 1e-5, atol: float = 1e-6) -> str | None:
    """None if `got` matches `want` in shape and values, else a sentence saying how not."""
    got = np.asarray(got)
    if got.shape != want.shape:
        return f"shape {got.shape}, expected {want.shape}"
    if np.isnan(got).any() and not np.isnan(want).any():
        return "contains NaN"
    if not np.allclose(got, want, rtol=rtol, atol=atol):
        worst = np.unravel_index(np.argmax(np.abs(got - want)), want.shape)
        return (f"values differ; largest error at index {tuple(int(i) for i in worst)}: "
                f"got {got[worst]:.6g}, expected {want[worst]:.6g}")
    return None
