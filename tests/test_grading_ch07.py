"""Chapter 7's graders pass the notebook's solutions and reject plausible wrong answers,
each with a message that points at the mistake."""

import numpy as np
import pytest

from exercise_solutions import solutions
from kvlib.attention import SoftmaxState, online_attention
from kvlib.grading.ch07 import (grade_merge_states, grade_nan_rows, grade_online_attention,
                                merge_without_guard)

SOLUTION = solutions("ex07_online_softmax")


def test_the_solutions_pass():
    for report in (grade_merge_states(SOLUTION.merge_states),
                   grade_online_attention(SOLUTION.online_attention),
                   grade_nan_rows(SOLUTION.nan_rows)):
        assert report.ok, report


def merge_without_rescaling(m1, l1, o1, m2, l2, o2):
    return np.maximum(m1, m2), l1 + l2, o1 + o2


def merge_keeping_the_first_max(m1, l1, o1, m2, l2, o2):
    with np.errstate(over="ignore"):
        b = np.exp(m2 - np.where(np.isfinite(m1), m1, 0))
    return m1, l1 + b * l2, o1 + b[:, None] * o2


def merge_with_kvlib(m1, l1, o1, m2, l2, o2):
    s = SoftmaxState(m1, l1, o1).merge(SoftmaxState(m2, l2, o2))
    return s.row_max, s.normaliser, s.out


@pytest.mark.parametrize("wrong, words", [
    (merge_without_rescaling, "rescale"),
    (merge_without_guard, "no key on either side"),
    (merge_keeping_the_first_max, "row_max"),
    (merge_with_kvlib, "kvlib's own kvlib.attention.SoftmaxState"),
])
def test_merge_mistakes(wrong, words):
    report = grade_merge_states(wrong)
    assert not report.ok and words in str(report), report


def full_softmax(q, k, v, mask, chunk_size):
    """Wrong: a plain softmax over all keys, no chunks at all."""
    k, v = np.asarray(k), np.asarray(v)
    s = q @ k.T / np.float32(np.sqrt(q.shape[1]))
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    w = np.exp(s - s.max(axis=1, keepdims=True))
    return (w @ v) / w.sum(axis=1, keepdims=True)


def chunks_without_running_max(q, k, v, mask, chunk_size):
    """Wrong: reads chunk by chunk, but sums exp(score) with no running maximum."""
    l = np.zeros(len(q), np.float32)
    o = np.zeros(q.shape, np.float32)
    for lo in range(0, len(k), chunk_size):
        kc, vc = k[lo:lo + chunk_size], v[lo:lo + chunk_size]
        w = np.exp(q @ kc.T / np.float32(np.sqrt(q.shape[1])))
        if mask is not None:
            w = np.where(mask[:, lo:lo + chunk_size], w, 0)
        l, o = l + w.sum(axis=1), o + w @ vc
    return o / np.where(l > 0, l, 1)[:, None]


class _Truncated:
    """A reader whose len() leaves out a last chunk shorter than chunk_size."""

    def __init__(self, reader, chunk_size):
        self.reader, self.n = reader, len(reader) // chunk_size * chunk_size

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        return self.reader[index]


def skips_the_last_short_chunk(q, k, v, mask, chunk_size):
    """Wrong: a loop bound that drops a last chunk shorter than chunk_size."""
    k, v = _Truncated(k, chunk_size), _Truncated(v, chunk_size)
    return SOLUTION.online_attention(q, k, v, None if mask is None else mask[:, :len(k)],
                                     chunk_size)


@pytest.mark.parametrize("wrong, words", [
    (full_softmax, "read the keys and values chunk by chunk"),
    (chunks_without_running_max, "large scores"),
    (skips_the_last_short_chunk, "each of its 23 rows once"),
    (lambda q, k, v, m, c: online_attention(q[:, None], k[None], v[None], m, c)[:, 0],
     "kvlib's own kvlib.attention.online_attention"),
])
def test_online_attention_mistakes(wrong, words):
    report = grade_online_attention(wrong)
    assert not report.ok and words in str(report), report


@pytest.mark.parametrize("answer, words", [
    ([], "-inf - (-inf) = NaN"), ([1, 2, 3], "one empty side is fine"),
    ([0, 1, 2, 3], "only where m itself is -inf"), (..., "no prediction yet"),
])
def test_nan_rows_mistakes(answer, words):
    report = grade_nan_rows(answer)
    assert not report.ok and words in str(report), report


def test_stubs_are_reported_as_not_implemented():
    def stub(*args):
        raise NotImplementedError("your code here")
    assert "not implemented yet" in str(grade_merge_states(stub))
    assert "not implemented yet" in str(grade_online_attention(stub))
