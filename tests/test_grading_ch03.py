"""Chapter 3's graders pass the reference solutions and catch the classic mistakes."""

import numpy as np

from kvlib import masks
from kvlib.batching import own_positions
from kvlib.grading.ch03 import (grade_causal_mask, grade_own_positions,
                                grade_padded_attention_mask, grade_padding_mask,
                                grade_ragged_mask)


def test_reference_solutions_pass():
    for report in (grade_causal_mask(masks.causal_mask),
                   grade_padding_mask(masks.padding_mask),
                   grade_own_positions(own_positions),
                   grade_padded_attention_mask(masks.padded_attention_mask),
                   grade_ragged_mask(masks.ragged_mask)):
        assert report.ok, report


def test_top_left_causal_mask_fails_and_says_why():
    report = grade_causal_mask(lambda n_new, n_past: np.tril(np.ones((n_new, n_past + n_new),
                                                                     dtype=bool)))
    assert not report.ok and "top-left" in str(report)


def test_right_padding_fails_and_says_why():
    report = grade_padding_mask(lambda lengths, width: masks.padding_mask(lengths, width, "right"))
    assert not report.ok and "pads are on the right" in str(report)


def test_column_positions_fail_and_say_why():
    report = grade_own_positions(lambda is_real: np.broadcast_to(
        np.arange(is_real.shape[1]), is_real.shape).copy())
    assert not report.ok and "padded column indices" in str(report)
    report = grade_own_positions(lambda is_real: np.cumsum(is_real, axis=1) - 1)
    assert not report.ok and "position 0" in str(report)


def test_missing_padding_mask_fails_and_says_why():
    def causal_only(is_real, n_new):
        width = is_real.shape[1]
        return np.broadcast_to(masks.causal_mask(n_new, width - n_new),
                               (len(is_real), n_new, width)).copy()
    report = grade_padded_attention_mask(causal_only)
    assert not report.ok and "padding is not masked" in str(report)


def test_one_triangle_for_all_packed_sequences_fails():
    report = grade_ragged_mask(lambda counts: masks.causal_mask(sum(counts)))
    assert not report.ok and "sequences see each other" in str(report)


def test_stubs_are_reported_as_not_implemented():
    def stub(*args):
        raise NotImplementedError
    for grade in (grade_causal_mask, grade_padding_mask, grade_own_positions,
                  grade_padded_attention_mask, grade_ragged_mask):
        report = grade(stub)
        assert report.not_implemented and "not implemented yet" in str(report)


def test_a_crash_is_reported_not_raised():
    report = grade_causal_mask(lambda n_new, n_past: 1 / 0)
    assert not report.ok and "ZeroDivisionError" in str(report)
