"""Chapter 8's graders pass the notebook's solutions and reject plausible wrong answers,
each with a message that points at the mistake."""

import numpy as np
import pytest

from exercise_solutions import solutions
from kvlib.grading.ch08 import (grade_decode_traffic, grade_fold_tile, grade_intensity,
                                grade_merge_partials, grade_paged_decode)
from kvlib.roofline import attention_traffic

SOLUTION = solutions("ex08_kernels")


def test_the_solutions_pass():
    for report in (grade_decode_traffic(SOLUTION.decode_traffic),
                   grade_fold_tile(SOLUTION.fold_tile),
                   grade_merge_partials(SOLUTION.merge_partials),
                   grade_paged_decode(SOLUTION.paged_decode),
                   grade_intensity(SOLUTION.float32_intensity, SOLUTION.int8_intensity)):
        assert report.ok, report


@pytest.mark.parametrize("wrong, words", [
    (lambda b, c, h, kv, d, bpv: (b * c * kv * d * bpv, 4 * b * h * c * d), "keys AND values"),
    (lambda b, c, h, kv, d, bpv: (2 * b * c * kv * d * bpv, 4 * b * kv * c * d),
     "each query head"),
    (lambda b, c, h, kv, d, bpv: (2 * b * c * kv * d * bpv, 2 * b * h * c * d),
     "2 FLOPs per multiply-add"),
    (lambda b, c, h, kv, d, bpv: (2 * b * c * kv * d * bpv,
                                  attention_traffic(b, c, h, kv, d).flops),
     "kvlib's own kvlib.roofline.attention_traffic"),
])
def test_decode_traffic_mistakes(wrong, words):
    report = grade_decode_traffic(wrong)
    assert not report.ok and words in str(report), report


def fold_without_rescaling(m, l, acc, scores, values):
    new_m = max(m, float(scores.max()))
    p = np.exp(scores - new_m)
    return new_m, l + p.sum(), acc + p @ values


def fold_without_max(m, l, acc, scores, values):
    with np.errstate(over="ignore", invalid="ignore"):
        p = np.exp(scores)
        return max(m, float(scores.max())), l + p.sum(), acc + p @ values


def fold_keeping_the_first_max(m, l, acc, scores, values):
    new_m = float(scores.max()) if m == -np.inf else m
    with np.errstate(over="ignore", invalid="ignore"):
        p = np.exp(scores - new_m)
    return new_m, l + p.sum(), acc + p @ values


@pytest.mark.parametrize("wrong, words", [
    (fold_without_rescaling, "several tiles"),
    (fold_without_max, "large scores"),
    (fold_keeping_the_first_max, "running maximum"),
])
def test_fold_tile_mistakes(wrong, words):
    report = grade_fold_tile(wrong)
    assert not report.ok and words in str(report), report


def merge_normalising_each_split(ms, ls, accs):
    """Wrong: normalises each split first, so an empty split divides 0 by 0."""
    with np.errstate(invalid="ignore"):
        w = np.exp(ms - ms.max()) * ls
        return w @ (accs / ls[:, None]) / w.sum()


@pytest.mark.parametrize("wrong, words", [
    (lambda ms, ls, accs: accs.sum(0) / ls.sum(), "very different maxima"),
    (lambda ms, ls, accs: accs.sum(0), "one split"),
    (merge_normalising_each_split, "empty split"),
])
def test_merge_partials_mistakes(wrong, words):
    report = grade_merge_partials(wrong)
    assert not report.ok and words in str(report), report


def paged_in_order(q, key_blocks, value_blocks, block_table, length):
    """Wrong: ignores the block table and reads blocks 0, 1, 2, ..."""
    return SOLUTION.paged_decode(q, key_blocks, value_blocks, np.arange(len(key_blocks)),
                                 length)


def paged_by_gathering(q, key_blocks, value_blocks, block_table, length):
    """Wrong: gathers the whole sequence into one copy first."""
    n = -(-length // key_blocks.shape[1])
    k = key_blocks[block_table[:n]].reshape(-1, key_blocks.shape[2])[:length]
    v = value_blocks[block_table[:n]].reshape(-1, key_blocks.shape[2])[:length]
    s = k @ q / np.float32(np.sqrt(len(q)))
    w = np.exp(s - s.max())
    return w @ v / w.sum()


def paged_keeping_the_tail(q, key_blocks, value_blocks, block_table, length):
    """Wrong: reads every slot of the last block, filled or not."""
    block_size = key_blocks.shape[1]
    n = -(-length // block_size)
    return SOLUTION.paged_decode(q, key_blocks, value_blocks, block_table, n * block_size)


@pytest.mark.parametrize("wrong, words", [
    (paged_in_order, "block_table[t // block_size]"),
    (paged_by_gathering, "gathers several rows into one copy"),
    (paged_keeping_the_tail, "the last block may be partly filled"),
])
def test_paged_decode_mistakes(wrong, words):
    report = grade_paged_decode(wrong)
    assert not report.ok and words in str(report), report


@pytest.mark.parametrize("answer, words", [
    ((0.5, 2.0), "group of 3 query heads"), ((1.5, 1.5), "a quarter of the bytes"),
    ((3.0, 12.0), "keys AND values"), ((..., 1.0), "no prediction yet"),
])
def test_intensity_mistakes(answer, words):
    report = grade_intensity(*answer)
    assert not report.ok and words in str(report), report


def test_not_implemented_is_reported_cleanly():
    def stub(*args):
        raise NotImplementedError("your code here")
    report = grade_paged_decode(stub)
    assert report.not_implemented and "not implemented yet" in str(report)
