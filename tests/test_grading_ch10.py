"""The chapter 10 graders pass correct solutions, fail plausible wrong ones with a message
that names the mistake, and spot stubs."""

import math

from kvlib.engine import pack_step
from kvlib.grading.ch10 import grade_batching_steps, grade_pack_step


def pack_oldest_first_whatever_the_kind(pending, budget):
    counts, left = [], budget
    for n in pending:
        counts.append(int(min(n, left)))
        left -= counts[-1]
    return counts


def pack_without_cutting_chunks(pending, budget):
    counts, left = [0] * len(pending), budget
    for i, n in enumerate(pending):
        if n == 1 and left > 0:
            counts[i], left = 1, left - 1
    for i, n in enumerate(pending):
        if n > 1 and left > 0:
            counts[i], left = n, left - n
    return counts


def pack_every_decode_whatever_the_budget(pending, budget):
    counts = [1 if n == 1 else 0 for n in pending]
    left = budget - sum(counts)
    for i, n in enumerate(pending):
        if n > 1 and left > 0:
            counts[i] = int(min(n, left))
            left -= counts[i]
    return counts


def static_reference(lens, batch):
    return sum(max(lens[i:i + batch]) for i in range(0, len(lens), batch))


def continuous_reference(lens, batch):
    running, queue, steps = [], list(lens), 0
    while queue or running:
        running += [queue.pop(0) for _ in range(min(batch - len(running), len(queue)))]
        steps += 1
        running = [n - 1 for n in running if n > 1]
    return steps


def continuous_as_total_over_batch(lens, batch):
    return math.ceil(sum(lens) / batch)


def static_with_mean_length(lens, batch):
    return sum(round(sum(lens[i:i + batch]) / len(lens[i:i + batch]))
               for i in range(0, len(lens), batch))


def stub(*args):
    raise NotImplementedError("your code here")


def test_pack_step_grader():
    assert grade_pack_step(pack_step).ok
    oldest = grade_pack_step(pack_oldest_first_whatever_the_kind)
    assert not oldest.ok and "decodes go first" in str(oldest)
    uncut = grade_pack_step(pack_without_cutting_chunks)
    assert not uncut.ok and "cut to the budget" in str(uncut)
    greedy = grade_pack_step(pack_every_decode_whatever_the_budget)
    assert not greedy.ok and "the others wait" in str(greedy)
    assert "not implemented yet" in str(grade_pack_step(stub))


def test_batching_steps_grader():
    assert grade_batching_steps(static_reference, continuous_reference).ok
    lower_bound = grade_batching_steps(static_reference, continuous_as_total_over_batch)
    assert not lower_bound.ok and "not ceil(total / B)" in str(lower_bound)
    mean = grade_batching_steps(static_with_mean_length, continuous_reference)
    assert not mean.ok and "runs to its longest" in str(mean)
    swapped = grade_batching_steps(continuous_reference, static_reference)
    assert not swapped.ok and "static_steps gave" in str(swapped)
    assert "not implemented yet" in str(grade_batching_steps(stub, stub))
