"""Chapter 3's graders pass the notebook's solutions and reject plausible wrong answers,
each with a message that points at the mistake."""

import numpy as np
import pytest

from exercise_solutions import solutions
from kvlib import masks
from kvlib.grading.ch03 import (grade_causal_mask, grade_own_positions,
                                grade_padded_attention_mask, grade_padding_mask,
                                grade_ragged_mask, grade_tril_bug)

SOLUTION = solutions("ex03_masks")


def test_the_solutions_pass():
    for report in (grade_causal_mask(SOLUTION.causal_mask),
                   grade_padding_mask(SOLUTION.padding_mask),
                   grade_own_positions(SOLUTION.own_positions),
                   grade_padded_attention_mask(SOLUTION.padded_attention_mask),
                   grade_ragged_mask(SOLUTION.ragged_mask),
                   grade_tril_bug(SOLUTION.hidden_by_mistake)):
        assert report.ok, report


@pytest.mark.parametrize("wrong, words", [
    (lambda n_new, n_past: np.tril(np.ones((n_new, n_past + n_new), dtype=bool)), "top-left"),
    (lambda n_new, n_past: ~SOLUTION.causal_mask(n_new, n_past), "swapped"),
    (lambda n_new, n_past: SOLUTION.causal_mask(n_new, n_past).astype(int), "dtype"),
    (masks.causal_mask, "kvlib's own kvlib.masks.causal_mask"),
])
def test_causal_mask_mistakes(wrong, words):
    report = grade_causal_mask(wrong)
    assert not report.ok and words in str(report), report


def right_padding(lengths, width):
    return np.arange(width)[None, :] < np.asarray(lengths)[:, None]


@pytest.mark.parametrize("wrong, words", [
    (right_padding, "pads are on the right"),
    (lambda lengths, width: ~SOLUTION.padding_mask(lengths, width), "entries wrong"),
    (lambda lengths, width: SOLUTION.padding_mask(lengths, width)[:, 1:], "shape"),
    (lambda lengths, width: masks.padding_mask(lengths, width), "kvlib's own"),
])
def test_padding_mask_mistakes(wrong, words):
    report = grade_padding_mask(wrong)
    assert not report.ok and words in str(report), report


@pytest.mark.parametrize("wrong, words", [
    (lambda is_real: np.broadcast_to(np.arange(is_real.shape[1]), is_real.shape).copy(),
     "padded column indices"),
    (lambda is_real: np.cumsum(is_real, axis=1) - 1, "position 0"),
    (lambda is_real: np.cumsum(is_real, axis=1), "off by one"),
])
def test_own_positions_mistakes(wrong, words):
    report = grade_own_positions(wrong)
    assert not report.ok and words in str(report), report


def causal_only(is_real, n_new):
    width = is_real.shape[1]
    return np.broadcast_to(SOLUTION.causal_mask(n_new, width - n_new),
                           (len(is_real), n_new, width)).copy()


@pytest.mark.parametrize("wrong, words", [
    (causal_only, "padding is not masked"),
    (lambda is_real, n_new: np.broadcast_to(is_real[:, None, :], (len(is_real), n_new,
                                                                  is_real.shape[1])).copy(),
     "causal mask is missing"),
    (lambda is_real, n_new: SOLUTION.padded_attention_mask(is_real, n_new)[0], "shape"),
])
def test_padded_attention_mask_mistakes(wrong, words):
    report = grade_padded_attention_mask(wrong)
    assert not report.ok and words in str(report), report


@pytest.mark.parametrize("wrong, words", [
    (lambda counts: SOLUTION.causal_mask(sum(counts)), "sequences see each other"),
    (lambda counts: np.eye(sum(counts), dtype=bool), "wrong"),
    (lambda counts: masks.ragged_mask(counts), "kvlib's own"),
])
def test_ragged_mask_mistakes(wrong, words):
    report = grade_ragged_mask(wrong)
    assert not report.ok and words in str(report), report


@pytest.mark.parametrize("answer, words", [
    (0, "sees only key 0"), (3, "both queries lose keys"), (2, "count the pairs"),
    (..., "no prediction yet"),
])
def test_tril_bug_mistakes(answer, words):
    report = grade_tril_bug(answer)
    assert not report.ok and words in str(report), report


def test_stubs_are_reported_as_not_implemented():
    def stub(*args):
        raise NotImplementedError
    for grade in (grade_causal_mask, grade_padding_mask, grade_own_positions,
                  grade_padded_attention_mask, grade_ragged_mask):
        report = grade(stub)
        assert report.not_implemented and "not implemented yet" in str(report)
