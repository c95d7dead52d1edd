"""Graders for the exercises: run hidden cases against a learner's function and say
what is wrong, in words.

Each chapter has a module here (`kvlib.grading.ch01`, ...) whose `grade_*` functions
take the learner's function and return a `Report`; printing it (or leaving it as a
notebook cell's last value) shows the verdict. A function that
still raises `NotImplementedError` is reported as not implemented, not as a crash.
"""

from __future__ import annotations

import dis
import functools
import inspect
import types
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
        total = self.passed + len(self.failures)
        if self.ok:
            return (f"{self.exercise}: all {self.passed} hidden cases pass" if total > 1
                    else f"{self.exercise}: right")
        lines = [f"{self.exercise}: {len(self.failures)} of {total} hidden cases fail"
                 if total > 1 else f"{self.exercise}: not right"]
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


def _from_kvlib(obj) -> bool:
    """True for a kvlib module, or a function or class defined in kvlib (its errors and
    the graders' own helpers excepted)."""
    if inspect.ismodule(obj):
        name = obj.__name__
    elif callable(obj):
        name = getattr(obj, "__module__", None) or ""
    else:
        return False
    return ((name == "kvlib" or name.startswith("kvlib."))
            and not name.startswith(("kvlib.errors", "kvlib.grading")))


def _global_names(code: types.CodeType):
    """Every global name a code object (and the functions nested in it) loads."""
    for instruction in dis.get_instructions(code):
        if instruction.opname in ("LOAD_GLOBAL", "LOAD_NAME"):
            yield instruction.argval
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _global_names(const)


def kvlib_used_by(fn, allowed=(), _seen=None) -> list[str]:
    """The kvlib functions, classes or modules that `fn` is, or calls through its globals,
    its closure or the plain functions it calls in turn; `allowed` objects excepted."""
    seen = set() if _seen is None else _seen
    if id(fn) in seen or any(fn is a for a in allowed):
        return []
    seen.add(id(fn))
    if isinstance(fn, functools.partial):
        return kvlib_used_by(fn.func, allowed, seen)
    if inspect.ismethod(fn):
        fn = fn.__func__
    if _from_kvlib(fn):
        return [f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', fn)}"
                if not inspect.ismodule(fn) else fn.__name__]
    code = getattr(fn, "__code__", None)
    if not isinstance(code, types.CodeType):
        return []
    found = []
    cells = [c.cell_contents for c in (fn.__closure__ or ()) if _has_contents(c)]
    names = [fn.__globals__[n] for n in set(_global_names(code)) if n in fn.__globals__]
    for obj in cells + names:
        if any(obj is a for a in allowed):
            continue
        if _from_kvlib(obj):
            found += kvlib_used_by(obj, allowed, seen)
        elif inspect.isfunction(obj) or isinstance(obj, functools.partial):
            found += kvlib_used_by(obj, allowed, seen)
    return found


def _has_contents(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:                                        # an empty closure cell
        return False
    return True


def refuses_kvlib(*allowed):
    """Decorator for a `grade_*` function: if a function handed in is, or calls, kvlib's
    own code (other than `allowed`), report that instead of grading it: the grader
    compares with kvlib, so kvlib would pass trivially."""
    def decorate(grade):
        exercise = grade.__name__.removeprefix("grade_")

        @functools.wraps(grade)
        def wrapper(*args, **kwargs):
            handed_in = [arg for arg in (*args, *kwargs.values())
                         if inspect.isroutine(arg) or isinstance(arg, functools.partial)]
            used = sorted({name for arg in handed_in for name in kvlib_used_by(arg, allowed)})
            if used:
                return Report(exercise, failures=[
                    f"your answer uses kvlib's own {', '.join(used)}: the grader compares "
                    "with kvlib, so write it yourself (NumPy only)"])
            return grade(*args, **kwargs)
        return wrapper
    return decorate


class ReadRuleError(Exception):
    """Raised by `RowReader` when the code under test reads more than the exercise allows."""


class RowReader:
    """A read-only stand-in for an array that lets the code under test read only a few
    rows (entries of the first axis) at a time, so a grader can tell a chunked loop from
    one that reads everything at once.

    `reader[i]`, `reader[i, ...]`, `reader[lo:hi]` and `reader[lo:hi, ...]` return copies
    of at most `max_rows` rows and are recorded in `reads`; `len`, `shape`, `dtype` and
    `ndim` work; anything else (the whole array, `.T`, `@`, fancy indexing) raises
    `ReadRuleError` with `rule`, the sentence that says how to read.
    """

    def __init__(self, array: np.ndarray, name: str, max_rows: int, rule: str):
        self._array, self._name, self._max_rows, self._rule = array, name, max_rows, rule
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim
        self.reads: list[int] = []

    def __len__(self) -> int:
        return len(self._array)

    def _refuse(self, what: str):
        raise ReadRuleError(f"{what}: {self._rule}")

    def __getitem__(self, index):
        first = index[0] if isinstance(index, tuple) else index
        if isinstance(first, (int, np.integer)) and not isinstance(first, bool):
            rows = 1
        elif isinstance(first, slice):
            start, stop, step = first.indices(len(self._array))
            rows = len(range(start, stop, step))
            if step != 1:
                self._refuse(f"{self._name}[{start}:{stop}:{step}] skips rows")
        else:
            self._refuse(f"{self._name}[...] indexed with a {type(first).__name__} gathers "
                         "several rows into one copy")
        if rows > self._max_rows:
            self._refuse(f"{self._name} read {rows} rows at once (at most "
                         f"{self._max_rows} allowed)")
        self.reads.append(rows)
        return np.array(self._array[index])

    def __array__(self, *args, **kwargs):
        self._refuse(f"{self._name} was used as one whole array")

    def __array_ufunc__(self, *args, **kwargs):
        self._refuse(f"{self._name} was used as one whole array")

    def __matmul__(self, other):
        self._refuse(f"{self._name} @ ... multiplies the whole array")

    __rmatmul__ = __matmul__

    def __iter__(self):
        self._refuse(f"iterating over {self._name} row by row is allowed only by index")

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        self._refuse(f"{self._name}.{attr} touches the whole array")


def grade_prediction(exercise: str, answer, truth, mistakes=(), rtol: float = 0.0) -> Report:
    """Grade a number (or a tuple or list of them) the reader wrote down before running
    the code. `truth` is what the code gives when run; `mistakes` lists (what a known slip
    predicts, the sentence that explains the slip), checked when the answer is wrong."""
    def same(a, b) -> bool:
        a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
        return a.shape == b.shape and bool(np.allclose(a, b, rtol=rtol, atol=0))

    if answer is ...:
        return Report(exercise, failures=["no prediction yet: write yours in place of `...`"])

    def check():
        if same(answer, truth):
            return None
        for wrong, why in mistakes:
            if same(answer, wrong) and not same(wrong, truth):
                return f"you predicted {answer!r}: {why}"
        return f"you predicted {answer!r}; run the cell below to see what happens, and why"
    return run_cases(exercise, [("your prediction", check)])
