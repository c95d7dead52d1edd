"""Graders for the chapter 10 exercises: packing a step under a token budget, and the
step counts of static against continuous batching."""

from __future__ import annotations

import numpy as np

from ..engine import pack_step
from . import Report, run_cases


def _check_counts(got, want) -> str | None:
    got = [int(g) for g in got]
    if len(got) != len(want):
        return f"returned {len(got)} counts for {len(want)} running requests"
    if got != want:
        return f"got {got}, expected {want}"
    return None


def grade_pack_step(fn) -> Report:
    """Check fn(pending, budget) -> counts against `kvlib.engine.pack_step`."""
    def case(pending, budget):
        return lambda: _check_counts(fn(list(pending), budget), pack_step(pending, budget))

    return run_cases("pack_step", [
        ("three decodes under a budget of 8: one token each", case([1, 1, 1], 8)),
        ("five decodes, budget 3: the three oldest decode, the others wait",
         case([1, 1, 1, 1, 1], 3)),
        ("an older prefill of 20 tokens and two decodes, budget 10: decodes go first, "
         "the prefill gets what is left", case([20, 1, 1], 10)),
        ("two prefills of 6 and 9 tokens, budget 10: oldest first, the second gets a "
         "chunk of the rest", case([6, 9], 10)),
        ("a prefill larger than the whole budget is cut to the budget", case([50], 16)),
        ("no budget (infinity): whole prompts and every decode", case([7, 1, 30], np.inf)),
        ("the budget is spent by decodes: prefills get nothing", case([12, 1, 1], 2)),
        ("nothing running", case([], 4)),
    ])


def _static_reference(output_lens, max_batch) -> int:
    return sum(max(output_lens[i:i + max_batch])
               for i in range(0, len(output_lens), max_batch))


def _continuous_reference(output_lens, max_batch) -> int:
    left, queue, steps = [], list(output_lens), 0
    while queue or left:
        while queue and len(left) < max_batch:
            left.append(queue.pop(0))
        steps += 1
        left = [n - 1 for n in left if n > 1]
    return steps


def grade_batching_steps(static_steps, continuous_steps) -> Report:
    """Check static_steps(lens, B) and continuous_steps(lens, B): decode steps to serve
    requests of these output lengths, all waiting at the start, at most B at a time."""
    def case(lens, batch):
        def check():
            for name, fn, ref in (("static", static_steps, _static_reference),
                                  ("continuous", continuous_steps, _continuous_reference)):
                got, want = fn(list(lens), batch), ref(list(lens), batch)
                if int(got) != want:
                    return f"{name}_steps gave {got}, expected {want}"
            return None
        return check

    return run_cases("batching_steps", [
        ("equal lengths [4, 4, 4, 4], B = 2: both ways take 8 steps", case([4, 4, 4, 4], 2)),
        ("[10, 1, 1, 1], B = 2: a static batch runs to its longest request",
         case([10, 1, 1, 1], 2)),
        ("[10, 1, 1, 1], B = 2: continuous is not ceil(total / B); the long request runs "
         "alone at the end", case([10, 1, 1, 1], 2)),
        ("[3, 9, 2, 7, 5], B = 2: the last static batch is partial", case([3, 9, 2, 7, 5], 2)),
        ("one slot (B = 1): both are the sum", case([3, 1, 4], 1)),
        ("B larger than the number of requests", case([6, 2, 9], 8)),
    ])


__all__ = ["Report", "grade_pack_step", "grade_batching_steps"]
