"""Chapter 1's graders pass the notebook's solutions and reject plausible wrong answers,
each with a message that points at the mistake."""

import numpy as np
import pytest

from exercise_solutions import solutions
from kvlib import masks
from kvlib.attention import attention
from kvlib.grading.ch01 import grade_grouped_query_attention, grade_masked_softmax, grade_tile_bug

SOLUTION = solutions("ex01_attention")


def softmax_zero_then_renormalise(scores, mask):
    """Wrong: softmax over every key, then zero the masked ones and renormalise."""
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    if mask is not None:
        e = e * mask
    total = e.sum(axis=-1, keepdims=True)
    return e / np.where(total > 0, total, 1)


def softmax_without_max(scores, mask):
    """Wrong: no max subtraction, so large scores overflow."""
    with np.errstate(over="ignore", invalid="ignore"):
        e = np.exp(np.where(mask, scores, -np.inf) if mask is not None else scores)
        total = e.sum(axis=-1, keepdims=True)
        return e / np.where(total > 0, total, 1)


def softmax_nan_rows(scores, mask):
    """Wrong: a row with every key masked becomes NaN."""
    with np.errstate(invalid="ignore"):
        s = np.where(mask, scores, -np.inf) if mask is not None else scores
        e = np.exp(s - s.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)


def test_softmax_grader_accepts_the_solution():
    report = grade_masked_softmax(SOLUTION.masked_softmax)
    assert report.ok, report


@pytest.mark.parametrize("wrong, words", [
    (softmax_zero_then_renormalise, "set masked scores to -inf before the softmax"),
    (softmax_without_max, "large scores"),
    (softmax_nan_rows, "zeros, not NaN"),
    (masks.causal_mask, "kvlib's own kvlib.masks.causal_mask"),
])
def test_softmax_grader_rejects_wrong_answers(wrong, words):
    report = grade_masked_softmax(wrong)
    assert not report.ok and words in str(report), report


def test_zero_then_renormalise_gives_zeros_for_a_huge_masked_score():
    got = softmax_zero_then_renormalise(np.array([[1000.0, 0.0, 1.0]], np.float32),
                                        np.array([[False, True, True]]))
    assert np.array_equal(got, np.zeros((1, 3)))


def test_softmax_grader_reports_not_implemented():
    def stub(scores, mask):
        raise NotImplementedError
    report = grade_masked_softmax(stub)
    assert report.not_implemented and "not implemented" in str(report)


def gqa(q, k, v, mask=None, scale=None, tile=False, skip_mask_for_one_query=False):
    """The notebook's solution with one plausible mistake switched on."""
    group = q.shape[1] // k.shape[0]
    if tile:
        k, v = np.tile(k, (group, 1, 1)), np.tile(v, (group, 1, 1))
        group = 1
    if skip_mask_for_one_query and q.shape[0] == 1:
        mask = None
    scale = np.float32(1 / np.sqrt(q.shape[2]) if scale is None else scale)
    out = np.empty_like(q)
    for h in range(q.shape[1]):
        scores = (q[:, h] @ k[h // group].T) * scale
        out[:, h] = SOLUTION.masked_softmax(scores, mask) @ v[h // group]
    return out


@pytest.mark.parametrize("wrong, words", [
    (lambda q, k, v, m: gqa(q, k, v, m, tile=True), "h // 3"),
    (lambda q, k, v, m: gqa(q, k, v, m, scale=1.0), "scaled"),
    (lambda q, k, v, m: gqa(q, k, v, None), "mask was ignored"),
    (lambda q, k, v, m: gqa(q, k, v, m, skip_mask_for_one_query=True), "T = 1"),
    (lambda q, k, v, m: gqa(q, k, v, m).astype(np.float64), "float32"),
    (lambda q, k, v, m: gqa(q, k, v, m)[:, :k.shape[0]], "shape"),
    (attention, "kvlib's own kvlib.attention.attention"),
    (lambda q, k, v, m: attention(q, k, v, m), "kvlib's own kvlib.attention.attention"),
])
def test_gqa_grader_rejects_wrong_answers(wrong, words):
    report = grade_grouped_query_attention(wrong)
    assert not report.ok and words in str(report), report


def test_gqa_grader_accepts_the_solution():
    report = grade_grouped_query_attention(SOLUTION.grouped_query_attention)
    assert report.ok, report


@pytest.mark.parametrize("wrong, words", [
    ([], "k0 k1 k2 k0"), (list(range(9)), "agree for some heads"),
    ([1, 2, 4, 5, 7, 8], "heads 0, 4 and 8"), ([1], "run the cell below"),
    (..., "no prediction yet"),
])
def test_tile_bug_grader(wrong, words):
    assert grade_tile_bug(SOLUTION.wrong_heads).ok
    report = grade_tile_bug(wrong)
    assert not report.ok and words in str(report), report
